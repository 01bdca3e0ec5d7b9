"""Training reward of RL runs split by the prompt's long-tail kind, from the rollouts each run logged (issue 14;
results/LOG.md, "A controller that moves, at the current default"): does the sampled reward on long-tail prompts see
what the greedy long-tail evaluation sees?

    python experiments/sample_rewards.py RUNS_DIR ROW [ROW ...] --seeds 0-7 [--from-step 100]

RUNS_DIR is a study directory (`runs/moves`): ROW_s<seed>/samples.jsonl holds the logged rollouts (query, product,
reward, step) and data/*/rl.jsonl the RL pool with each example's `meta` (longtail kind, pivotal). Per row, the mean
reward over seeds and logged rollouts from --from-step on, for head prompts, long-tail prompts whose form does not
change the label, and pivotal long-tail prompts; n is the number of rollouts. Nothing trains; it reads logs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments.ablation import parse_seeds  # noqa: E402

GROUPS = ("head", "long tail, not pivotal", "long tail, pivotal")


def fail(msg: str) -> None:
    print(f"sample_rewards: {msg}", file=sys.stderr)
    sys.exit(2)


def group_of(meta: dict) -> str:
    return GROUPS[0] if not meta.get("longtail") else GROUPS[2] if meta.get("pivotal") else GROUPS[1]


def rewards_by_group(samples: list[dict], meta: dict, from_step: int) -> dict[str, list[float]]:
    """{group: rewards} of the logged rollouts at step >= from_step; meta maps (query, product) to the pool's meta."""
    out: dict[str, list[float]] = {g: [] for g in GROUPS}
    for x in samples:
        if x["step"] >= from_step:
            out[group_of(meta.get((x["query"], x["product"]), {}))].append(float(x["reward"]))
    return out


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
    try:
        return [json.loads(line) for line in open(path) if line.strip()]
    except json.JSONDecodeError as err:
        fail(f"{path}: not JSON lines ({err.msg}, line {err.lineno})")
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_dir")
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--seeds", default="0-7", help="a range a-b or a comma list")
    ap.add_argument("--from-step", type=int, default=0)
    args = ap.parse_args()
    seeds = parse_seeds(args.seeds)
    pools = sorted(glob.glob(os.path.join(args.runs_dir, "data", "*", "rl.jsonl")))
    if not pools:
        fail(f"{args.runs_dir}/data/*/rl.jsonl: no RL pool found")
    meta = {(x["query"], x["product"]): x.get("meta", {}) for x in read_jsonl(pools[0])}
    lines = []
    for row in args.rows:  # everything is read before anything is printed: an error is the only output
        pooled: dict[str, list[float]] = {g: [] for g in GROUPS}
        for seed in seeds:
            samples = read_jsonl(os.path.join(args.runs_dir, f"{row}_s{seed}", "samples.jsonl"))
            for g, v in rewards_by_group(samples, meta, args.from_step).items():
                pooled[g] += v
        cells = [f"{sum(v) / len(v):.3f} ({len(v)})" if v else "-" for v in pooled.values()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    print(f"mean logged training reward from step {args.from_step}, seeds {seeds} (n rollouts)\n")
    print("| row | " + " | ".join(GROUPS) + " |\n|---|" + "---:|" * len(GROUPS))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
