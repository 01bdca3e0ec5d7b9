"""The update phase alone (graph_grpo.accumulate_policy_gradient): its CPU seconds on one step's rollouts,
repeated, and its operators under torch.profiler.

    python benchmarks/profile_update.py --init-from CKPT [--repeats 5] [config overrides, e.g. --credit.mode=outcome]

Runs two RL steps of the trainer (graph_grpo.RL, as profile_step.py builds it) to get real rollouts, keeps the
second step's update inputs, then reruns that update --repeats times (gradients zeroed between; no optimizer step)
and once more under the profiler. Nothing is asserted; numbers go to benchmarks/README.md with the machine's load.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import graph_grpo as gg  # noqa: E402
import profile_step as ps  # noqa: E402



def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/base.yaml")
    ap.add_argument("--init-from", required=True, help="an SFT checkpoint")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=20)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    s = ps.build(args.config, args.init_from, overrides)
    captured = {}
    update = gg.accumulate_policy_gradient

    def keep_inputs(*a, **k):
        captured["args"], captured["kwargs"] = a, k
        return update(*a, **k)

    gg.accumulate_policy_gradient = keep_inputs
    gg.rl_step(s, 0)
    gg.rl_step(s, 1)
    gg.accumulate_policy_gradient = update
    a, k = captured["args"], captured["kwargs"]

    def once():
        update(*a, **k)
        a[0].zero_grad(set_to_none=True)

    ro = a[1]
    once()
    times = []
    for _ in range(args.repeats):
        t = time.process_time()
        once()
        times.append(time.process_time() - t)
    print(f"# {args.config} {' '.join(overrides)}: rows x columns {tuple(ro.input_ids.shape)}, "
          f"{int(ro.completion_mask.sum())} completion tokens; update CPU s median {statistics.median(times):.3f} "
          f"(of {args.repeats}: {', '.join(f'{x:.3f}' for x in times)})")
    with torch.profiler.profile() as tp:
        once()
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
