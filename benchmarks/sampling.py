"""policy.sample's two engines side by side: the hand-written decoder (decoder.py) against the model's own forward.

    python benchmarks/sampling.py --init-from /tmp/bench_sft/sft/checkpoint            # 16 prompts x 8, 64 tokens
    python benchmarks/sampling.py --init-from models/smollm2-135m --config configs/smollm2.yaml --prompts 4 --samples 4

The prompts are the first --prompts of the config's RL split; each repetition runs both engines on the same
prompts and seed, alternated, and records process CPU seconds. Prints the medians, their ratio and whether the two
engines wrote the same completions (they may differ where two tokens tie to float rounding).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import policy  # noqa: E402
import testbed  # noqa: E402
from config import load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", required=True, help="a checkpoint or model folder")
    ap.add_argument("--config", default="configs/base.yaml")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    cfg = load_config(args.config, ["--run.device=cpu"])
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(args.init_from, task.schema.words(), dtype=cfg.run.dtype)
    prompts = [policy.encode(tok, data.format_prompt(ex.query, ex.product), task.strict)
               for ex in task.splits["rl"][:args.prompts]]
    times = {"hf": [], "decoder": []}
    same = []
    for r in range(args.repeats):
        out = {}
        for engine in times:
            t = time.process_time()
            out[engine] = policy.sample(model, prompts, args.samples, args.max_new_tokens, cfg.rl.temperature,
                                        tok.eos_token_id, tok.pad_token_id, seed=r, engine=engine)
            times[engine].append(time.process_time() - t)
        same.append(sum(a == b for a, b in zip(out["hf"], out["decoder"])) / len(out["hf"]))
    tokens = sum(map(len, out["hf"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# {args.init_from}: {args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens "
          f"({tokens} in the last repetition), {args.threads} thread(s), {args.repeats} alternated repetitions")
    for k, v in times.items():
        print(f"{k:8s} median {med[k]:.3f} CPU s  [{min(v):.3f}-{max(v):.3f}]")
    print(f"hf / decoder: {med['hf'] / med['decoder']:.2f}x; identical completions: {statistics.mean(same):.1%}")


if __name__ == "__main__":
    main()
