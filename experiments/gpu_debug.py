import torch, types, data, policy, sft_mask, config
cfg = config.load_config("configs/tiny.yaml", ["--data.dir=/tmp/dd"])
schema, splits = data.load_splits(cfg)
for mode in ["fp32", "bf16", "autocast"]:
    for attn in ["sdpa", "eager"]:
        torch.manual_seed(0)
        tok = policy.build_word_tokenizer(data.vocabulary(schema))
        m = policy.build_tiny_model(len(tok), 0, 2, 3, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
        m.config._attn_implementation = attn
        m = m.cuda().to(torch.bfloat16 if mode == "bf16" else torch.float32)
        items = sft_mask.encode_sft_examples(splits["sft"], tok, schema, True)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        losses = []
        for step in range(4):
            ids, attn_m, tgt = sft_mask.sft_batch(items[:16], tok, types.SimpleNamespace(enabled=False), g)
            ids, attn_m, tgt = ids.cuda(), attn_m.cuda(), tgt.cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=(mode == "autocast")):
                pos = (attn_m.cumsum(-1) - 1).clamp(min=0)
                logits = m(input_ids=ids, attention_mask=attn_m, position_ids=pos).logits
            nan_rows = torch.isnan(logits.float()).any(-1)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), tgt[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(); loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            losses.append((round(loss.item(), 3), int(nan_rows.sum()), int((attn_m == 0).sum()), round(float(gn), 3)))
        print(mode, attn, losses, flush=True)
