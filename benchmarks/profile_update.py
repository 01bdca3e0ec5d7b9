"""The update phase alone (graph_grpo.accumulate_policy_gradient): its CPU seconds on one step's rollouts,
repeated, and its operators under torch.profiler.

    python benchmarks/profile_update.py --init-from CKPT [--repeats 5] [config overrides, e.g. --credit.mode=outcome]
    python benchmarks/profile_update.py --init-from CKPT --against HEAD~1 [--function completion_logprobs_shared_prompt]
    python benchmarks/profile_update.py --init-from CKPT --against HEAD~1 --full-rows 36   # the same, no padding

Runs two RL steps of the trainer (graph_grpo.RL, as profile_step.py builds it) to get real rollouts, keeps the
second step's update inputs, then reruns that update --repeats times (gradients zeroed between; no optimizer step)
and once more under the profiler. With --against REV: policy.py's --function as of git revision REV against
today's, on the same update inputs, alternated --repeats times in this one process: the largest gradient
difference and both medians (the A/B of a change to the update path). Nothing is asserted; numbers go to
benchmarks/README.md with the machine's load.
"""
import argparse
import dataclasses
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
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
    ap.add_argument("--against", metavar="REV", help="A/B: policy.py's --function at this git revision vs today's")
    ap.add_argument("--function", default="completion_logprobs_shared_prompt", help="the policy.py function of --against")
    ap.add_argument("--full-rows", type=int, metavar="T",
                    help="a batch without padding: the rollouts cut to their first T completion columns, every cell real")
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
    if args.full_rows:
        a = (a[0], full_rows(a[1], args.full_rows)) + a[2:]
        a = a[:2] + (a[1].completion_mask.clone(),) + a[3:]  # the loss mask: every cell

    def once():
        update(*a, **k)
        a[0].zero_grad(set_to_none=True)

    ro = a[1]
    if args.against:
        return against(args, lambda: update(*a, **k), a[0], ro, distinct_prefixes(ro, s.cfg.rl.num_generations))
    once()
    times = []
    for _ in range(args.repeats):
        t = time.process_time()
        once()
        times.append(time.process_time() - t)
    print(f"# {args.config} {' '.join(overrides)}: rows x columns {tuple(ro.input_ids.shape)}, "
          f"{int(ro.completion_mask.sum())} completion tokens ({distinct_prefixes(ro, s.cfg.rl.num_generations)} "
          f"distinct prefixes); update CPU s median {statistics.median(times):.3f} "
          f"(of {args.repeats}: {', '.join(f'{x:.3f}' for x in times)})")
    with torch.profiler.profile() as tp:
        once()
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def distinct_prefixes(ro, G: int) -> int:
    """How many tokens the packed update pass feeds for the completions: one per distinct (prompt, completion
    prefix) (policy.shared_prefixes; groups are G consecutive rows)."""
    import policy
    mask = ro.completion_mask.bool()
    return len(policy.shared_prefixes(ro.completion_ids, mask, torch.arange(len(mask)) // G)[1])


def full_rows(ro, T: int):
    """Rollouts ro cut to their first T completion columns with every completion cell marked real (tokens past an
    end of sequence are scored like any other): the same rows without padding, for timing only."""
    P = ro.prompt_len
    cut = lambda t: None if t is None else t[:, :T]  # noqa: E731
    ones = torch.ones_like(ro.completion_mask[:, :T])
    mask = torch.cat([ro.attention_mask[:, :P], ones.to(ro.attention_mask.dtype)], 1)
    return dataclasses.replace(ro, input_ids=ro.input_ids[:, :P + T], attention_mask=mask, completion_mask=ones,
                               adv=cut(ro.adv), old_logp=cut(ro.old_logp), ref_logp=cut(ro.ref_logp))


def against(args, run_update, model, ro, distinct: int):
    """Today's policy.<function> vs the one at git revision args.against, on the same update, alternated."""
    import policy
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "policy_then.py")
        with open(path, "w") as f:
            f.write(subprocess.run(["git", "show", f"{args.against}:policy.py"], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout)
        spec = importlib.util.spec_from_file_location("policy_then", path)
        then_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(then_module)
    now, then = getattr(policy, args.function), getattr(then_module, args.function)
    attention = {now: policy, then: then_module}  # each side's packed attention (registered under one name)

    def use(fn):
        setattr(policy, args.function, fn)
        if hasattr(attention[fn], "packed_attention"):
            policy.AttentionInterface.register(policy.PACKED_ATTENTION, attention[fn].packed_attention)

    def grads(fn):
        use(fn)
        run_update()
        g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return g

    model.zero_grad(set_to_none=True)
    diffs = [float((x - y).abs().max() / x.abs().max()) for x, y in zip(grads(then), grads(now)) if x.abs().max() > 0]
    diff = f"{max(diffs):.1e} of the tensor's largest entry" if diffs else "none to compare (every gradient 0)"
    times = {then: [], now: []}
    for _ in range(args.repeats):
        for fn in (then, now):
            use(fn)
            t = time.process_time()
            run_update()
            times[fn].append(time.process_time() - t)
            model.zero_grad(set_to_none=True)
    use(now)
    t_then, t_now = statistics.median(times[then]), statistics.median(times[now])
    print(f"# rows x columns {tuple(ro.input_ids.shape)}, {int(ro.completion_mask.sum())} completion tokens ({distinct} "
          f"distinct prefixes); "
          f"policy.{args.function} at {args.against} vs today: largest gradient difference {diff}; update CPU s median {t_then:.3f} -> {t_now:.3f} ({t_then / t_now:.2f}x, "
          f"{args.repeats} alternated repetitions)")


if __name__ == "__main__":
    main()
