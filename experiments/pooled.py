"""One row against another, paired per (data seed, seed) and pooled over several studies' runs (issue 14; results/LOG.md,
"A third data seed, and a default for noisy labels").

    python experiments/pooled.py unparsed_right_lr05 verifier_lr05 \
        --runs unparsed_1234:runs/unparsed_1234:0-15 unparsed_9001:/work/u9/runs/unparsed_9001:0-7 ...

Each --runs entry is STUDY:RUN_DIR:SEEDS: the study (experiments/ablation.py) whose rows and scoring (score_last)
the runs were made under, the directory that holds them, and the seeds to read. A run of row A and the run of row B
with the same study and seed form one pair; a seed that lacks either is left out and counted. Per split it prints
the pairs, the mean difference A - B, the seeds A wins, the 95% t-interval of the mean, and a sign-flip p-value
(ablation.signflip_p: exact over every sign pattern up to 16 pairs; beyond, random patterns from a fixed seed), pooled
and per study. It runs nothing; the studies' own reports hold the per-study tests that their rules name.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import ablation  # noqa: E402
from experiments.ablation import signflip_p, t975  # noqa: E402

SPLITS = ("test_longtail", "test_id")


def pooled_difference(d: list[float]) -> dict:
    """Mean of the paired differences, wins (d > 0), the 95% t-interval of the mean and the sign-flip p."""
    arr = np.asarray(d, dtype=float)
    n = len(arr)
    mean = float(arr.mean()) if n else float("nan")
    half = t975(n - 1) * float(arr.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "wins": int((arr > 0).sum()), "low": mean - half, "high": mean + half,
            "p": signflip_p(arr)}


def paired_differences(found: dict, a: str, b: str, split: str) -> tuple[list[float], list[int]]:
    """(A - B macro-F1 on split per seed where both finished, the seeds where one is missing) from ablation.collect."""
    ra, rb = found.get(a, {}), found.get(b, {})
    both = sorted(set(ra) & set(rb))
    d = [ra[s]["final"][split]["macro_f1"] - rb[s]["final"][split]["macro_f1"] for s in both]
    return d, sorted(set(ra) ^ set(rb))


def fail(msg: str) -> None:
    """A user's mistake: one line on stderr naming what is wrong, exit code 2."""
    print(f"pooled.py: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_runs(entry: str) -> tuple[str, str, list[int]]:
    study, _, rest = entry.partition(":")
    out, _, seeds = rest.rpartition(":")
    if study not in ablation.STUDIES or not out or not seeds:
        fail(f"--runs {entry!r}: want STUDY:RUN_DIR:SEEDS with a study of experiments/ablation.py")
    if not os.path.isdir(out):
        fail(f"--runs {entry!r}: no directory {out}")
    return study, out, ablation.parse_seeds(seeds)


def line(name: str, r: dict) -> str:
    return (f"| {name} | {r['n']} | {100 * r['mean']:+.2f} | {r['wins']} | {100 * r['low']:+.2f} to "
            f"{100 * r['high']:+.2f} | {r['p']:.3f} |")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("row_a")
    ap.add_argument("row_b")
    ap.add_argument("--runs", nargs="+", required=True, help="STUDY:RUN_DIR:SEEDS, one per study")
    args = ap.parse_args(argv)
    per_study = []
    for entry in args.runs:
        study, out, seeds = parse_runs(entry)
        rows = ablation.rows_of(study)
        for name in (args.row_a, args.row_b):
            if name not in rows:
                fail(f"row {name!r} is not a row of study {study!r}")
        found = ablation.collect(out, seeds, [rows[args.row_a], rows[args.row_b]], ablation.STUDIES[study].score_last)
        per_study.append((study, found))
    text = [f"# {args.row_a} - {args.row_b}, macro-F1 points, paired per (study, seed)\n",
            f"By `python experiments/pooled.py {' '.join(argv if argv is not None else sys.argv[1:])}`.\n"]
    for split in SPLITS:
        text += [f"\n## {split}\n", "| runs | pairs | mean A - B | A higher | 95% t-interval | sign-flip p |",
                 "|---|---|---|---|---|---|"]
        pooled, missing = [], 0
        for study, found in per_study:
            d, miss = paired_differences(found, args.row_a, args.row_b, split)
            pooled += d
            missing += len(miss)
            if d:
                text.append(line(study, pooled_difference(d)))
        if pooled:
            text.append(line("**pooled**", pooled_difference(pooled)))
        text.append(f"\nSeeds with one of the two runs missing (left out): {missing}.")
    out = "\n".join(text) + "\n"
    print(out)
    return out


if __name__ == "__main__":
    main()
