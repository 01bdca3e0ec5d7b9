#!/usr/bin/env bash
# Can outcome RL move long-tail accuracy when every long-tail form was emitted at least rarely in SFT?
# Usage: bash experiments/testbed_variant.sh OUT_DIR [RL_STEPS] [extra overrides...]   (one process per core)
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-120}; shift 2 || true
export OMP_NUM_THREADS=1 TQDM_DISABLE=1
mkdir -p "$OUT"
COMMON="--run.num_threads=1 --run.device=cpu --data.dir=$OUT/data $*"
python sft_mask.py configs/base.yaml $COMMON --run.out_dir=$OUT/sft > $OUT/sft.log 2>&1
RL="$COMMON --rl.init_from=$OUT/sft/sft/checkpoint --rl.steps=$STEPS"
python graph_grpo.py configs/base.yaml $RL --credit.mode=outcome --controller.mode=fixed --run.out_dir=$OUT/rl_outcome > $OUT/a.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=outcome --controller.mode=fixed --rl.lr=1e-4 --run.out_dir=$OUT/rl_outcome_lr1e-4 > $OUT/b.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=graph --credit.evidence=group --controller.mode=fixed --rl.lr=1e-4 --run.out_dir=$OUT/rl_graph_fixed_lr1e-4 > $OUT/c.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=graph --credit.evidence=baseline --controller.mode=fixed --rl.lr=1e-4 --run.out_dir=$OUT/rl_graph_baseline_lr1e-4 > $OUT/d.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=outcome --controller.mode=fixed --rl.lr=1e-4 --rl.temperature=1.3 --run.out_dir=$OUT/rl_outcome_lr1e-4_t1.3 > $OUT/e.log 2>&1 &
wait
python experiments/summarize.py "$OUT"
