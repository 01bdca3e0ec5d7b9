"""Pairs per second: the distilled student (one encoder forward per batch) against its generative teacher.

    python benchmarks/distill_throughput.py --teacher runs/base/sft/checkpoint --student runs/base/student \
        [--pairs 512] [--repeats 5] [--batch-size 128] [--threads 1] [--section.key=value ...]

Both models label the same pairs on the same machine with the same batch size: the first --pairs (query,
product) pairs of the run's test splits (half from test_id, half from test_longtail; the run's config is the
teacher's, as eval.find_run locates it, or --config). The teacher's cost of a label is its greedy CoT
(eval.generate_greedy, eval.max_new_tokens from the config); the student's is distill.score_pairs. One untimed
warm-up batch each, then --repeats timed passes over all pairs, alternating teacher and student (A B A B) so that
a shared, noisy machine treats both alike. Prints the median pairs/s of each and their ratio. Nothing here is
asserted: numbers are measured and printed.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import testbed  # noqa: E402
import distill  # noqa: E402
import eval as evaluation  # noqa: E402
import policy  # noqa: E402
from config import load_config  # noqa: E402


def benchmark_pairs(task, n: int):
    """(split names, examples): the first n // S examples of each of the S test splits (test_id, test_longtail),
    the first split taking the remainder."""
    names = list(task.tests)
    per = [n - n // len(names) * (len(names) - 1)] + [n // len(names)] * (len(names) - 1)
    return names, [ex for name, k in zip(names, per) for ex in task.tests[name][:k]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="teacher checkpoint (a run directory or a checkpoint inside one)")
    ap.add_argument("--student", required=True, help="student directory (distill.save_student)")
    ap.add_argument("--config", help="config YAML (default: the teacher's run config.yaml)")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per model")
    ap.add_argument("--batch-size", type=int, help="both models (default: the config's eval.batch_size)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    args, overrides = ap.parse_known_args()
    teacher_arg, args.student = os.path.abspath(args.teacher), os.path.abspath(args.student)

    config_path, checkpoint = (os.path.abspath(args.config), teacher_arg) if args.config else \
        evaluation.find_run(teacher_arg)
    cfg = load_config(config_path, overrides)
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the run's relative data.dir is relative to the repository root
    device = policy.resolve_device(cfg.run.device)
    batch_size = args.batch_size or cfg.eval.batch_size
    task = testbed.load_task(cfg)
    schema, strict = task.schema, task.strict
    split_names, examples = benchmark_pairs(task, args.pairs)
    pairs = [(ex.query, ex.product) for ex in examples]

    teacher, t_tok = policy.load_policy(checkpoint, schema.words(), dtype=cfg.run.dtype, device=device)
    student, s_tok = distill.load_student(args.student, device)
    teacher.eval()

    def run_teacher(exs):
        with policy.autocast(cfg.run.dtype, device):
            return evaluation.generate_greedy(teacher, t_tok, exs, batch_size, cfg.eval.max_new_tokens, strict)

    def run_student(ps):
        return distill.score_pairs(student, s_tok, ps, batch_size)

    run_teacher(examples[:batch_size])  # warm-up, untimed
    run_student(pairs[:batch_size])
    seconds, outputs = {"teacher": [], "student": []}, {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for who, fn, inputs in (("teacher", run_teacher, examples), ("student", run_student, pairs)):
                t0 = time.perf_counter()
                outputs[who] = fn(inputs)
                seconds[who].append(time.perf_counter() - t0)
    rate = {who: statistics.median(len(pairs) / s for s in secs) for who, secs in seconds.items()}
    mean_len = sum(map(len, outputs["teacher"])) / max(1, len(outputs["teacher"]))

    print(f"{datetime.date.today()}  {platform.node()}  device={device}  torch={torch.__version__}  "
          f"threads={torch.get_num_threads()}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    print(f"teacher {checkpoint} (greedy CoT, max_new_tokens={cfg.eval.max_new_tokens}, "
          f"mean CoT length {mean_len:.1f} tokens); student {args.student} "
          f"(heads {list(student.classes)})")
    print(f"{len(pairs)} pairs (first of {', '.join(split_names)}), batch size {batch_size}, "
          f"{args.repeats} repeats each, alternated teacher/student")
    print("| model | median pairs/s | min pairs/s | max pairs/s |")
    print("|---|---:|---:|---:|")
    for who, secs in seconds.items():
        r = [len(pairs) / s for s in secs]
        print(f"| {who} | {rate[who]:.1f} | {min(r):.1f} | {max(r):.1f} |")
    print(f"student / teacher throughput: {rate['student'] / rate['teacher']:.1f}x")


if __name__ == "__main__":
    main()
