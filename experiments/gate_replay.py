"""Replay logged alpha gradients through the controller's step rules, and through sign-flipped copies (pure noise
with the same spread), to see how far each rule would move alpha (issue 14 item 4; results/LOG.md,
"A controller that moves").

    python experiments/gate_replay.py RUN_DIR [RUN_DIR ...] [--copies 20] [--seed 0]

Each RUN_DIR's metrics.jsonl holds `controller/alpha_grad/<edge type>` per RL step (a meta-controller run). Every
(run, edge type) trace goes alone through a one-coordinate credit.EdgeController per rule (the project's own gate,
not a copy), started at 0 with wide bounds so that nothing clamps; the table gives, per rule, the mean final
displacement, the share of real traces moved down (alpha's gradient positive) by at least 0.2, and the share of
noise traces moved by at least 0.2 either way. Nothing trains; it reads logs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import credit  # noqa: E402

# (label, rule, window K, z, step size): DESIGN 5's gate as configured, the same with a larger step, the
# sequential gate as the controller study ran it and with a smaller z
RULES = (("window, K 8, z 2, step 0.05 (the default)", "window", 8, 2.0, 0.05),
         ("window, K 8, z 2, step 0.2", "window", 8, 2.0, 0.2),
         ("sequential, K 8, z 2.5, step 0.25", "sequential", 8, 2.5, 0.25),
         ("sequential, K 8, z 2, step 0.25", "sequential", 8, 2.0, 0.25))  # the moves study: is z 2.5 the limit?


def fail(msg: str) -> None:
    print(f"gate_replay: {msg}", file=sys.stderr)
    sys.exit(2)


def traces(run_dirs: list[str]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for d in run_dirs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.isfile(path):
            fail(f"{path}: no such file (a run directory of graph_grpo.py holds one)")
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        for k in sorted({k for r in recs for k in r if k.startswith("controller/alpha_grad/")}):
            out.append((f"{os.path.basename(d)}:{k.rsplit('/', 1)[1]}",
                        torch.tensor([r[k] for r in recs if k in r], dtype=torch.float64)))
    return out


def displacement(grads: torch.Tensor, rule: str, window: int, z: float, step: float) -> float:
    """Final alpha minus its start after feeding `grads` (T,) to a one-coordinate controller."""
    ctl = credit.EdgeController(1, 0.0, alpha_min=-100.0, alpha_max=100.0, window=window, z=z, step_size=step,
                                rule=rule)
    for g in grads:
        ctl.accumulate(g.view(1))
    return ctl.alpha().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories with metrics.jsonl")
    ap.add_argument("--copies", type=int, default=20, help="sign-flipped noise copies per trace")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ts = traces(args.runs)
    if not ts:
        fail(f"no controller/alpha_grad/* in {', '.join(args.runs)} (meta-controller runs only)")
    gen = torch.Generator().manual_seed(args.seed)
    flips = [[torch.randint(0, 2, g.shape, generator=gen).double() * 2 - 1 for _ in range(args.copies)] for _, g in ts]
    print(f"{len(ts)} traces of {len(args.runs)} runs, {args.copies} noise copies each\n")
    print("| rule | mean displacement | real: moved down >= 0.2 | noise: moved >= 0.2 either way |\n|---|---:|---:|---:|")
    for label, rule, window, z, step in RULES:
        real = [displacement(g, rule, window, z, step) for _, g in ts]
        noise = [displacement(g * f, rule, window, z, step) for (_, g), fs in zip(ts, flips) for f in fs]
        print(f"| {label} | {sum(real) / len(real):+.2f} | {sum(d <= -0.2 + 1e-9 for d in real) / len(real):.0%} | "
              f"{sum(abs(d) >= 0.2 - 1e-9 for d in noise) / len(noise):.0%} |")


if __name__ == "__main__":
    main()
