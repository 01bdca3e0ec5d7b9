"""distill.py: heads from the schema, the loss on hand numbers, teacher signals aligned with the verdict words,
the student's save/load round trip, and a subprocess run of `python distill.py` (DESIGN §10)."""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import data
import distill
import eval as evaluation
import policy
import testbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = data.GraphSchema()


# ----------------------------------------------------------------------------------------------------------
# heads

def test_build_heads_default_and_custom_schema():
    assert distill.build_heads(SCHEMA) == {"f:category": 4, "f:brand": 4, "f:color": 4, "f:size": 4, "y": 4}
    assert list(distill.build_heads(SCHEMA)) == ["f:category", "f:brand", "f:color", "f:size", "y"]
    custom = data.GraphSchema(facets=("material", "brand"), label_names=("bad", "ok", "good"))
    assert distill.build_heads(custom) == {"f:material": 4, "f:brand": 4, "y": 3}
    assert distill.build_heads(custom, "label_only") == {"y": 3}
    assert distill.head_classes(custom)["f:brand"] == ["match", "partial", "mismatch", "absent"]
    assert distill.head_classes(custom)["y"] == ["bad", "ok", "good"]


def test_head_weights_mapping_list_and_errors():
    custom = data.GraphSchema(facets=("material", "brand"), label_names=("bad", "good"))
    assert distill.resolve_head_weights({}, custom) == {"f:material": 1.0, "f:brand": 1.0, "y": 1.0}
    # a head name wins over its kind
    assert distill.resolve_head_weights({"f": 0.5, "f:brand": 2, "y": 3}, custom) == \
        {"f:material": 0.5, "f:brand": 2.0, "y": 3.0}
    assert distill.resolve_head_weights([1, 2, 3], custom) == {"f:material": 1.0, "f:brand": 2.0, "y": 3.0}
    assert distill.resolve_head_weights([1, 2, 3], custom, "label_only") == {"y": 3.0}
    with pytest.raises(ValueError, match="2 weights for 3 heads"):
        distill.resolve_head_weights([1, 2], custom)
    with pytest.raises(ValueError, match="unknown head 'f:colour'"):
        distill.resolve_head_weights({"f:colour": 1}, custom)


# ----------------------------------------------------------------------------------------------------------
# loss

def test_kl_is_zero_when_the_student_copies_the_teacher():
    z = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 0.3, -2.0, 1.0]])
    for tau in (1.0, 2.0, 3.5):
        loss, parts = distill.distill_loss({"y": z, "f:brand": z * 2}, {"y": torch.softmax(z, -1),
                                           "f:brand": torch.softmax(z * 2, -1)},
                                           torch.tensor([0, 1]), {}, tau, ce_weight=0.0)
        assert abs(loss.item()) < 1e-6 and abs(parts["kl/y"]) < 1e-6 and abs(parts["kl/f:brand"]) < 1e-6
        assert "ce/y" not in parts


def test_distill_loss_hand_numbers_two_classes():
    ln3 = math.log(3.0)
    student = torch.tensor([[0.0, ln3]])  # softmax -> (1/4, 3/4)
    # tau = 1: KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); weight 2
    loss, parts = distill.distill_loss({"y": student}, {"y": torch.tensor([[0.5, 0.5]])}, torch.tensor([1]),
                                       {"y": 2.0}, 1.0, ce_weight=0.0)
    assert abs(parts["kl/y"] - 0.5 * math.log(4 / 3)) < 1e-6
    assert abs(loss.item() - math.log(4 / 3)) < 1e-6
    # tau = 2: the teacher (0.8, 0.2) softens to (2/3, 1/3); student logits (0, 2 ln 3) / 2 -> (1/4, 3/4)
    kl = 2 / 3 * math.log((2 / 3) / 0.25) + 1 / 3 * math.log((1 / 3) / 0.75)
    loss, parts = distill.distill_loss({"y": 2 * student}, {"y": torch.tensor([[0.8, 0.2]])}, torch.tensor([1]),
                                       {}, 2.0, ce_weight=0.0)
    assert abs(parts["kl/y"] - kl) < 1e-6 and abs(loss.item() - 4 * kl) < 1e-5
    # the CE term is at temperature 1 on the gold label: -ln(3/4), weighted
    loss, parts = distill.distill_loss({"y": student}, {"y": torch.tensor([[0.25, 0.75]])}, torch.tensor([1]),
                                       {}, 1.0, ce_weight=0.5)
    assert abs(parts["ce/y"] + math.log(0.75)) < 1e-6 and abs(loss.item() + 0.5 * math.log(0.75)) < 1e-6
    # a zero row (no teacher signal) adds nothing but counts in the batch mean; weight 0 drops a head
    loss, parts = distill.distill_loss({"y": student.repeat(2, 1), "f:x": student.repeat(2, 1)},
                                       {"y": torch.tensor([[0.5, 0.5], [0.0, 0.0]]), "f:x": torch.tensor([[1.0, 0.0]] * 2)},
                                       torch.tensor([1, 1]), {"f:x": 0.0}, 1.0, ce_weight=0.0)
    assert abs(parts["kl/y"] - 0.25 * math.log(4 / 3)) < 1e-6 and "kl/f:x" not in parts
    assert abs(loss.item() - 0.25 * math.log(4 / 3)) < 1e-6


# ----------------------------------------------------------------------------------------------------------
# teacher signals

def _teacher():
    tok = policy.build_word_tokenizer(testbed.vocabulary(SCHEMA))
    model = policy.build_tiny_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, hidden_size=32,
                                    num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=3)
    return model.eval(), tok


def _hand_completions(tok):
    """Three examples with known CoTs: complete; one facet node dropped (-> absent); one facet node broken (no
    verdict) and no label node. Words map one to one to tokens, so word index = token index."""
    exs = [ex for ex in testbed.generate_splits(SCHEMA, 7, 40, 0, 0, 0, 0.0, 0.5)["sft"] if len(ex.nodes) >= 3][:3]
    texts = []
    for i, ex in enumerate(exs):
        cot = dict(ex.cot)
        facets = list(ex.nodes)
        if i == 1:
            del cot[f"f:{facets[0]}"]
        if i == 2:
            cot[f"f:{facets[1]}"] = " ".join(cot[f"f:{facets[1]}"].split()[:-1])
            del cot["y"]
        texts.append(data.serialize_cot(cot, SCHEMA))
    comps = [policy.encode(tok, t, strict=True) + [tok.eos_token_id] for t in texts]
    return exs, texts, comps


def test_node_word_positions_are_the_verdict_words():
    _, tok = _teacher()
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    exs, texts, comps = _hand_completions(tok)
    for i, (ex, text, comp) in enumerate(zip(exs, texts, comps)):
        words = text.split()
        pos = distill.node_word_positions(comp, vocab, SCHEMA)
        for facet, verdict in ex.nodes.items():
            name = f"f:{facet}"
            if i == 1 and facet == list(ex.nodes)[0]:
                assert name not in pos                      # not in the CoT
            elif i == 2 and facet == list(ex.nodes)[1]:
                assert pos[name] is None                    # in the CoT, broken
            else:
                j = words.index(f"</{name}>") - 1           # the word right before the closing tag, by hand
                assert pos[name] == j and words[j] == verdict == tok.convert_ids_to_tokens(comp[j])
        if i < 2:
            assert pos["y"] == words.index("</y>") - 1 and words[pos["y"]] == SCHEMA.label_names[ex.label]
        else:
            assert "y" not in pos


def test_teacher_signals_are_distributions_read_at_the_verdict_positions(monkeypatch):
    """Batched, left-padded teacher forcing gives, per node, softmax over the decision words' logits at exactly
    the position that predicts the verdict word (checked against one unpadded forward per example)."""
    model, tok = _teacher()
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    exs, _, comps = _hand_completions(tok)
    monkeypatch.setattr(evaluation, "generate_greedy", lambda m, t, batch, *a, **k: [comps[exs.index(e)] for e in batch])
    sig = distill.teacher_signals(model, tok, SCHEMA, exs, batch_size=3, max_new_tokens=64, strict=True,
                                  show_progress=False)
    assert sig["completions"] == comps
    verdict_ids = [tok.convert_tokens_to_ids(v) for v in data.VERDICTS]
    label_ids = [tok.convert_tokens_to_ids(v) for v in SCHEMA.label_names]
    for i, (ex, comp) in enumerate(zip(exs, comps)):
        prompt = policy.encode(tok, data.format_prompt(ex.query, ex.product), strict=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + comp])).logits[0]  # (P + C, V)
        pos = distill.node_word_positions(comp, vocab, SCHEMA)
        for name in distill.build_heads(SCHEMA):
            got = sig["probs"][name][i]
            assert (got >= 0).all() and abs(got.sum().item() - 1.0) < 1e-5 or got.sum() == 0
            j = pos.get(name, "missing")
            if j == "missing" and name != "y":
                want = torch.tensor([0.0, 0.0, 0.0, 1.0])                    # facet not in the CoT: absent
            elif j is None or j == "missing":
                want = torch.zeros_like(got)                                 # broken node, no label: no signal
            else:
                ids = label_ids if name == "y" else verdict_ids
                row = logits[len(prompt) + j - 1]                            # predicts comp[j]
                want = torch.zeros_like(got)
                want[:len(ids)] = torch.softmax(row[ids], -1)
            assert torch.allclose(got, want, atol=1e-5), (i, name, got, want)
    # every facet of the schema got a row; the dropped facet (example 1) is 'absent' with probability 1
    dropped = f"f:{list(exs[1].nodes)[0]}"
    assert sig["probs"][dropped][1].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert sig["probs"]["y"][2].sum() == 0


# ----------------------------------------------------------------------------------------------------------
# student

def _student_cfg(**kw):
    base = dict(student_init="", hidden_size=32, num_layers=1, num_heads=2, max_length=32, dropout=0.1)
    return types.SimpleNamespace(**{**base, **kw})


def test_student_save_load_round_trip_and_score_pairs(tmp_path):
    schema = data.GraphSchema(facets=("brand", "color"))
    words = testbed.vocabulary(schema)
    model, tok = distill.build_student(_student_cfg(), distill.head_classes(schema), words, seed=1)
    pairs = [("nike red sneakers", "nike sneakers color red size us_9"), ("sofa", "ikea sofa color grey size 200_cm"),
             ("cheap adidas", "adidas classic running_shoes color black size us_8 with red trim")]
    model.eval()
    enc = [distill.encode_pair(tok, q, p, model.max_length, strict=True) for q, p in pairs]
    assert all(ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id for ids, _ in enc)
    with torch.no_grad():
        before = model(*distill.collate(enc, tok.pad_token_id))
    distill.save_student(model, tok, str(tmp_path / "student"))
    cfg = json.load(open(tmp_path / "student" / "config.json"))
    assert cfg["graph_heads"] == [["f:brand", list(distill.FACET_CLASSES)], ["f:color", list(distill.FACET_CLASSES)],
                                  ["y", list(SCHEMA.label_names)]]
    loaded, ltok = distill.load_student(str(tmp_path / "student"))
    assert not loaded.training and list(loaded.classes) == ["f:brand", "f:color", "y"]
    enc2 = [distill.encode_pair(ltok, q, p, loaded.max_length, strict=True) for q, p in pairs]
    assert enc2 == enc
    with torch.no_grad():
        after = loaded(*distill.collate(enc2, ltok.pad_token_id))
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # score_pairs: distributions, expected relevance = sum_k k p_k, and the same in any batch size
    one = distill.score_pairs(loaded, ltok, pairs, batch_size=1)
    allb = distill.score_pairs(loaded, ltok, pairs, batch_size=256)
    for a, b in zip(one, allb):
        p = list(a["label_probs"].values())
        assert abs(sum(p) - 1) < 1e-5 and abs(a["relevance"] - sum(k * x for k, x in enumerate(p))) < 1e-5
        assert a["label"] == b["label"] and abs(a["relevance"] - b["relevance"]) < 1e-5
        assert set(a["facets"]) == {"brand", "color"}
        assert abs(sum(a["facets"]["brand"].values()) - 1) < 1e-5


def test_encode_pair_cuts_the_product_first():
    tok = distill.build_student_tokenizer(["a", "b", "c"])
    ids, types_ = distill.encode_pair(tok, "a a", "b b b c", max_length=7)
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "a", "[SEP]", "b", "b", "[SEP]"]
    assert types_ == [0, 0, 0, 0, 1, 1, 1]
    ids, _ = distill.encode_pair(tok, "a b c a", "c", max_length=5)
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "b", "[SEP]", "[SEP]"]


# ----------------------------------------------------------------------------------------------------------
# end to end

def test_distill_script_smoke_run_writes_student_and_reuses_the_teacher_cache(tmp_path):
    import sft_mask
    from config import load_config
    common = [f"--run.out_dir={tmp_path}", f"--data.dir={tmp_path}/data", "--run.num_threads=1"]
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), common + ["--sft.steps=60", "--sft.lr=3e-3"])
    ckpt = sft_mask.train_sft(cfg, str(tmp_path / "sft"), show_progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*extra):
        r = subprocess.run([sys.executable, "distill.py", "configs/tiny.yaml", *common, "--distill.steps=5", *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    out = run("--distill.val_items=56", "--distill.eval_every=2")
    student = tmp_path / "student"
    # the held-out prompts: never trained on (the cached signals cover the first 200 of 256), a curve every 2 steps
    assert len(torch.load(student / "teacher_signals_rl.pt", weights_only=True)["completions"]) == 200
    curve = [json.loads(x) for x in open(student / "metrics.jsonl")]
    assert [r["step"] for r in curve if "val/macro_f1" in r] == [1, 3, 4]
    assert 0 <= curve[-1]["val/accuracy"] <= 1 and "val/node/f:brand" in curve[-1]
    assert (student / "checkpoint" / "graph_heads.pt").exists() and (student / "checkpoint" / "config.json").exists()
    assert "| test_id " in out and "| test_longtail " in out and "student" in out and "teacher" in out
    res = json.load(open(student / "eval.json"))
    # the teacher's numbers are eval.py's on the same greedy CoTs
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(ckpt, task.schema.words(), device="cpu")
    ref = evaluation.evaluate_policy(model, tok, task, {"test_id": task.splits["test_id"]}, cfg.eval)
    for key in ("accuracy", "macro_f1", "format_valid"):
        assert res["teacher"]["test_id"][key] == ref["test_id"][key]
    assert set(res["student"]) == {"test_id", "test_longtail"}
    assert 0.0 <= res["student"]["test_id"]["accuracy"] <= 1.0
    # a second student (label only, elsewhere) reuses the cached teacher signals
    cache = student / "teacher_signals_rl.pt"
    stamp = cache.stat().st_mtime_ns
    run("--distill.heads=label_only", f"--distill.student_dir={tmp_path}/label_only", "--distill.val_items=56")
    assert cache.stat().st_mtime_ns == stamp
    loaded, ltok = distill.load_student(str(tmp_path / "label_only"))
    assert list(loaded.classes) == ["y"]
    ex = task.splits["test_id"][0]
    scored = distill.score_pairs(loaded, ltok, [(ex.query, ex.product)])
    assert scored[0]["facets"] == {} and 0.0 <= scored[0]["relevance"] <= 3.0


# ----------------------------------------------------------------------------------------------------------
# the graph-shaped student: the label head reads the verdict heads (F -> Y)

@pytest.mark.parametrize("label_from", ["verdicts", "both"])
def test_graph_shaped_label_head_reads_the_verdict_heads_and_round_trips(tmp_path, label_from):
    schema = data.GraphSchema(facets=("brand", "color"))
    model, tok = distill.build_student(_student_cfg(label_from=label_from, dropout=0.0), distill.head_classes(schema),
                                       testbed.vocabulary(schema), seed=2)
    model.eval()
    enc = [distill.encode_pair(tok, "nike red sneakers", "nike sneakers color red size us_9", model.max_length, True)]
    batch = distill.collate(enc, tok.pad_token_id)
    with torch.no_grad():
        before = model(*batch)
        # the label depends on the pooled vector only through the verdict heads when label_from = verdicts
        kept = model.heads["f:brand"].bias.clone()
        model.heads["f:brand"].bias += torch.tensor([5.0, -5.0, 0.0, 0.0])
        moved = model(*batch)
        model.heads["f:brand"].bias.copy_(kept)
    assert not torch.allclose(before["y"], moved["y"]) and torch.equal(before["f:color"], moved["f:color"])
    assert model.heads["y"][0].in_features == 8 + (32 if label_from == "both" else 0)
    distill.save_student(model, tok, str(tmp_path / "s"))
    assert json.load(open(tmp_path / "s" / "config.json"))["graph_label_from"] == label_from
    loaded, _ = distill.load_student(str(tmp_path / "s"))
    assert loaded.label_from == label_from
    with torch.no_grad():
        after = loaded(*batch)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # gradients of the label loss reach the verdict heads
    model.train()
    model(*batch)["y"].sum().backward()
    assert model.heads["f:brand"].weight.grad.abs().sum() > 0


def test_graph_shaped_label_head_needs_verdict_heads():
    schema = data.GraphSchema(facets=("brand",))
    # a label-only student reads the pooled vector whatever label_from says (the config default is 'verdicts')
    model, tok = distill.build_student(_student_cfg(label_from="verdicts", node_tokens=True),
                                       distill.head_classes(schema, "label_only"), testbed.vocabulary(schema))
    assert model.label_from == "pooled" and model.node_token_ids == [] and "[f:brand]" not in tok.get_vocab()
    with pytest.raises(ValueError, match="label_from=verdicts.*has none"):
        distill.GraphNodeStudent(model.encoder, distill.head_classes(schema, "label_only"), 32, "verdicts")


# ----------------------------------------------------------------------------------------------------------
# serving: python distill.py score PAIRS.jsonl > OUT.jsonl

def _saved_student(tmp_path, label_from="both"):
    schema = data.GraphSchema(facets=("brand", "color"))
    model, tok = distill.build_student(_student_cfg(label_from=label_from), distill.head_classes(schema),
                                       testbed.vocabulary(schema), seed=4)
    path = str(tmp_path / "student")
    distill.save_student(model.eval(), tok, path)
    return path


def _score(args, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "distill.py", "score", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, input=stdin)


def test_score_cli_writes_one_line_per_pair_and_the_rate(tmp_path):
    student = _saved_student(tmp_path)
    pairs = [{"id": "a", "query": "nike red sneakers", "product": "nike sneakers color red size us_9"},
             {"query": "sofa", "product": "ikea sofa color grey size 200_cm", "label": 2},   # extra fields ignored
             {"id": 7, "query": "zzz unknown words", "product": "adidas classic running_shoes color black"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pairs[:2]) + "\n\n" + json.dumps(pairs[2]) + "\n")
    r = _score([str(path), f"--student={student}", "--batch-size=2"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 3 and [x.get("id") for x in lines] == ["a", None, 7]
    model, tok = distill.load_student(student)
    want = distill.score_pairs(model, tok, [(p["query"], p["product"]) for p in pairs])
    for got, w in zip(lines, want):
        assert got["label"] == w["label"] and got["label_name"] == w["label_name"]
        assert set(got["facets"]) == {"brand", "color"}
        for k, v in w["label_probs"].items():
            assert abs(got["label_probs"][k] - v) < 1e-5
        assert abs(sum(got["facets"]["color"].values()) - 1) < 1e-5
    assert "scored 3 pairs" in r.stderr and "pairs/s" in r.stderr
    # stdin, and the student of a config (distill.student_dir: distill.py writes the student into its checkpoint/)
    os.makedirs(tmp_path / "run")
    os.rename(student, tmp_path / "run" / "checkpoint")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"distill:\n  student_dir: {tmp_path / 'run'}\n")
    r2 = _score(["-", f"--student={cfg}", "--batch-size=2"], stdin=path.read_text())
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout


@pytest.mark.parametrize("line,message", [
    ('{"query": "nike sneakers"}', "missing field 'product'"),
    ('{"query": "nike", "product": ""}', "field 'product' is empty"),
    ('{"query": 3, "product": "x"}', "field 'query' must be str"),
    ('{"query": "a", "product": "b", "id": [1]}', "field 'id' must be a string or an integer"),
    ('["nike", "sneakers"]', "expected a JSON object"),
    ('{"query": "nike", "product": "sneakers"', "bad JSON"),
])
def test_read_pairs_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "nike red sneakers", "product": "nike sneakers color red"}\n\n' + line + "\n")
    with pytest.raises(data.DataError) as err:
        distill.read_pairs(str(path))
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value) and "\n" not in str(err.value)


def test_score_cli_bad_line_is_one_line_error_and_no_output(tmp_path):
    student = _saved_student(tmp_path, "pooled")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "nike red sneakers", "product": "nike sneakers color red"}\n\n'
                    '{"query": "nike sneakers"}\n{"query": "a", "product": "b"}\n')
    r = _score([str(path), f"--student={student}"])
    assert r.returncode == 2 and r.stdout == ""  # every line is checked before any pair is scored
    assert r.stderr.strip().splitlines() == [f"error: {path}:3: missing field 'product'"], r.stderr


def test_score_cli_missing_student_or_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "a", "product": "b"}\n')
    r = _score([str(path), f"--student={tmp_path}/nope"])
    assert r.returncode == 2 and "directory not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _score([str(tmp_path / "none.jsonl"), f"--student={tmp_path}"])
    assert r.returncode == 2 and "no such file" in r.stderr


def test_node_tokens_each_verdict_head_reads_its_own_token(tmp_path):
    schema = data.GraphSchema(facets=("brand", "color"))
    model, tok = distill.build_student(_student_cfg(node_tokens=True, label_from="both", dropout=0.0),
                                       distill.head_classes(schema), testbed.vocabulary(schema), seed=5)
    assert tok.convert_ids_to_tokens(model.node_token_ids) == ["[f:brand]", "[f:color]"]
    ids, types_ = distill.encode_pair(tok, "nike red", "nike sneakers color red", model.max_length, True,
                                      model.node_token_ids)
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "[f:brand]", "[f:color]", "nike", "red", "[SEP]", "nike",
                                              "sneakers", "color", "red", "[SEP]"]
    assert types_ == [0] * 6 + [1] * 5
    ids8, _ = distill.encode_pair(tok, "nike red", "nike sneakers color red", 8, True, model.node_token_ids)
    assert len(ids8) == 8 and ids8[:3] == ids[:3]                     # the node tokens are never cut
    model.eval()
    batch = distill.collate([(ids, types_)], tok.pad_token_id)
    with torch.no_grad():
        out = model.encoder(input_ids=batch[0], attention_mask=batch[1], token_type_ids=batch[2])
        logits = model(*batch)
    assert torch.allclose(logits["f:color"], model.heads["f:color"](out.last_hidden_state[:, 2]))
    distill.save_student(model, tok, str(tmp_path / "s"))
    loaded, ltok = distill.load_student(str(tmp_path / "s"))
    assert loaded.node_token_ids == model.node_token_ids and loaded.label_from == "both"
    a = distill.score_pairs(model, tok, [("nike red", "nike sneakers color red")])
    b = distill.score_pairs(loaded, ltok, [("nike red", "nike sneakers color red")])
    assert a == b
