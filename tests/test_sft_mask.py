"""sft_mask.py: CoT random masking statistics and the SFT batch (DESIGN §9)."""
import types

import torch

import data
import policy
import testbed
import sft_mask

SCHEMA = data.GraphSchema()


def _items(n=200, seed=3):
    splits = testbed.generate_splits(SCHEMA, seed, n, 0, 0, 0, 0.05, 0.5)
    tok = policy.build_word_tokenizer(testbed.vocabulary(SCHEMA))
    return tok, sft_mask.encode_sft_examples(splits["sft"], tok, SCHEMA, strict=True)


def test_mask_rates_within_tolerance_and_label_never_masked():
    gen = torch.Generator().manual_seed(0)
    spans = [("q", 0, 10), ("p", 10, 20), ("f:brand", 20, 25), ("y", 25, 28)]
    node_hits, tok_hits, tok_total = 0, 0, 0
    trials = 4000
    for _ in range(trials):
        m = sft_mask.cot_mask_positions(spans, 28, p_node=0.2, p_tok=0.1, gen=gen)
        assert not m[25:28].any()                      # label span never masked
        assert not m[[0, 9, 10, 19, 20, 24]].any()     # tags never masked
        for _, s, e in spans[:3]:
            content = m[s + 1:e - 1]
            if content.all():
                node_hits += 1
            else:
                tok_hits += int(content.sum())
                tok_total += content.numel()
    p_all = node_hits / (3 * trials)
    # a whole node is masked with p_node, plus the tiny chance that p_tok masks every token of it
    assert abs(p_all - 0.2) < 0.02, p_all
    assert abs(tok_hits / tok_total - 0.1) < 0.01


def test_batch_targets_are_the_originals_and_mask_only_touches_inputs():
    tok, items = _items()
    gen = torch.Generator().manual_seed(1)
    on = types.SimpleNamespace(enabled=True, kind="input", p_node=0.5, p_tok=0.2)
    off = types.SimpleNamespace(enabled=False, kind="input", p_node=0.5, p_tok=0.2)
    ids_on, attn_on, tgt_on, comp_on, keep_on = sft_mask.sft_batch(items[:16], tok, on, gen)
    ids_off, attn_off, tgt_off, comp_off, keep_off = sft_mask.sft_batch(items[:16], tok, off, gen)
    assert torch.equal(tgt_on, tgt_off) and torch.equal(attn_on, attn_off) and torch.equal(comp_on, comp_off)
    assert torch.equal(keep_on, comp_on) and torch.equal(keep_off, comp_off)  # input masking keeps every target
    assert torch.equal(tgt_off, ids_off)     # without masking the inputs are the targets
    mask_id = tok.convert_tokens_to_ids("<mask>")
    changed = ids_on != ids_off
    assert changed.any()
    assert (ids_on[changed] == mask_id).all()
    # only completion positions change; prompt and padding untouched
    assert comp_on.bool()[changed].all()
    assert int(comp_on.sum()) == sum(len(c) for _, c, _ in items[:16])


def test_lr_schedule():
    assert sft_mask.lr_at(0, 100, 10, 1.0) == 0.1
    assert abs(sft_mask.lr_at(10, 100, 10, 1.0) - 1.0) < 1e-9
    assert abs(sft_mask.lr_at(100, 100, 10, 1.0) - 0.1) < 1e-9


def _tiny_cfg(tmp_path, *overrides):
    from config import load_config
    return load_config("configs/tiny.yaml", [f"--run.out_dir={tmp_path}", f"--data.dir={tmp_path}/data", *overrides])


def test_sft_smoke_run_is_clearly_above_chance(tmp_path):
    """A small policy learns the CoT format and beats chance (0.25 on 4 balanced labels) in seconds."""
    import eval as evaluation
    cfg = _tiny_cfg(tmp_path, "--model.hidden_size=64", "--model.num_layers=2", "--model.intermediate_size=128",
                    "--data.n_sft=1000", "--sft.steps=600", "--sft.lr=3e-3", "--sft.warmup=20")
    ckpt = sft_mask.train_sft(cfg, str(tmp_path / "sft"), show_progress=False)
    res = evaluation.evaluate_run(cfg, ckpt, str(tmp_path / "sft"), print_table=False)
    assert res["test_id"]["format_valid"] > 0.8, res["test_id"]
    assert res["test_id"]["accuracy"] > 0.5, res["test_id"]
    assert (tmp_path / "sft" / "eval.json").exists()


def test_sft_starts_from_a_local_hf_checkpoint_through_model_name_or_path(tmp_path):
    """Any local causal LM loads through the same path: a Llama-architecture checkpoint with a tokenizer that
    lacks the graph tags gets them added as single tokens, then trains."""
    from transformers import LlamaConfig, LlamaForCausalLM
    schema = data.GraphSchema()
    words = [w for w in testbed.vocabulary(schema) if not w.startswith("<")]   # no tags: the loader must add them
    tok = policy.build_word_tokenizer(words)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    src = tmp_path / "llama"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    cfg = _tiny_cfg(tmp_path, f"--model.name_or_path={src}", "--sft.steps=2")
    ckpt = sft_mask.train_sft(cfg, str(tmp_path / "sft"), show_progress=False)
    loaded, ltok = policy.load_policy(ckpt, [])
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert len(policy.encode(ltok, "<f:brand> nike </f:brand>", strict=True)) == 3


def test_loss_masking_drops_reasoning_tokens_never_the_label_or_tags():
    """mask.kind 'loss' (the paper's label-priority masking): the inputs stay, masked content positions leave the
    loss, the label node and every tag stay supervised; 'both' does both with independent draws."""
    tok, items = _items()
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    gen = torch.Generator().manual_seed(2)
    cfg = types.SimpleNamespace(enabled=True, kind="loss", p_node=0.5, p_tok=0.2)
    ids, attn, tgt, comp, keep = sft_mask.sft_batch(items[:16], tok, cfg, gen)
    assert torch.equal(ids, tgt)                          # no input corruption
    dropped = comp.bool() & ~keep.bool()
    assert dropped.any() and not (keep.bool() & ~comp.bool()).any()
    assert not any(int(t) in vocab.id_to_tag for t in tgt[dropped])   # tags stay in the loss
    for b, (_, completion, spans) in enumerate(items[:16]):             # the label node's span stays in the loss
        start = int(comp[b].nonzero()[0])
        (ys, ye), = [(s0, e0) for name, s0, e0 in spans if name == SCHEMA.label_slot]
        assert keep[b, start + ys:start + ye].all()
    both = types.SimpleNamespace(enabled=True, kind="both", p_node=0.5, p_tok=0.2)
    ids_b, _, tgt_b, comp_b, keep_b = sft_mask.sft_batch(items[:16], tok, both, gen)
    masked_in, dropped_b = ids_b != tgt_b, comp_b.bool() & ~keep_b.bool()
    assert masked_in.any() and dropped_b.any() and not torch.equal(masked_in, dropped_b)
