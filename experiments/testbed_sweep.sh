#!/usr/bin/env bash
# The testbed's figures in one go (README "Testbed" and "SFT with CoT random masking"), one process per core:
#   1. SFT with and without CoT random masking, 3 seeds each (test_id / test_longtail after SFT);
#   2. a short outcome-GRPO run (and graph-credit runs) from the masked seed-0 SFT checkpoint, to check that
#      RL can move long-tail accuracy at all (a testbed no RL method can move measures nothing).
# Usage: bash experiments/testbed_sweep.sh OUT_DIR [RL_STEPS]      (about 6 minutes on 14+ cores)
set -uo pipefail
OUT=${1:?usage: testbed_sweep.sh OUT_DIR [RL_STEPS]}
STEPS=${2:-150}
export OMP_NUM_THREADS=1 TQDM_DISABLE=1
mkdir -p "$OUT"
COMMON="--run.num_threads=1 --run.device=cpu --data.dir=$OUT/data"
python -c "import config, data; c = config.load_config('configs/base.yaml', ['--data.dir=$OUT/data']); data.load_splits(c)"
for seed in 0 1 2; do
  python sft_mask.py configs/base.yaml $COMMON --run.seed=$seed --run.out_dir=$OUT/masked_s$seed > $OUT/masked_s$seed.log 2>&1 &
  python sft_mask.py configs/base.yaml $COMMON --run.seed=$seed --mask.enabled=false --run.out_dir=$OUT/plain_s$seed > $OUT/plain_s$seed.log 2>&1 &
done
wait
SFT=$OUT/masked_s0/sft/checkpoint
RL="$COMMON --rl.init_from=$SFT --rl.steps=$STEPS"
python graph_grpo.py configs/base.yaml $RL --credit.mode=outcome --controller.mode=fixed --run.out_dir=$OUT/rl_outcome > $OUT/rl_outcome.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=outcome --controller.mode=fixed --rl.lr=1e-4 --run.out_dir=$OUT/rl_outcome_lr1e-4 > $OUT/rl_outcome_lr1e-4.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=outcome --controller.mode=fixed --rl.num_generations=16 --rl.prompts_per_step=8 --run.out_dir=$OUT/rl_outcome_g16 > $OUT/rl_outcome_g16.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=graph --credit.evidence=group --controller.mode=fixed --run.out_dir=$OUT/rl_graph_fixed > $OUT/rl_graph_fixed.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=graph --credit.evidence=baseline --controller.mode=fixed --run.out_dir=$OUT/rl_graph_baseline > $OUT/rl_graph_baseline.log 2>&1 &
python graph_grpo.py configs/base.yaml $RL --credit.mode=graph --credit.evidence=group --controller.mode=meta --run.out_dir=$OUT/rl_graph_meta > $OUT/rl_graph_meta.log 2>&1 &
wait
python experiments/summarize.py "$OUT"
