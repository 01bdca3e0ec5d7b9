"""policy.py: tokenizer and checkpoint round trips, log-probs under left padding, sampling equal
to the per-row reference, sampling distribution, pretrained checkpoints of another architecture."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

import decoder
import policy as P

WORDS = ["<q>", "</q>", "<p>", "</p>", "<f:brand>", "</f:brand>", "<y>", "</y>", "brand", "nike", "adidas",
         "match", "mismatch", "red"]
TEXT = "<q> brand nike </q> <p> brand adidas </p> <f:brand> nike adidas mismatch </f:brand> <y> mismatch </y>"


def tiny(words=WORDS, seed=0, **kw):
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=seed, **kw)
    return P.load_policy(None, words, "float32", "cpu", kw)


def sharp(model):
    """At init (std 0.02) attention is near uniform and positions barely matter; sharpen it so a
    wrong position id or a wrong mask changes the samples."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                param.mul_(30)
    return model


def policy_model(arch, seed):
    """(model, tokenizer) of a tiny Qwen2 (RoPE, q/k/v biases), Llama (tied embeddings, one key/value head for
    four query heads, another rope base) or GPT-2 (absolute positions: wrong position ids under left padding change
    every logit) over WORDS."""
    model, tok = tiny(seed=seed)
    if arch == "llama":
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=1, intermediate_size=48,
                                             tie_word_embeddings=True, rope_theta=500.0, max_position_embeddings=64,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    if arch == "gpt2":
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    return sharp(model).eval(), tok


# -----------------------------------------------------------------------------
# tokenizer


def test_word_tokenizer_ids_are_specials_then_sorted_words():
    tok = P.build_word_tokenizer(["b", "a", "<q>", "a"])
    assert [tok.convert_ids_to_tokens(i) for i in range(len(tok))] == \
        ["<pad>", "<unk>", "<bos>", "<eos>", "<mask>", "<q>", "a", "b"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert P.encode(tok, "<q>  a\tb", strict=True) == [5, 6, 7]
    assert tok.decode([5, 6, 7]) == "<q> a b"


def test_tokenizer_round_trip_and_strict_encode(tmp_path):
    tok = P.build_word_tokenizer(WORDS)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    ids = P.encode(tok, TEXT, strict=True)
    assert P.encode(loaded, TEXT, strict=True) == ids
    assert len(ids) == len(TEXT.split())  # every tag is one token
    assert loaded.decode(ids) == TEXT
    for name in ("pad", "unk", "bos", "eos", "mask"):
        assert getattr(loaded, f"{name}_token_id") == getattr(tok, f"{name}_token_id")

    with pytest.raises(ValueError, match="puma"):
        P.encode(loaded, "brand puma nike", strict=True)
    ids = P.encode(loaded, "brand puma nike zzz", strict=False)
    assert P.count_unknown(loaded, ids) == 2


# -----------------------------------------------------------------------------
# model loading


def test_build_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = P.build_tiny_model(20, 0, 2, 3, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                           intermediate_size=32, seed=7)
    assert torch.rand(1) == before
    b = P.build_tiny_model(20, 0, 2, 3, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                           intermediate_size=32, seed=7)
    c = P.build_tiny_model(20, 0, 2, 3, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                           intermediate_size=32, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    assert (a.config.pad_token_id, a.config.bos_token_id, a.config.eos_token_id) == (0, 2, 3)


def test_model_round_trip_through_load_policy(tmp_path):
    model, tok = tiny()
    P.save_policy(model, tok, str(tmp_path))
    model2, tok2 = P.load_policy(str(tmp_path), WORDS, "float32", "cpu", None)
    assert tok2.get_vocab() == tok.get_vocab()
    assert type(model2).__name__ == "Qwen2ForCausalLM"
    # next to a Qwen2 config.json, AutoTokenizer alone would pick Qwen2Tokenizer and encode to []
    assert P.encode(tok2, TEXT, strict=True) == P.encode(tok, TEXT, strict=True)
    assert tok2.decode(P.encode(tok2, TEXT, strict=True)) == TEXT
    ids = torch.tensor([P.encode(tok, TEXT, strict=True)])
    assert torch.equal(model(input_ids=ids).logits, model2(input_ids=ids).logits)


def test_load_policy_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        P.load_policy(missing, WORDS, "float32", "cpu", None)


def test_load_policy_pretrained_other_architecture_gets_tags_as_single_tokens(tmp_path):
    # A "pretrained" Llama with its own word-level tokenizer: no tags, no mask, no pad.
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "brand", "nike", "adidas", "<", ">", "q"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    llama_tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config)
    llama.save_pretrained(tmp_path)
    llama_tok.save_pretrained(tmp_path)
    old_ids = torch.tensor([[3, 4, 5]])
    old_logits = llama(input_ids=old_ids).logits

    model, tok = P.load_policy(str(tmp_path), WORDS, "float32", "cpu", None)
    assert type(model).__name__ == "LlamaForCausalLM"
    tags = [w for w in WORDS if P.is_tag_token(w)]
    assert len(tags) == 8
    assert len(tok) == len(vocab) + len(tags) + 1  # tags + <mask>
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    ids = P.encode(tok, "<q> brand nike </q> <f:brand> adidas </f:brand>", strict=True)
    assert len(ids) == 7 and all(i >= len(vocab) for i in (ids[0], ids[3], ids[4], ids[6]))
    assert tok.decode(ids).split() == "<q> brand nike </q> <f:brand> adidas </f:brand>".split()
    assert tok.mask_token == "<mask>" and tok.pad_token_id == tok.eos_token_id == 2
    assert model.config.pad_token_id == 2
    # old rows untouched by the resize; new ids run through the model
    assert torch.allclose(model(input_ids=old_ids).logits[..., :len(vocab)], old_logits, atol=1e-6)
    assert model(input_ids=torch.tensor([ids])).logits.shape == (1, 7, len(tok))


def test_adamw_is_fused_on_plain_parameters_and_steps_as_the_default():
    """policy.adamw: fused on CPU parameters, the same three steps as torch's default AdamW to float rounding, and a
    state dict that loads into the default implementation (checkpoints of either resume the other).
    Tolerance: 5e-5 = 0.5% of one step (lr 1e-2). Where a gradient entry is near zero, Adam's m / (sqrt(v) + eps)
    amplifies rounding: fused and foreach differ from the per-tensor loop by 4.9e-6 on an AVX512 CPU (1e-6 passed
    on the machine that wrote this test, failed on CI's and on this one). Real differences are far larger: weight
    decay 0 in one of them gives 3.4e-3, betas (0.9, 0.99) 4.0e-4, eps 1e-6 2.4e-2."""
    model_a, tok = tiny(seed=8)
    model_b, _ = tiny(seed=8)
    opt_a = P.adamw(model_a.parameters(), 1e-2, 0.1)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert opt_a.defaults["fused"] and not opt_b.defaults["fused"]
    for step in range(3):
        for m, opt in ((model_a, opt_a), (model_b, opt_b)):
            torch.manual_seed(step)
            m(input_ids=torch.randint(0, len(tok), (2, 5))).logits.square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5)
    opt_b.load_state_dict(opt_a.state_dict())
    opt_a.load_state_dict(opt_b.state_dict())


def test_resolve_dtype():
    assert P.resolve_dtype("auto", "cpu") == torch.float32
    assert P.resolve_dtype("auto", "cuda") == torch.float32   # fp32 master weights; bf16 via autocast
    assert not P.autocast("auto", "cpu")._enabled if hasattr(P.autocast("auto", "cpu"), "_enabled") else True
    assert P.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="float33"):
        P.resolve_dtype("float33", "cpu")


# -----------------------------------------------------------------------------
# log-probs


def test_build_sequences_layout():
    ids, attn, comp = P.build_sequences([[5, 6], [7]], [[8], [9, 10], [11, 12], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 0], [5, 6, 9, 10], [0, 7, 11, 12], [0, 7, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0]]
    assert comp.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert P.position_ids_from_mask(attn).tolist() == [[0, 1, 2, 2], [0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 0, 0]]


TOKEN_CASES = [
    ([[5, 6, 7, 8, 9], [10], [11, 12, 13]], [[14, 15, 3], [16, 17, 18, 5, 6], [7]]),
    ([[5, 6, 7], [8, 9, 10]], [[11], [12, 13, 14]]),  # no left pad: logits are kept from column 2 on only
    ([[5, 6, 7], [8, 9, 10]], [[11, 12], [13, 14]]),  # no padding at all: the packed pass feeds every cell
    # rows 0 and 2 start alike (5 6 7 11): their common prefix runs once; row 1 shares 5 6 with both
    ([[5, 6, 7], [5, 6, 8], [5, 6, 7]], [[11, 12], [13], [11, 14, 9]]),
]


def test_shared_prefixes_by_hand():
    """Rows 0, 1, 3 start 1 2 (row 3 under another root; row 1 has 2 fed cells), row 2 is 1 5 3: prefixes a = (r0, 1),
    b = (r0, 1 2), c = (r0, 1 2 3), e = (r0, 1 5), f = (r0, 1 5 3) (not c: its second token differs), g h i = row
    3's, numbered by first cell."""
    ids = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 3], [1, 2, 3]])
    fed = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    node, first = P.shared_prefixes(ids, fed, torch.tensor([0, 0, 0, 1]))
    assert node.tolist() == [[0, 1, 2], [0, 1, -1], [0, 3, 4], [5, 6, 7]]
    assert first.tolist() == [0, 1, 2, 7, 8, 9, 10, 11]
    node, first = P.shared_prefixes(ids, fed, torch.arange(4))  # every row its own root: nothing shared
    assert node.tolist() == [[0, 1, 2], [3, 4, -1], [5, 6, 7], [8, 9, 10]]
    assert first.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    node, first = P.shared_prefixes(ids, torch.zeros_like(fed), torch.zeros(4, dtype=torch.long))
    assert bool((node == -1).all()) and first.tolist() == []


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("prompts, completions", TOKEN_CASES)
def test_token_logprobs_with_padding_equals_naive_per_row_forward(arch, prompts, completions, packed):
    model, tok = policy_model(arch, seed=3)
    T = 0.7
    ids, attn, comp = P.build_sequences(prompts, completions, tok.pad_token_id)
    out = P.token_logprobs(model, ids, attn, comp, T, return_entropy=True, return_hidden=True, packed=packed)
    assert out.logprobs.shape == ids.shape and out.entropy.shape == ids.shape
    assert out.hidden.shape == ids.shape + (32,) and out.logits.shape == ids.shape + (len(tok),)
    assert torch.all(out.logprobs[comp == 0] == 0) and torch.all(out.entropy[comp == 0] == 0)
    assert torch.all(out.logprobs[comp == 1] < 0)

    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor([p + c])
        logp_all = torch.log_softmax(model(input_ids=seq).logits[0].double() / T, -1)  # (len, V)
        want = logp_all[len(p) - 1:-1].gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        want_entropy = -(logp_all.exp() * logp_all).sum(-1)[len(p) - 1:-1]
        got = out.logprobs[i][comp[i] == 1]
        got_entropy = out.entropy[i][comp[i] == 1]
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=0)
        assert torch.allclose(got_entropy.double(), want_entropy, atol=1e-5, rtol=0)
    # hidden states are the lm-head input of the same prediction; logits are tempered
    lm = model.get_output_embeddings().weight
    sel = comp == 1
    assert torch.allclose(out.hidden[sel] @ lm.T / T, out.logits[sel], atol=1e-5)
    assert torch.allclose(torch.log_softmax(out.logits[sel], -1).gather(-1, ids[sel][:, None]).squeeze(-1),
                          out.logprobs[sel], atol=1e-6)


@pytest.mark.parametrize("with_entropy", [True, False])
def test_target_logprobs_equal_log_softmax_and_gather(with_entropy):
    """policy.TargetLogprobs against log_softmax + gather: the selected log-probs, each row's entropy and the
    gradient, with rows read by several predictions (shared contexts) and one read by none; gradcheck in float64."""
    torch.manual_seed(0)
    logits = torch.randn(5, 40, dtype=torch.float64) * 3
    index, target = torch.tensor([0, 2, 2, 4, 0, 2]), torch.tensor([3, 7, 7, 39, 0, 1])
    g = torch.randn(6, dtype=torch.float64)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logp = F.log_softmax(x, -1)
    want, want_entropy = logp[index, target], -(logp.exp() * logp).sum(-1)
    got, entropy = P.TargetLogprobs.apply(y, index, target, with_entropy)
    (want * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=1e-12)
    assert not entropy.requires_grad
    if with_entropy:
        torch.testing.assert_close(entropy, want_entropy.detach(), rtol=0, atol=1e-12)
    else:
        assert entropy.numel() == 0
    assert bool((y.grad[1] == 0).all()) and torch.allclose(y.grad.sum(-1), torch.zeros(5, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda z: P.TargetLogprobs.apply(z, index, target, with_entropy)[0],
                                    (logits.clone().requires_grad_(),))


RAGGED = [[14, 15, 3], [16, 17, 18, 5, 6], [7], [8, 9], [10, 11, 12], [13]]  # 13 of 24 fed cells: packed
SHARED = [[14, 15, 3, 4], [14, 15, 5], [14, 15, 3, 4], [14, 15, 3, 4], [14, 15, 3, 4], [16, 15, 3]]  # a group's
# rows share prefixes (rows 2, 3 are equal); row 4 equals rows 0, 2, 3 under another prompt, and row 5 ends as
# row 4 after another first token: neither shared
NEARLY_FULL = [[14, 15, 3, 4, 5], [16, 17, 18, 5, 6], [7, 8, 9, 10, 11], [8, 9, 10, 11], [10, 11, 12, 13, 14],
               [13, 12, 11, 10, 9]]  # 23 of 24 fed cells (under PACK_MIN_PADDING): every cell fed


@pytest.mark.parametrize("arch,comps", [("qwen2", RAGGED), ("llama", RAGGED), ("gpt2", RAGGED),
                                        ("qwen2", NEARLY_FULL), ("gpt2", NEARLY_FULL),
                                        ("qwen2", SHARED), ("llama", SHARED), ("gpt2", SHARED)])
def test_shared_prompt_forward_equals_per_row_forward(arch, comps):
    """Each prompt run once for its G completions, the completions' distinct prefixes packed into one sequence
    (or, with little padding and nothing shared, every cell): the same log-probs, entropies, lm-head inputs,
    logits and parameter gradients as token_logprobs on the concatenated, padded rows."""
    model, tok = policy_model(arch, seed=3)
    prompts, G = [[5, 6, 7, 8, 9], [10], [11, 12, 13]], 2
    ids, attn, comp = P.build_sequences([p for p in prompts for _ in range(G)], comps, tok.pad_token_id)
    L = ids.shape[1]
    Pl = L - max(len(c) for c in comps)
    ref = P.token_logprobs(model, ids, attn, comp, 0.7, return_entropy=True, return_hidden=True, packed=False)
    fed = []  # the length of each forward's input
    hook = model.register_forward_hook(lambda m, a, k, o: fed.append(k["input_ids"].shape[1]), with_kwargs=True)
    out = P.completion_logprobs_shared_prompt(model, ids[::G, :Pl], attn[::G, :Pl], ids[:, Pl:], comp[:, Pl:], G, 0.7,
                                              return_entropy=True, return_hidden=True)
    hook.remove()
    # the packed pass: one token per distinct (prompt, completion prefix) that predicts a real token
    distinct = {(i // G, tuple(c[:t + 1])) for i, c in enumerate(comps) for t in range(len(c) - 1)}
    assert fed[1] == (len(distinct) if comps is not NEARLY_FULL else 6 * (max(map(len, comps)) - 1))
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want[:, Pl:], rtol=1e-5, atol=2e-6)
    params = list(model.parameters())
    g_ref = torch.autograd.grad((ref.logprobs * torch.arange(L)).sum(), params, allow_unused=True)
    g_out = torch.autograd.grad((out.logprobs * torch.arange(Pl, L)).sum(), params, allow_unused=True)
    for a, b in zip(g_ref, g_out):
        assert (a is None) == (b is None)
        if a is not None:
            # relative to the tensor's scale: the two paths sum in different orders, and Qwen2's RMSNorm runs in
            # fp32 whatever the model dtype, so elementwise rounding differs by about 1e-7 of the largest entry
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * float(a.abs().max()))
    with pytest.raises(ValueError, match="completion rows"):
        P.completion_logprobs_shared_prompt(model, ids[::G, :Pl], attn[::G, :Pl], ids[:5, Pl:], comp[:5, Pl:], G, 1.0)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("prompts, completions", TOKEN_CASES)
def test_packed_token_logprobs_have_the_padded_forwards_gradients(arch, prompts, completions):
    """token_logprobs packed (real tokens only, or every cell) against the padded forward, scoring other tokens
    than the inputs (`targets`, as CoT masking does): the same log-probs, lm-head inputs and parameter gradients."""
    model, tok = policy_model(arch, seed=4)
    ids, attn, comp = P.build_sequences(prompts, completions, tok.pad_token_id)
    targets = torch.where(comp.bool(), (ids + 1) % len(tok), ids)
    params = list(model.parameters())
    outs, grads = [], []
    for packed in (False, True):
        out = P.token_logprobs(model, ids, attn, comp, 0.8, return_hidden=True, targets=targets, packed=packed)
        outs.append(out)
        grads.append(torch.autograd.grad((out.logprobs * torch.arange(ids.shape[1])).sum(), params, allow_unused=True))
    torch.testing.assert_close(outs[1].logprobs, outs[0].logprobs, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(outs[1].hidden, outs[0].hidden, rtol=1e-5, atol=2e-6)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * float(a.abs().max()))


def test_shared_prompt_forward_with_nothing_to_pack_and_an_attention_that_ignores_packing():
    """Two completion columns of which only the first is real in every row (a micro-batch kept at
    parallel.FSDP_MIN_COLUMNS): the packed pass still runs (one token, never read; ranks run the same forwards)
    and the numbers equal token_logprobs'. An architecture whose attention does not read the implementation name
    would attend across the packed rows: such a model is warned about once and runs unpacked, with the right
    numbers, from then on."""
    model, tok = policy_model("qwen2", seed=5)
    prompts, G = [[5, 6, 7], [8]], 2
    ids, attn, comp = P.build_sequences([p for p in prompts for _ in range(G)], [[9], [10], [11], [12]],
                                        tok.pad_token_id)
    pad = torch.full((ids.shape[0], 1), tok.pad_token_id)
    ids, attn, comp = torch.cat([ids, pad], 1), torch.cat([attn, pad * 0], 1), torch.cat([comp, pad * 0], 1)
    Pl = ids.shape[1] - 2
    ref = P.token_logprobs(model, ids, attn, comp, 0.7, packed=False)
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    out = P.completion_logprobs_shared_prompt(model, ids[::G, :Pl], attn[::G, :Pl], ids[:, Pl:], comp[:, Pl:], G, 0.7)
    assert len(calls) == 2  # the prompt pass and the packed pass (one token, never read)
    torch.testing.assert_close(out.logprobs, ref.logprobs[:, Pl:], rtol=1e-5, atol=2e-6)
    assert bool((out.logprobs[:, 1] == 0).all())
    model.forward = forward
    ids, attn, comp = P.build_sequences([p for p in prompts for _ in range(G)], [[9, 3], [10], [11, 4], [12]],
                                        tok.pad_token_id)
    Pl = ids.shape[1] - 2
    ref = P.token_logprobs(model, ids, attn, comp, 0.7, packed=False)
    ignore = lambda config, name: contextlib.nullcontext()  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "attention_implementation", ignore)
        with pytest.warns(UserWarning, match="packed path in 0 of 2 layers"):
            out = P.completion_logprobs_shared_prompt(model, ids[::G, :Pl], attn[::G, :Pl], ids[:, Pl:], comp[:, Pl:],
                                                      G, 0.7)
        torch.testing.assert_close(out.logprobs, ref.logprobs[:, Pl:], rtol=1e-5, atol=2e-6)
        assert not P.packs(model)
        got = P.token_logprobs(model, ids, attn, comp, 0.7)  # no second warning: the model is marked
    torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=1e-5, atol=2e-6)


def test_token_logprobs_temperature_one_is_plain_log_softmax_and_gradients_flow():
    model, tok = tiny(seed=4)
    ids, attn, comp = P.build_sequences([[5, 6]], [[7, 8]], tok.pad_token_id)
    logp = P.token_logprobs(model, ids, attn, comp, 1.0).logprobs
    ref = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    assert torch.allclose(logp[0, 2:], torch.stack([ref[1, 7], ref[2, 8]]), atol=1e-6)
    logp.sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# sampling


def test_row_uniforms_are_sane_and_counter_based():
    rows = torch.arange(20000)
    u = P.row_uniforms(0, rows, 0)  # (20000,)
    assert u.dtype == torch.float64 and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    v = P.row_uniforms(0, rows, 1)
    w = P.row_uniforms(1, rows, 0)
    for a, b in [(u[:-1], u[1:]), (u, v), (u, w)]:  # neighbouring rows, steps, seeds
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(corr) < 0.03
    # a row's uniform depends on (seed, row, step) only, not on the batch around it
    assert torch.equal(P.row_uniforms(0, torch.tensor([1234]), 0)[0], u[1234])


def test_next_tokens_never_pick_a_zero_probability_token():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]]).expand(5000, -1)
    tokens = P.next_tokens(logits, 1.0, seed=1, rows=torch.arange(5000), step=3, greedy=False)
    assert set(tokens.tolist()) == {0, 2}


def splitmix64_python(x: int) -> int:
    """Reference finaliser on Python ints mod 2^64 (Steele, Lea, Flood 2014)."""
    m = (1 << 64) - 1
    x &= m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_splitmix64_matches_python_reference_mod_2_64():
    xs = [0, 1, 12345, -1, -(1 << 63), (1 << 63) - 1, P._GAMMA, P._MIX1]
    got = P.splitmix64(torch.tensor(xs)).tolist()
    assert [g % (1 << 64) for g in got] == [splitmix64_python(x) for x in xs]
    # the first output of splitmix64 seeded with 0: a published constant
    assert splitmix64_python(P._GAMMA) == 0xE220A8397B1DCDAF


def test_next_tokens_frequencies_match_softmax_at_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    T, n = 0.8, 40000
    rows = torch.arange(n)
    tokens = P.next_tokens(logits.expand(n, -1), T, seed=5, rows=rows, step=0, greedy=False)
    counts = torch.bincount(tokens, minlength=6).double()

    def chi2(p):
        expected = n * p.double()
        return ((counts - expected) ** 2 / expected).sum().item()

    dof = 5  # mean 5, std sqrt(10): 5 + 6 sd is far out for the right law, far in for a wrong one
    assert chi2(torch.softmax(logits / T, -1)) < dof + 6 * math.sqrt(2 * dof)
    assert chi2(torch.softmax(logits, -1)) > 100  # the test can tell T = 0.8 from T = 1
    assert torch.equal(P.next_tokens(logits.expand(3, -1), T, 5, rows[:3], 0, greedy=True), torch.zeros(3).long())


def test_sample_one_step_frequencies_match_model_softmax():
    model, tok = tiny(seed=6)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(60)  # a peaked, non-uniform next-token law
    T, n = 1.5, 8000
    prompt = [5, 9, 12]
    p = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / T, -1)
    assert p.max() > 0.1 and p.min() < 0.01
    samples = P.sample(model, [prompt], n, 1, T, tok.eos_token_id, tok.pad_token_id, seed=11)
    counts = torch.bincount(torch.tensor([s[0] for s in samples]), minlength=len(p)).double()
    big = n * p >= 5  # pool the rare tokens into one cell
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([n * p[big], n * p[~big].sum()[None]])
    stat = ((observed - expected) ** 2 / expected).sum().item()
    dof = len(observed) - 1
    assert stat < dof + 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("arch,engine", [("qwen2", "decoder"), ("qwen2", "hf"), ("llama", "decoder"), ("gpt2", "auto")])
def test_sample_equals_reference_with_shared_cache_and_row_dropping(arch, engine, monkeypatch):
    model, tok = policy_model(arch, seed=2)
    assert decoder.supports(model) == (arch != "gpt2")
    eos = tok.eos_token_id
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] += 0.3 * model.get_output_embeddings().weight.mean(0) \
            + 0.05 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    prompts = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    G, max_new, T = 5, 12, 1.3
    calls = []  # the shapes of the token ids of every forward
    if engine == "decoder":
        forward = decoder.Decoder._forward
        monkeypatch.setattr(decoder.Decoder, "_forward",
                            lambda self, ids, *a: calls.append(tuple(ids.shape)) or forward(self, ids, *a))
    hook = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                       with_kwargs=True)
    got = P.sample(model, prompts, G, max_new, T, eos, tok.pad_token_id, seed=42, engine=engine)
    hook.remove()
    want = P.sample_reference(model, prompts, G, max_new, T, eos, tok.pad_token_id, seed=42)
    assert got == want
    assert len(got) == len(prompts) * G
    lengths = [len(c) for c in got]
    early = [c for c in got if c[-1] == eos and len(c) < max_new]
    assert len(early) >= 3 and any(len(c) == max_new and eos not in c for c in got), lengths
    assert all(eos not in c[:-1] for c in got)
    # one prefill for all prompts, then decode steps on the rows still running only
    assert calls[0] == (len(prompts), 6)
    alive = [sum(1 for c in got if len(c) > s) for s in range(1, max_new)]
    assert calls[1:] == [(a, 1) for a in alive if a > 0]
    assert alive[0] < len(got)  # some rows really left the batch
    # a different seed gives different samples; the same seed the same
    assert P.sample(model, prompts, G, max_new, T, eos, tok.pad_token_id, seed=43, engine=engine) != got
    assert P.sample(model, prompts, G, max_new, T, eos, tok.pad_token_id, seed=42, engine=engine) == got


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_decoder_logits_equal_the_model_forward_under_left_padding_and_row_dropping(arch):
    """decoder.Decoder against the model's own full forward over each row's real tokens: the prefill's last
    logits, then every decode step's, after rows are dropped and the survivors reordered (DESIGN section 6's
    pi_theta, computed another way)."""
    model, tok = policy_model(arch, seed=5)
    prompts, G = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], 2
    ids, mask = P.left_pad(prompts, tok.pad_token_id)
    dec = decoder.Decoder(model)
    seqs = [list(p) for p in prompts for _ in range(G)]  # each row's real tokens so far
    rows = torch.arange(len(seqs))

    def reference():  # (n, V) next-token logits of the current rows, one unpadded forward per row
        with torch.no_grad():
            return torch.cat([model(input_ids=torch.tensor([seqs[r]])).logits[:, -1] for r in rows.tolist()])

    with torch.no_grad():
        logits = dec.prefill(ids, mask, G, ids.shape[1] + 3)
    torch.testing.assert_close(logits, reference(), rtol=1e-5, atol=1e-5)
    for step, alive in enumerate([None, torch.tensor([0, 1, 0, 1, 1, 1], dtype=torch.bool),
                                  torch.tensor([1, 0, 1, 1], dtype=torch.bool)]):
        if alive is not None:
            perm = dec.drop(alive)
            assert sorted(perm.tolist()) == alive.nonzero().squeeze(1).tolist()  # the live rows, reordered
            rows = rows[perm]
        # steps 0 and 1: a group's rows append the same token (twins: one forward for both); step 2: they part
        tokens = torch.tensor([8 + (r // G if step < 2 else r + step) % 5 for r in rows.tolist()])
        for r, t in zip(rows.tolist(), tokens.tolist()):
            seqs[r].append(t)
        fed = dec.fed
        logits = dec.step(tokens)
        torch.testing.assert_close(logits, reference(), rtol=1e-5, atol=1e-5)
        assert dec.fed - fed == len({tuple(seqs[r]) for r in rows.tolist()})  # one forward row per distinct row
    with pytest.raises(ValueError, match="positions are full"):
        dec.step(tokens[:len(rows)])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_decoder_twins_sample_as_the_reference_and_run_once(arch, monkeypatch):
    """A peaked policy at a low temperature: a group's samples agree for a while (twins), then part. The decoder
    runs one forward row per distinct (prompt, tokens so far) at each step and samples exactly what
    sample_reference does (each row its own draw from the shared logits)."""
    model, tok = policy_model(arch, seed=6)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6)
    prompts, G, max_new, T = [[5, 6, 7, 8], [9], [10, 11]], 6, 10, 0.7
    fed = []
    forward = decoder.Decoder._forward
    monkeypatch.setattr(decoder.Decoder, "_forward", lambda self, ids, *a: fed.append(ids.shape[0]) or forward(self, ids, *a))
    got = P.sample(model, prompts, G, max_new, T, tok.eos_token_id, tok.pad_token_id, seed=7, engine="decoder")
    assert got == P.sample_reference(model, prompts, G, max_new, T, tok.eos_token_id, tok.pad_token_id, seed=7)
    distinct = [len({(i // G, tuple(c[:s])) for i, c in enumerate(got) if len(c) > s}) for s in range(1, max_new)]
    alive = [sum(1 for c in got if len(c) > s) for s in range(1, max_new)]
    assert fed[1:] == [d for d in distinct if d > 0]
    assert any(d < a for d, a in zip(distinct, alive)) and distinct[-1] > len(prompts), (distinct, alive)


def test_sample_row_does_not_depend_on_batch():
    model, tok = tiny(seed=5)
    prompts = [[5, 6, 7], [8, 9]]
    both = P.sample(model, prompts, 3, 8, 1.0, tok.eos_token_id, tok.pad_token_id, seed=1)
    first = P.sample(model, prompts[:1], 3, 8, 1.0, tok.eos_token_id, tok.pad_token_id, seed=1)
    assert both[:3] == first


def test_greedy_is_argmax_per_row():
    model, tok = tiny(seed=7)
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    got = P.sample(model, prompts, 2, 6, 0.0, eos_id=-1, pad_id=tok.pad_token_id, seed=0, greedy=True)
    for i, p in enumerate(prompts):
        ids = list(p)
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert got[2 * i] == got[2 * i + 1] == ids[len(p):]
    assert P.sample_reference(model, prompts, 2, 6, 0.0, -1, tok.pad_token_id, 0, greedy=True) == got


def test_sample_rejects_bad_arguments_and_restores_train_mode():
    model, tok = tiny()
    model.train()
    P.sample(model, [[5]], 1, 2, 1.0, tok.eos_token_id, tok.pad_token_id, seed=0)
    assert model.training
    with pytest.raises(ValueError, match="temperature"):
        P.sample(model, [[5]], 1, 2, 0.0, tok.eos_token_id, tok.pad_token_id, seed=0)
    with pytest.raises(ValueError, match="at least one token"):
        P.sample(model, [[]], 1, 2, 1.0, tok.eos_token_id, tok.pad_token_id, seed=0)
    assert P.sample(model, [[5], [6]], 2, 0, 1.0, tok.eos_token_id, tok.pad_token_id, seed=0) == [[]] * 4
