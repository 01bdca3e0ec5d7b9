"""Share of a training step spent in each phase, Graph-GRPO (meta controller) against plain GRPO, side by side.

    python benchmarks/overhead.py --init-from runs/base/sft/checkpoint [--steps 30] [--threads 1]

Runs the trainer (graph_grpo.py configs/base.yaml) for --steps steps in each mode, alternating the modes in
chunks (A B A B) so that a shared, noisy machine treats both alike, and prints the median seconds per phase
from metrics.jsonl (time/rollout_s, time/credit_s, time/controller_s, time/update_s, time/step_s) and each
phase's share of the step. Graph-GRPO's extra cost is credit + controller. Nothing here is asserted: numbers
are measured and printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"grpo": ["--credit.mode=outcome", "--controller.mode=fixed"],
         "graph_meta": ["--credit.mode=graph", "--controller.mode=meta"]}
PHASES = ["rollout", "credit", "controller", "update", "step"]


def run_chunk(mode, out, init_from, steps, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    cmd = [sys.executable, "graph_grpo.py", "configs/base.yaml", f"--run.out_dir={out}", f"--rl.init_from={init_from}",
           f"--rl.steps={steps}", f"--run.num_threads={threads}", "--run.save_every=1", "--run.keep_last=1",
           "--eval.max_items=1", *MODES[mode]]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", required=True, help="SFT checkpoint directory")
    ap.add_argument("--steps", type=int, default=30, help="steps per mode (in chunks of --chunk)")
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="overhead_")
    for upto in range(args.chunk, args.steps + 1, args.chunk):  # A B A B: each chunk resumes its own run
        for mode in MODES:
            run_chunk(mode, os.path.join(root, mode), args.init_from, upto, args.threads)
    print(f"median seconds per step phase over {args.steps} steps (first step of each mode dropped); {root}")
    print("| mode | " + " | ".join(PHASES) + " | credit+controller share |")
    print("|---|" + "---:|" * (len(PHASES) + 1))
    for mode in MODES:
        recs = [json.loads(x) for x in open(os.path.join(root, mode, "metrics.jsonl"))][1:]
        med = {p: statistics.median(r[f"time/{p}_s"] for r in recs) for p in PHASES}
        share = statistics.median((r["time/credit_s"] + r["time/controller_s"]) / r["time/step_s"] for r in recs)
        print(f"| {mode} | " + " | ".join(f"{med[p]:.3f}" for p in PHASES) + f" | {share:.1%} |")


if __name__ == "__main__":
    main()
