"""Where an RL step's time goes: the trainer's phases, and inside them the operators and the Python functions.

    python benchmarks/profile_step.py --init-from runs/reach/sft_masked_s0/sft/checkpoint [--steps 6] [--threads 1]
    python benchmarks/profile_step.py --init-from CKPT --rl.prompts_per_step=4 --rl.num_generations=4   # config overrides

Builds the trainer in-process (graph_grpo.RL) on the config's data, runs --warmup steps, then --steps steps under
torch.profiler and cProfile, and prints: the median seconds of each trainer phase (time/*_s), the operators with
the most self CPU time, and the project functions with the most cumulative time. Nothing is asserted; the numbers
go to benchmarks/README.md with the command and the machine's load.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import graph_grpo as gg  # noqa: E402
import policy  # noqa: E402
import testbed  # noqa: E402
from config import load_config  # noqa: E402


def build(config: str, init_from: str, overrides: list[str]) -> gg.RL:
    cfg = load_config(config, ["--run.device=cpu", *overrides])
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(init_from, task.schema.words(), dtype=cfg.run.dtype)
    cr = gg.Credit.from_config(cfg)
    return gg.RL(cfg, task, cr, model, model, None, tok, data.TagVocab.from_tokenizer(tok, task.schema),
                 torch.optim.AdamW(model.parameters(), lr=cfg.rl.lr), gg.Controller(cfg, cr, len(task.schema.edge_kinds), 1),
                 0, 1, torch.device("cpu"), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/base.yaml")
    ap.add_argument("--init-from", required=True, help="an SFT checkpoint (the policy whose steps are profiled)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    args, args.overrides = ap.parse_known_args()  # the rest: --section.key=value overrides of the config
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    s = build(args.config, args.init_from, args.overrides)
    for step in range(args.warmup):
        gg.rl_step(s, step)
    recs, prof = [], cProfile.Profile()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        prof.enable()
        for step in range(args.warmup, args.warmup + args.steps):
            recs.append(gg.rl_step(s, step)[0])
        prof.disable()
    phases = sorted({k for r in recs for k in r if k.startswith("time/")})
    print(f"# {args.config} {' '.join(args.overrides)}: {args.steps} steps after {args.warmup} warm-up, "
          f"{args.threads} thread(s); mean completion length {statistics.mean(r['completions/mean_length'] for r in recs):.1f}")
    print("| phase | median s | share of step |\n|---|---:|---:|")
    step_s = statistics.median(r["time/step_s"] for r in recs)
    for k in phases:
        med = statistics.median(r[k] for r in recs)
        print(f"| {k[5:-2]} | {med:.3f} | {med / step_s:.0%} |")
    print(f"\n## operators by self CPU time\n```\n{tp.key_averages().table(sort_by='self_cpu_time_total', row_limit=args.top)}```")
    stats = pstats.Stats(prof)
    rows = [(v[3], f"{os.path.basename(fn)}:{name}") for (fn, line, name), v in stats.stats.items()
            if fn.startswith(ROOT) and "benchmarks" not in fn and ".venv" not in fn]
    total = sum(v[2] for v in stats.stats.values())
    print("\n## project functions by cumulative time\n| function | cumulative s | share |\n|---|---:|---:|")
    for cum, name in sorted(rows, reverse=True)[:args.top]:
        print(f"| {name} | {cum:.2f} | {cum / max(total, 1e-9):.0%} |")


if __name__ == "__main__":
    main()
