"""SFT with CoT random masking (DESIGN.md §9): the policy's initialisation before RL.

    python sft_mask.py configs/base.yaml                     # tiny policy on the synthetic testbed (CPU, minutes)
    python sft_mask.py configs/base.yaml --mask.enabled=false   # plain SFT, the ablation's row 1

Teacher forcing on prompt + gold CoT with the loss on the completion only. Random masking corrupts the INPUT
side of the CoT while the targets stay the originals, so the model learns to write later steps from imperfect
earlier ones, which is what it meets at sampling time. Writes <out_dir>/checkpoint (save_pretrained: model +
tokenizer), config.yaml, metrics.jsonl and eval.json under <run.out_dir>/sft/ (the SFT stage's own run
directory; graph_grpo.py starts from <run.out_dir>/sft/checkpoint by default), and prints the evaluation table.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import data
import policy
import testbed
from checkpoint import (Interrupted, StopSignals, config_differences, make_run_dir, refuse_mixing, save_atomically,
                        sft_setting, start_over)
from config import cli, parse_args, save_config
from parallel import barrier


# ----------------------------------------------------------------------------------------------------------
# CoT random masking (DESIGN §9)

def cot_mask_positions(spans: list[tuple[str, int, int]], length: int, p_node: float, p_tok: float,
                       gen: torch.Generator, label: str = "y") -> torch.Tensor:
    """Which completion positions get the mask token as INPUT (DESIGN §9) -> (length,) bool.

    spans: (node name, start, end) with [start, end) covering the node's tags. A whole node's content is masked
    with probability p_node; any other content token with probability p_tok. Choices (DESIGN leaves them open):
    tags are never masked (the policy writes the structure reliably; what is imperfect at sampling time is the
    content), and the label node (`label`) is never masked (it is the output every other step serves).
    """
    mask = torch.zeros(length, dtype=torch.bool)
    for name, start, end in spans:
        if name == label or end - start <= 2:
            continue
        content = slice(start + 1, end - 1)
        if torch.rand((), generator=gen).item() < p_node:
            mask[content] = True
        else:
            mask[content] = torch.rand(end - start - 2, generator=gen) < p_tok
    return mask


def node_spans_of(completion: list[int], vocab: data.TagVocab, schema: data.GraphSchema):
    parsed = data.parse_completion(completion, vocab, schema)
    return [(n, s.start, s.end) for n, s in parsed.nodes.items()]


# ----------------------------------------------------------------------------------------------------------
# Batching: [left pad][prompt][completion + eos][right pad], targets = the original completion tokens

def encode_sft_examples(examples, tokenizer, schema, strict: bool):
    """(prompt ids, completion ids ending with eos, node spans) per example that has a gold CoT."""
    vocab = data.TagVocab.from_tokenizer(tokenizer, schema)
    out = []
    for ex in examples:
        if ex.cot is None:
            continue
        prompt = policy.encode(tokenizer, data.format_prompt(ex.query, ex.product), strict)
        completion = policy.encode(tokenizer, data.serialize_cot(ex.cot, schema), strict) + [tokenizer.eos_token_id]
        out.append((prompt, completion, node_spans_of(completion, vocab, schema)))
    if not out:
        raise ValueError("no SFT example has a gold 'cot' field")
    return out


def sft_batch(items, tokenizer, mask_cfg, gen: torch.Generator, label: str = "y"):
    """-> input_ids, attention_mask, targets (the original ids), completion_mask, loss_mask; all (B, L).

    mask.kind (DESIGN §9): 'input' replaces the drawn positions of the input by the mask token (the targets stay
    the originals: the model learns later steps from imperfect earlier ones); 'loss' drops the drawn positions from
    the loss (the paper's label-priority masking: the label is always supervised); 'both' draws each independently.
    Positions come from cot_mask_positions: never a tag, never the label node."""
    prompts, completions = [p for p, _, _ in items], [c for _, c, _ in items]
    input_ids, attn, comp_mask = policy.build_sequences(prompts, completions, tokenizer.pad_token_id)
    targets, loss_mask = input_ids.clone(), comp_mask.clone()
    if mask_cfg.enabled:
        mask_id = tokenizer.convert_tokens_to_ids(policy.SPECIAL_TOKENS["mask_token"])
        for b, (prompt, completion, spans) in enumerate(items):
            start, end = int(comp_mask[b].nonzero()[0]), int(comp_mask[b].nonzero()[0]) + len(completion)
            draw = lambda: cot_mask_positions(spans, len(completion), mask_cfg.p_node, mask_cfg.p_tok, gen, label)  # noqa: E731
            if mask_cfg.kind in ("input", "both"):
                pos = draw()
                input_ids[b, start:end] = torch.where(pos, torch.full_like(input_ids[b, start:end], mask_id),
                                                      input_ids[b, start:end])
            if mask_cfg.kind in ("loss", "both"):
                loss_mask[b, start:end] &= ~draw()
    return input_ids, attn, targets, comp_mask, loss_mask


def completion_loss(model, input_ids, attn, targets, comp_mask, loss_mask=None) -> torch.Tensor:
    """Token-mean cross-entropy of the original completion tokens given the (possibly masked) inputs, over the
    positions loss_mask keeps (default: every completion token)."""
    loss_mask = comp_mask if loss_mask is None else loss_mask
    logp = policy.token_logprobs(model, input_ids, attn, comp_mask, 1.0, targets=targets).logprobs
    return -(logp * loss_mask).sum() / loss_mask.sum()


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------------------------

def train_sft(cfg, out_dir: str, show_progress: bool = True) -> str:
    """Run SFT per cfg.sft / cfg.mask and save out_dir/checkpoint (atomically). Returns its path. SFT keeps no
    periodic checkpoint: SIGINT / SIGTERM stop it after the current step with nothing saved
    (checkpoint.Interrupted), and it trains from the start when run again."""
    torch.manual_seed(cfg.run.seed)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    device = policy.resolve_device(cfg.run.device)
    task = testbed.load_task(cfg)
    schema = task.schema
    model, tokenizer = policy.load_policy(cfg.model.name_or_path or None, task.vocabulary(),
                                          dtype=policy.resolve_dtype(cfg.run.dtype, device), device=device,
                                          tiny_kwargs=policy.tiny_kwargs(cfg.model, seed=cfg.run.seed),
                                          key="model.name_or_path")
    items = encode_sft_examples(task.splits["sft"], tokenizer, schema, task.strict)
    opt = policy.adamw(model.parameters(), cfg.sft.lr, cfg.sft.weight_decay)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "metrics.jsonl"), "w")  # SFT always starts at step 0
    model.train()
    bar = tqdm(range(cfg.sft.steps), desc="sft", disable=not show_progress)
    t0, tokens = time.time(), 0
    with StopSignals() as stop:
        for step in bar:
            if stop.signum:
                log.close()
                raise Interrupted(stop.signum, f"SFT interrupted by {stop.name(stop.signum)} after step {step} of "
                                               f"{cfg.sft.steps}: SFT keeps no periodic checkpoint, nothing was "
                                               f"saved; the same command trains it again from the start")
            idx = torch.randint(len(items), (cfg.sft.batch_size,), generator=gen).tolist()
            input_ids, attn, targets, comp, keep = [t.to(device) for t in sft_batch([items[i] for i in idx], tokenizer,
                                                                                    cfg.mask, gen, schema.label_slot)]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.sft.steps, cfg.sft.warmup, cfg.sft.lr)
            with policy.autocast(cfg.run.dtype, device):
                loss = completion_loss(model, input_ids, attn, targets, comp, keep)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.sft.grad_clip or float("inf"))  # 0: no clip
            opt.step()
            tokens += int(comp.sum())
            if step % cfg.sft.log_every == 0 or step == cfg.sft.steps - 1:
                rec = {"step": step, "sft/loss": loss.item(), "grad_norm": float(grad_norm),
                       "lr": opt.param_groups[0]["lr"], "tokens_per_s": tokens / (time.time() - t0)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    log.close()
    model.eval()
    return save_atomically(os.path.join(out_dir, "checkpoint"), lambda d: policy.save_policy(model, tokenizer, d))


def run_sft(cfg, out_dir: str, print_table: bool = True) -> str:
    """The SFT stage as a run directory: config.yaml, metrics.jsonl, checkpoint/, eval.json (DESIGN §7, §9).

    With run.resume (the default), a finished stage is reused and evaluated again when it was made with the same
    SFT settings (checkpoint.SFT_KEYS) and refused in one line naming the keys when not: a resume never mixes runs.
    A stage without a checkpoint (stopped before its end: SFT keeps no periodic one), or --no-resume, trains
    from the start and replaces what was there."""
    import eval as evaluation
    ckpt = os.path.join(out_dir, "checkpoint")
    if cfg.run.resume and os.path.isdir(ckpt):
        refuse_mixing(cfg, out_dir, "its SFT checkpoint", sft_setting)
        print(f"reusing the SFT checkpoint {ckpt} (made with the same SFT settings; --no-resume trains it again)")
    else:
        make_run_dir(out_dir)
        start_over(out_dir)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        ckpt = train_sft(cfg, out_dir)
        print(f"saved SFT checkpoint to {ckpt}")
    evaluation.evaluate_run(cfg, ckpt, out_dir, print_table=print_table)
    return ckpt


def ensure_sft(cfg, master: bool, world: int) -> str:
    """The checkpoint RL starts from (graph_grpo.train calls it on every rank): rl.init_from, or <out_dir>/sft/checkpoint, made by the SFT stage if missing.
    An SFT stage there made with other SFT settings (checkpoint.SFT_KEYS) is refused, or with --no-resume trained
    again (DESIGN §7: a resume never mixes runs)."""
    if cfg.rl.init_from:
        if not os.path.isdir(cfg.rl.init_from):
            raise FileNotFoundError(f"rl.init_from = {cfg.rl.init_from}: no such checkpoint directory")
        return cfg.rl.init_from
    sft_dir = os.path.join(cfg.run.out_dir, "sft")
    init_from = os.path.join(sft_dir, "checkpoint")
    if os.path.isdir(init_from):
        if cfg.run.resume:
            refuse_mixing(cfg, sft_dir, "its SFT checkpoint", sft_setting)
            return init_from
        if not config_differences(cfg, sft_dir, sft_setting):
            return init_from
    if master:
        print(f"no SFT checkpoint of these settings at {init_from}: running the SFT stage first (sft_mask.py)")
        run_sft(cfg, sft_dir)
    barrier(world)
    return init_from


def main(argv=None):
    cfg, _ = parse_args(sys.argv[1:] if argv is None else argv)
    cli(lambda: run_sft(cfg, os.path.join(cfg.run.out_dir, "sft")))


if __name__ == "__main__":
    main()
