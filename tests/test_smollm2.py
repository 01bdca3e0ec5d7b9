"""policy.py on a real pretrained LM: SmolLM2-135M-Instruct (Llama: grouped-query attention 9/3 heads, RoPE,
tied embeddings, byte-level BPE), converted by smollm2.py. Skipped unless the converted folder exists:
models/smollm2-135m, or the folder named by GG_SMOLLM2_DIR. About 20-30 s on one CPU thread.

The tiny-model tests of test_policy.py check the same equalities; these catch what only a real checkpoint
has (its tokenizer, 30 layers of real weights, a 49k vocabulary grown by the graph's tags)."""
import os

import pytest
import torch

import policy as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.environ.get("GG_SMOLLM2_DIR") or os.path.join(ROOT, "models", "smollm2-135m")
TAGS = ["<query>", "</query>", "<product>", "</product>", "<q>", "</q>", "<p>", "</p>",
        "<f:brand>", "</f:brand>", "<y>", "</y>"]
PROMPTS = ["<query> nike red sneakers </query> <product> adidas sneakers color black </product>",
           "<query> lamp </query>",
           "<query> samsung 65 inch tv </query> <product> lg oled tv 55 inch </product>"]
COMPLETIONS = ["<q> category sneakers brand nike </q> <f:brand> nike adidas mismatch </f:brand> <y> mismatch </y>",
               "<q> category sneakers </q> <y> partial",
               "<q> category lamp </q> <y> exact </y>",
               "<y>",
               "<q> category tv brand samsung size 65 inch </q> <f:brand> samsung lg mismatch </f:brand>",
               "<q> tv </q> <y> irrelevant </y>"]


@pytest.fixture(scope="module")
def smol():
    if not os.path.isfile(os.path.join(MODEL_DIR, "config.json")):
        pytest.skip(f"no converted SmolLM2 at {MODEL_DIR} (python smollm2.py, or set GG_SMOLLM2_DIR)")
    torch.manual_seed(0)  # resize_token_embeddings draws the new tag rows from the global RNG
    model, tok = P.load_policy(MODEL_DIR, TAGS, dtype="float32", device="cpu")
    return model, tok


def encode_all(tok, texts):
    return [P.encode(tok, s, strict=False) for s in texts]


def test_tags_are_single_tokens_and_text_round_trips(smol):
    model, tok = smol
    ids = {t: tok.convert_tokens_to_ids(t) for t in TAGS}
    assert len(set(ids.values())) == len(TAGS) and min(ids.values()) >= 49152  # new ids after the BPE vocabulary
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    for text in PROMPTS + COMPLETIONS:
        got = P.encode(tok, text, strict=True)
        assert tok.decode(got) == text.replace(" <", "<")  # a tag absorbs the space before it (lstrip)
        toks = tok.convert_ids_to_tokens(got)
        assert not any(a == "Ġ" and b in ids for a, b in zip(toks, toks[1:]))  # no lone-space token before a tag
        # the parser's view (data.parse_completion): the words between two tags, decoded and split
        tag_at = [i for i, t in enumerate(got) if t in ids.values()]
        for a, b in zip(tag_at, tag_at[1:]):
            want = text.split(tok.convert_ids_to_tokens(got[a]), 1)[1].split(tok.convert_ids_to_tokens(got[b]), 1)[0]
            assert tok.decode(got[a + 1:b]).split() == want.split()


def test_sample_equals_reference_with_real_weights(smol):
    """Shared prompt KV cache, left padding (prompts of 23 and 7 tokens), finished rows dropped: the same tokens
    as the one-row, no-cache reference."""
    model, tok = smol
    prompts = encode_all(tok, PROMPTS[:2])
    G, n = 2, 8
    free = P.sample(model, prompts, G, n, 1.0, eos_id=-1, pad_id=tok.pad_token_id, seed=42)
    assert all(len(c) == n for c in free)
    assert P.sample_reference(model, prompts, G, n, 1.0, -1, tok.pad_token_id, seed=42) == free
    # an "eos" that row 0 emits at step 2 makes rows finish early and leave the batch
    eos = free[0][2]
    got = P.sample(model, prompts, G, n, 1.0, eos_id=eos, pad_id=tok.pad_token_id, seed=42)
    assert len(got[0]) <= 3 and got[0][-1] == eos
    assert P.sample_reference(model, prompts, G, n, 1.0, eos, tok.pad_token_id, seed=42) == got


def test_shared_prompt_forward_equals_per_row_forward_with_real_weights(smol):
    """completion_logprobs_shared_prompt == token_logprobs on the concatenated rows (values and parameter
    gradients), and both == an unpadded one-row forward. fp32 rounding only: the observed differences are
    ~3e-5 on log-probs and ~1e-4 relative on gradients; in float64 (with HF's fp32 RMSNorm upcast removed)
    hidden states agree to 1e-13, so a looser fp32 tolerance hides no structural mismatch."""
    model, tok = smol
    prompts, G = encode_all(tok, PROMPTS), 2
    comps = [c + [tok.eos_token_id] for c in encode_all(tok, COMPLETIONS)]
    ids, attn, comp = P.build_sequences([p for p in prompts for _ in range(G)], comps, tok.pad_token_id)
    L = ids.shape[1]
    Pl = L - max(len(c) for c in comps)
    model.train()
    ref = P.token_logprobs(model, ids, attn, comp, 0.7, return_entropy=True, return_hidden=True)
    out = P.completion_logprobs_shared_prompt(model, ids[::G, :Pl], attn[::G, :Pl], ids[:, Pl:], comp[:, Pl:], G, 0.7,
                                              return_entropy=True, return_hidden=True)
    for name, got, want in zip(ref._fields, out, ref):
        tol = dict(rtol=1e-4, atol=2e-4) if name in ("logprobs", "entropy") else dict(rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got, want[:, Pl:], **tol, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # no padding at all: one row, positions 0.., the model's own forward
        for r, c in enumerate(comps):
            p = prompts[r // G]
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / 0.7
            single = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(out.logprobs[r, :len(c)], single, rtol=1e-4, atol=2e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.arange(L, dtype=torch.float32) / L
    g_ref = torch.autograd.grad((ref.logprobs * weights).sum(), params, allow_unused=True)
    g_out = torch.autograd.grad((out.logprobs * weights[Pl:]).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_ref, g_out):
        assert (a is None) == (b is None), name
        if a is not None:
            rel = ((a - b).norm() / a.norm().clamp_min(1e-12)).item()
            assert rel < 2e-3, f"{name}: relative gradient difference {rel:.3g}"


def test_smoke_run_sft_rl_eval_with_real_weights(tmp_path):
    """configs/smollm2.yaml end to end at the smallest setting: 3 SFT steps, one RL step with G = 2, evaluation on
    4 items per split (about 2-3 minutes on one CPU thread). The pipeline runs on the real model: a resumable RL
    checkpoint with its manifest, metrics, and eval.json; the format is not learnt in 3 steps."""
    if not os.path.isfile(os.path.join(MODEL_DIR, "config.json")):
        pytest.skip(f"no converted SmolLM2 at {MODEL_DIR} (python smollm2.py, or set GG_SMOLLM2_DIR)")
    import json
    import subprocess
    import sys
    out = tmp_path / "run"
    cmd = [sys.executable, "graph_grpo.py", "configs/smollm2.yaml", f"--model.name_or_path={MODEL_DIR}",
           f"--run.out_dir={out}", f"--data.dir={tmp_path / 'data'}", "--data.n_sft=64", "--data.n_rl=64",
           "--data.n_test_id=4", "--data.n_test_longtail=4", "--sft.steps=3", "--sft.batch_size=4", "--rl.steps=1",
           "--rl.prompts_per_step=2", "--rl.num_generations=2", "--run.num_threads=1", "--eval.batch_size=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(open(out / "metrics.jsonl").readline())
    assert rec["completions/mean_length"] > 0 and "alpha/f->y" in rec
    assert (out / "checkpoints" / "step_000001" / "manifest.json").exists()
    assert json.load(open(out / "eval.json"))["test_id"]["n"] == 4


def test_wands_grade_reading_equals_the_plain_log_probs(smol):
    """experiments/wands_smollm2.py reads a pair's grade from one forward (each grade's first token after the chat
    prompt); the same numbers as policy.token_logprobs on the prompt + that token; both readings give every pair a grade."""
    ws = wands_smollm2()
    model, tok = smol
    pairs = [("red sofa", "Grey velvet sofa with two cushions"), ("lamp", "Brass floor lamp, 60 inch")]
    first = ws.grade_first_tokens(tok)
    assert len(set(first)) == 3
    with torch.no_grad():
        got = ws.grade_logprobs(model, tok, pairs, batch=2)
        for i, (q, p) in enumerate(pairs):
            ids, attn, comp = P.build_sequences([ws.label_prompt(tok, q, p)] * 3, [[t] for t in first], tok.pad_token_id)
            want = P.token_logprobs(model, ids, attn, comp, 1.0).logprobs.sum(1)
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
    plain, cal = ws.predict(model, tok, pairs), ws.predict(model, tok, pairs, calibrate=True)
    assert len(plain) == len(cal) == 2 and all(0 <= k < 3 for k in plain + cal)


def wands_smollm2():
    import importlib.util
    spec = importlib.util.spec_from_file_location("wands_smollm2", os.path.join(ROOT, "experiments", "wands_smollm2.py"))
    ws = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ws)
    return ws


def test_query_folds_keep_each_query_in_one_fold_and_the_readout_never_sees_its_own_fold():
    """Folds by query; then a leak check: features are pure noise and each fold's pairs all carry that fold's own
    grade (fold k: grade k), so a read-out fitted on the other folds has never seen the held-out grade and must get
    every pair wrong (accuracy 0); fitted on everything it would see it. A separable problem is learned exactly."""
    ws = wands_smollm2()
    queries = ["sofa", "lamp", "rug", "sofa", "desk", "lamp", "bed", "rug", "chair"]
    folds = ws.query_folds(queries, 3)
    assert folds == [["bed", "chair", "desk", "lamp", "rug", "sofa"].index(q) % 3 for q in queries]
    assert all(len({f for q2, f in zip(queries, folds) if q2 == q}) == 1 for q in queries)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=g, dtype=torch.float64)
    folds = [i % 3 for i in range(90)]
    y = list(folds)
    pred = ws.cross_validated_predictions(X, y, folds, 3)
    assert sum(p == t for p, t in zip(pred, y)) == 0
    # separable: the grade is the argmax of the first three features
    y2 = X[:, :3].argmax(1)
    pred2 = ws.cross_validated_predictions(X, y2.tolist(), folds, 3)
    assert sum(p == t for p, t in zip(pred2, y2.tolist())) >= 80


def test_lexical_features_are_the_rules_inputs():
    ws = wands_smollm2()
    assert ws.lexical_features("red velvet sofa", "Grey velvet sofa") == [2 / 3, 1.0, 0.0]
    assert ws.lexical_features("the", "anything") == [0.0, 0.0, 0.0]
    assert ws.lexical_features("sofas", "sofa bed") == [1.0, 1.0, 1.0]  # singular forms, as the rule reads them
