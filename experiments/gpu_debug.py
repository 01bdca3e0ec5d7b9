"""CUDA numerics check of the SFT step (why README says fp32 master weights + bf16 autocast):
PYTHONPATH=. python experiments/gpu_debug.py   prints, per setting, (loss, NaN logits, grad norm) for 4 steps."""
import types

import torch

import config
import data
import policy
import sft_mask

cfg = config.load_config("configs/base.yaml", ["--data.dir=/tmp/dd", "--data.n_rl=100"])
schema, splits = data.load_splits(cfg)
words = data.vocabulary(schema, sum(splits.values(), []))
for name, over in [("base autocast", {}), ("no mask", {"mask": False}), ("hidden64", {"hidden": 64}),
                   ("eager attn", {"attn": "eager"}), ("fp32 no autocast", {"amp": False}), ("batch16", {"bs": 16})]:
    torch.manual_seed(0)
    kw = policy.tiny_kwargs(cfg.model)
    kw["hidden_size"] = over.get("hidden", kw["hidden_size"])
    model, tok = policy.load_policy(None, words, dtype="auto", device="cuda", tiny_kwargs=kw)
    if "attn" in over:
        model.config._attn_implementation = over["attn"]
    items = sft_mask.encode_sft_examples(splits["sft"], tok, schema, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    mcfg = types.SimpleNamespace(enabled=over.get("mask", True), p_node=0.15, p_tok=0.05)
    out = []
    for step in range(4):
        idx = torch.randint(len(items), (over.get("bs", 32),), generator=gen).tolist()
        ids, attn, tgt, comp = [t.cuda() for t in sft_mask.sft_batch([items[i] for i in idx], tok, mcfg, gen)]
        tgt = torch.where(comp.bool(), tgt, torch.full_like(tgt, -100))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=over.get("amp", True)):
            pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        nan = int(torch.isnan(logits.float()).any(-1).sum())
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                 tgt[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        out.append((round(loss.item(), 3), nan, round(gn, 3)))
    print(name, out, flush=True)

# the same step through policy.token_logprobs (rolls left padding to the right before the forward)
torch.manual_seed(0)
model, tok = policy.load_policy(None, words, dtype="auto", device="cuda", tiny_kwargs=policy.tiny_kwargs(cfg.model))
items = sft_mask.encode_sft_examples(splits["sft"], tok, schema, True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
gen = torch.Generator().manual_seed(0)
out = []
for step in range(6):
    idx = torch.randint(len(items), (32,), generator=gen).tolist()
    batch = [items[i] for i in idx]
    ids, attn, comp = policy.build_sequences([b[0] for b in batch], [b[1] for b in batch], tok.pad_token_id, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp = policy.token_logprobs(model, ids, attn, comp, 1.0).logprobs
    loss = -(lp * comp).sum() / comp.sum()
    opt.zero_grad()
    loss.backward()
    out.append((round(loss.item(), 3), round(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)), 3)))
    opt.step()
print("token_logprobs autocast", out, flush=True)
