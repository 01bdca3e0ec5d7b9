"""The SFT step's forward + backward (sft_mask.completion_loss), packed against padded, on the config's own batches.

    python benchmarks/sft_step.py [--config configs/base.yaml] [--init-from CKPT] [--batches 8] [--repeats 5]

Draws --batches SFT batches as sft_mask.train_sft does (the config's masking included), then times the loss's
forward + backward over all of them with policy.token_logprobs packed and padded, alternated --repeats times in
this one process (one thread), and prints both medians, their ratio, the largest gradient difference and the
batches' padding share. Without --init-from the config's tiny model at its initial weights runs (the cost of a
step does not depend on the weights). Nothing is asserted; numbers go to benchmarks/README.md.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import policy  # noqa: E402
import sft_mask  # noqa: E402
import testbed  # noqa: E402
from config import load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/base.yaml")
    ap.add_argument("--init-from", help="a checkpoint (default: the config's tiny model, initial weights)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    cfg = load_config(args.config, ["--run.device=cpu", *overrides])
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(args.init_from or cfg.model.name_or_path or None, task.vocabulary(),
                                    dtype="float32", tiny_kwargs=policy.tiny_kwargs(cfg.model, seed=cfg.run.seed))
    items = sft_mask.encode_sft_examples(task.splits["sft"], tok, task.schema, task.strict)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    batches = []
    for _ in range(args.batches):
        idx = torch.randint(len(items), (cfg.sft.batch_size,), generator=gen).tolist()
        batches.append(sft_mask.sft_batch([items[i] for i in idx], tok, cfg.mask, gen, task.schema.label_slot))
    padding = 1 - sum(int(b[1].sum()) for b in batches) / sum(b[1].numel() for b in batches)
    real = policy.token_logprobs

    def run(packed: bool) -> list[torch.Tensor]:
        policy.token_logprobs = lambda *a, **k: real(*a, **k, packed=packed)
        try:
            for input_ids, attn, targets, comp, keep in batches:
                sft_mask.completion_loss(model, input_ids, attn, targets, comp, keep).backward()
        finally:
            policy.token_logprobs = real
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return grads

    diff = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(run(False), run(True)) if a.abs().max() > 0)
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for packed in (False, True):
            t = time.process_time()
            run(packed)
            times[packed].append(time.process_time() - t)
    padded, packed = statistics.median(times[False]), statistics.median(times[True])
    print(f"# {args.config} {' '.join(overrides)}: {args.batches} batches of {cfg.sft.batch_size}, padding "
          f"{padding:.0%} of the cells; forward + backward CPU s per batch, median of {args.repeats}: padded "
          f"{padded / args.batches:.4f}, packed {packed / args.batches:.4f} ({padded / packed:.2f}x); largest gradient "
          f"difference {diff:.1e} of the tensor's largest entry")


if __name__ == "__main__":
    main()
