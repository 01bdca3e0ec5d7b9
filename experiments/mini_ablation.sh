#!/usr/bin/env bash
# Credit modes side by side from ONE SFT checkpoint (seeds vary the RL sampling only), one process per core.
# Usage: bash experiments/mini_ablation.sh SFT_CHECKPOINT OUT_DIR [RL_STEPS] [SEEDS]
set -uo pipefail
SFT=${1:?usage}; OUT=${2:?usage}; STEPS=${3:-80}; SEEDS=${4:-"0 1 2"}
export OMP_NUM_THREADS=1 TQDM_DISABLE=1
mkdir -p "$OUT"
COMMON="--run.num_threads=1 --run.device=cpu --data.dir=$OUT/data --rl.init_from=$SFT --rl.steps=$STEPS --run.save_every=1000 ${EXTRA:-}"
python -c "import config, data; data.load_splits(config.load_config('configs/base.yaml', ['--data.dir=$OUT/data']))"
declare -A MODES=(
  [outcome]="--credit.mode=outcome --controller.mode=fixed"
  [process]="--credit.mode=process --controller.mode=fixed"
  [rule_shaped_replay]="--credit.mode=rule_shaped --rl.guided_replay=true --controller.mode=fixed"
  [graph_fixed]="--credit.mode=graph --credit.evidence=group --controller.mode=fixed"
  [graph_meta]="--credit.mode=graph --credit.evidence=group --controller.mode=meta"
)
for name in "${!MODES[@]}"; do
  for s in $SEEDS; do
    python graph_grpo.py configs/base.yaml $COMMON ${MODES[$name]} --run.seed=$s --run.out_dir=$OUT/${name}_s$s > $OUT/${name}_s$s.log 2>&1 &
  done
done
python graph_grpo.py configs/base.yaml $COMMON --credit.mode=stepwise --controller.mode=fixed --run.seed=0 --run.out_dir=$OUT/stepwise_s0 > $OUT/stepwise_s0.log 2>&1 &
wait
python experiments/summarize.py "$OUT"
