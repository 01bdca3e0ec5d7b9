"""Issue 16: do the graph's node heads earn their place in the distilled student, and what budget converges?

    python experiments/distill_study.py                   # heads: 3 students x 2 graphs x 3 seeds -> results/distill.md
    python experiments/distill_study.py --study budget    # the default student at 3000 / 6000 / 12000 steps
    python experiments/distill_study.py --report-only     # rebuild the report from the run directories
    nohup python experiments/distill_study.py > runs/distill_study.log 2>&1 &

heads: with the teacher as the only label source (distill.label_ce_weight = 0), the label-only student against
the paper's all-heads student (every head on the pooled [CLS] vector) and the graph-shaped student (a token per
verdict node, the label head reading the verdict heads' probabilities), on configs/base.yaml (one head per
facet) and configs/paper.yaml (heads ms, ma, y). The rule, fixed before the runs: the goal is met on a graph when
the graph-shaped student's macro-F1, averaged over the 3 seeds, is >= the label-only student's on both test
splits; the per-seed differences and the exact sign-flip p are reported with it (3 seeds cannot make p < 0.25).

budget: the default student (configs/base.yaml's distill section: gold-label CE on, all heads) of the seed-0 SFT
teacher at increasing step counts, with the validation curve (the last 1000 RL-pool prompts, never trained on).

Teachers are SFT checkpoints, one per (graph, seed): the masking study's (runs/masking/sft_masked_s<seed> for
base.yaml, paper_sft_loss_s<seed> for paper.yaml: each config's own default SFT, 600 steps) when they exist, else
trained here with the same command. Every student run is `python distill.py CONFIG ...` with one torch thread,
one at a time; a run with an eval.json is finished and skipped, so the study resumes where it stopped. One run
directory per (graph, seed) holds the teacher-signal cache that its students share.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from ablation import mean_std, paired_test  # noqa: E402

GRAPHS = {"base": ("configs/base.yaml", "sft_masked", "ours (one head per facet)"),
          "paper": ("configs/paper.yaml", "paper_sft_loss", "the paper's (heads ms, ma)")}
# every student of the heads study learns its label from the teacher only; the validation curve is logged
COMMON = ("--distill.label_ce_weight=0", "--distill.val_items=1000", "--distill.eval_every=250")
STUDENTS = {
    "label_only": ("label head only", ("--distill.heads=label_only",)),
    "paper": ("all heads on the pooled vector (the paper's student)",
              ("--distill.heads=all", "--distill.node_tokens=false", "--distill.label_from=pooled")),
    "graph": ("graph-shaped: node tokens, the label head reads the verdict heads",
              ("--distill.heads=all", "--distill.node_tokens=true", "--distill.label_from=verdicts")),
}
BUDGETS = (3000, 6000, 12000)
SPLITS = ("test_id", "test_longtail")


def sh(cmd: list[str], log: str) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=ROOT)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"{'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'} in {time.time() - t0:.0f} s: {log}", flush=True)
    return rc


def teacher(args, graph: str, seed: int) -> tuple[str, str]:
    """(teacher checkpoint, data dir) for (graph, seed): the masking study's SFT run, else one trained here."""
    config, row, _ = GRAPHS[graph]
    ckpt = os.path.join(args.teachers, f"{row}_s{seed}", "sft", "checkpoint")
    if os.path.isdir(ckpt):
        return ckpt, os.path.join(args.teachers, "data")
    d = os.path.join(args.out, f"teacher_{graph}_s{seed}")
    data_dir = os.path.join(args.out, "data")
    if not os.path.isfile(os.path.join(d, "sft", "eval.json")):
        print(f"training the teacher {d}", flush=True)
        sh([sys.executable, "sft_mask.py", config, f"--run.out_dir={d}", f"--run.seed={seed}", "--run.device=cpu",
            "--run.num_threads=1", f"--data.dir={data_dir}"], os.path.join(d, "stdout.log"))
    return os.path.join(d, "sft", "checkpoint"), data_dir


def student_dir(args, graph: str, seed: int, name: str) -> str:
    return os.path.join(args.out, f"{graph}_s{seed}", name)


def run_student(args, graph: str, seed: int, name: str, overrides) -> None:
    d = student_dir(args, graph, seed, name)
    if os.path.isfile(os.path.join(d, "eval.json")):
        return
    ckpt, data_dir = teacher(args, graph, seed)
    cmd = [sys.executable, "distill.py", GRAPHS[graph][0], f"--run.out_dir={os.path.dirname(d)}",
           f"--distill.teacher={ckpt}", f"--data.dir={data_dir}", f"--run.seed={seed}", "--run.device=cpu",
           "--run.num_threads=1", "--run.log_every=50", f"--distill.student_dir={d}", *overrides]
    print(f"start {d}", flush=True)
    sh(cmd, os.path.join(d, "stdout.log"))


def jobs(args):
    """(graph, seed, student name, overrides), seed-major: an interrupted study has whole seeds to report."""
    if args.study == "heads":
        for seed in args.seeds:
            for graph in args.graphs:
                for name in args.students:
                    yield graph, seed, name, COMMON + STUDENTS[name][1] + (f"--distill.steps={args.steps}",)
    else:
        for graph in args.graphs:
            for steps in args.budgets:
                yield graph, 0, f"budget_{steps}", ("--distill.val_items=1000", "--distill.eval_every=250",
                                                    f"--distill.steps={steps}")


# ---------------------------------------------------------------- report: pure functions of the run directories
def load(d: str) -> dict | None:
    """{'eval': eval.json, 'val': [(step, val macro-F1)]} of a finished student, else None."""
    if not os.path.isfile(os.path.join(d, "eval.json")):
        return None
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    return {"eval": json.load(open(os.path.join(d, "eval.json"))),
            "val": [(r["step"] + 1, r["val/macro_f1"]) for r in rows if "val/macro_f1" in r]}


def flat_tail(val: list[tuple[int, float]], k: int = 8) -> str:
    """Mean and range of the validation macro-F1 over the last k evaluations: a flat tail says converged."""
    if len(val) < k:
        return "-"
    tail = [v for _, v in val[-k:]]
    return f"{np.mean(tail):.3f} ({min(tail):.3f}-{max(tail):.3f}) from step {val[-k][0]}"


def heads_report(args) -> str:
    out = ["# Distilled students: label-only vs all heads (issue 16)", "",
           f"Made by `python experiments/distill_study.py` ({args.steps} steps, batch 64, lr 1e-3, 19,000 RL-pool "
           f"prompts, the last 1,000 held out for the validation curve; the teacher is the only label source: "
           f"`--distill.label_ce_weight=0`; seeds {args.seeds[0]}-{args.seeds[-1]}, student seed = teacher seed; "
           f"one thread). Teachers: each graph's SFT (600 steps) of the same seed. Macro-F1, mean ± std over seeds.",
           "", "Rule, fixed before the runs: the goal is met on a graph when the graph-shaped student's mean "
           "macro-F1 is >= the label-only student's on both test splits. Differences are paired by seed; p is the "
           "exact sign-flip p (with 3 seeds it cannot go below 0.25).", ""]
    for graph in args.graphs:
        found = {name: {s: load(student_dir(args, graph, s, name)) for s in args.seeds} for name in args.students}
        found = {n: {s: r for s, r in v.items() if r} for n, v in found.items()}
        anyrun = next((r for v in found.values() for r in v.values()), None)
        if anyrun is None:
            continue
        out += [f"## {GRAPHS[graph][2]}: `{GRAPHS[graph][0]}`", "",
                "| model | seeds | test_id macro-F1 | test_longtail macro-F1 | test_id node accuracy (verdict heads) |",
                "|---|---:|---:|---:|---|"]
        teach = {s: r["eval"]["teacher"] for v in found.values() for s, r in v.items()}
        out.append(f"| teacher (SFT, writes its CoT) | {len(teach)} | "
                   + " | ".join(mean_std([t[sp]["macro_f1"] for t in teach.values()]) for sp in SPLITS) + " | - |")
        for name in args.students:
            runs = found[name]
            if not runs:
                continue
            nodes = {}
            for r in runs.values():
                for k, v in r["eval"]["student"]["test_id"]["node_accuracy"].items():
                    if k != "y":
                        nodes.setdefault(k, []).append(v)
            out.append(f"| {STUDENTS[name][0]} | {len(runs)} | "
                       + " | ".join(mean_std([r["eval"]["student"][sp]["macro_f1"] for r in runs.values()])
                                    for sp in SPLITS)
                       + " | " + (", ".join(f"{k} {np.mean(v):.2f}" for k, v in nodes.items()) or "-") + " |")
        out += ["", "| comparison (paired by seed) | split | mean difference | wins / losses | p |", "|---|---|---:|---:|---:|"]
        verdict = []
        for name in [n for n in args.students if n != "label_only"]:
            both = sorted(set(found[name]) & set(found.get("label_only", {})))
            for sp in SPLITS:
                a = [found[name][s]["eval"]["student"][sp]["macro_f1"] for s in both]
                b = [found["label_only"][s]["eval"]["student"][sp]["macro_f1"] for s in both]
                if not both:
                    continue
                t = paired_test(a, b)
                out.append(f"| {STUDENTS[name][0]} - label only | {sp} | {t['mean_diff']:+.3f} | "
                           f"{t['wins']} / {t['losses']} | {t['p']:.2f} |")
                if name == "graph":
                    verdict.append(t["mean_diff"] >= 0)
        if verdict:
            out += ["", f"Goal (graph-shaped >= label only on both splits, mean over {len(both)} seeds): "
                        f"**{'met' if all(verdict) else 'not met'}**.", ""]
    return "\n".join(out) + "\n"


def budget_report(args) -> str:
    out = ["# The default student's budget (issue 16, item 2)", "",
           "Made by `python experiments/distill_study.py --study budget`: the default student of `distill` "
           "(gold-label CE weight 1, all heads) of the seed-0 SFT teacher, 19,000 RL-pool prompts, the last 1,000 "
           "held out for the validation curve (label macro-F1 against gold every 250 steps); the cosine schedule "
           "always ends at the run's last step.", "",
           "| graph | steps | test_id macro-F1 | test_longtail macro-F1 | teacher id / lt | validation macro-F1, "
           "last 8 evaluations: mean (range) |", "|---|---:|---:|---:|---:|---|"]
    for graph in args.graphs:
        for steps in args.budgets:
            r = load(student_dir(args, graph, 0, f"budget_{steps}"))
            if r is None:
                continue
            s, t = r["eval"]["student"], r["eval"]["teacher"]
            out.append(f"| {graph} | {steps} | {s['test_id']['macro_f1']:.3f} | {s['test_longtail']['macro_f1']:.3f} | "
                       f"{t['test_id']['macro_f1']:.3f} / {t['test_longtail']['macro_f1']:.3f} | {flat_tail(r['val'])} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", choices=("heads", "budget"), default="heads")
    ap.add_argument("--seeds", default="0-2", help="first-last (heads study)")
    ap.add_argument("--graphs", default="base,paper")
    ap.add_argument("--students", default=",".join(STUDENTS), help=f"of {list(STUDENTS)}")
    ap.add_argument("--steps", type=int, default=6000, help="student steps of the heads study")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="step counts of the budget study")
    ap.add_argument("--teachers", default="runs/masking", help="the masking study's run directory (its SFT runs)")
    ap.add_argument("--out", default="runs/distill_study/final")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    a, _, b = args.seeds.partition("-")
    args.seeds = list(range(int(a), int(b or a) + 1))
    args.graphs = args.graphs.split(",")
    args.students = args.students.split(",")
    args.budgets = [int(x) for x in args.budgets.split(",")]
    if not args.report_only:
        for graph, seed, name, overrides in jobs(args):
            run_student(args, graph, seed, name, overrides)
    text = heads_report(args) if args.study == "heads" else budget_report(args)
    path = os.path.join(ROOT, "results", "distill.md" if args.study == "heads" else "distill_budget.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
