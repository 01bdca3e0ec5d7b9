"""data.py: the testbed generator, business rule, CoT serialiser/parser, verifiers and JSONL validation."""
import json
import math
import os
import pathlib
import random

import pytest

import data
import policy
import testbed

SCHEMA = data.GraphSchema()


@pytest.fixture(scope="module")
def splits():
    return testbed.generate_splits(SCHEMA, seed=7, n_sft=200, n_rl=300, n_test_id=100, n_test_longtail=200,
                                longtail_in_sft=0.05, longtail_in_rl=0.5)


@pytest.fixture(scope="module")
def tok():
    return policy.build_word_tokenizer(testbed.vocabulary(SCHEMA))


def encode(tok, text):
    return policy.encode(tok, text, strict=True)


def test_generator_is_deterministic_per_seed(splits):
    again = testbed.generate_splits(SCHEMA, seed=7, n_sft=200, n_rl=300, n_test_id=100, n_test_longtail=200,
                                 longtail_in_sft=0.05, longtail_in_rl=0.5)
    assert [e.to_json() for e in again["rl"]] == [e.to_json() for e in splits["rl"]]
    other = testbed.generate_splits(SCHEMA, seed=8, n_sft=200, n_rl=300, n_test_id=100, n_test_longtail=200,
                                 longtail_in_sft=0.05, longtail_in_rl=0.5)
    assert [e.to_json() for e in other["rl"]] != [e.to_json() for e in splits["rl"]]


def test_split_sizes_are_independent_streams():
    a = testbed.generate_splits(SCHEMA, 3, 50, 10, 20, 20, 0.05, 0.5)
    b = testbed.generate_splits(SCHEMA, 3, 50, 99, 20, 20, 0.05, 0.5)
    assert [e.to_json() for e in a["test_id"]] == [e.to_json() for e in b["test_id"]]


@pytest.mark.parametrize("verdicts,label", [
    ({"category": "mismatch", "brand": "match"}, 0),
    ({"category": "mismatch", "brand": "mismatch", "color": "partial"}, 0),
    ({"category": "match", "brand": "mismatch"}, 1),
    ({"category": "partial", "size": "mismatch"}, 1),
    ({"category": "match", "color": "mismatch"}, 2),
    ({"category": "partial", "brand": "match"}, 2),
    ({"brand": "match", "size": "partial"}, 2),
    ({"category": "match", "brand": "match", "color": "match", "size": "match"}, 3),
    ({"color": "match", "size": "match"}, 3),
])
def test_business_rule_table(verdicts, label):
    assert data.label_from_verdicts(verdicts) == label


def test_label_dependence_is_counterfactual():
    # a category mismatch masks every other facet
    assert SCHEMA.label_dependence({"category": "mismatch", "brand": "mismatch", "color": "match"}) == \
        {"category": True, "brand": False, "color": False}
    # brand mismatch: colour cannot change the label (1 stays 1), category can (-> 0), brand can (-> 2/3)
    assert SCHEMA.label_dependence({"category": "match", "brand": "mismatch", "color": "partial"}) == \
        {"category": True, "brand": True, "color": False}
    assert SCHEMA.label_dependence({"category": "match", "color": "match"}) == {"category": True, "color": True}


def test_gold_verdicts_follow_gold_comparator_and_rule(splits):
    cat = testbed.Catalogue()
    for ex in sum(splits.values(), []):
        parsed_q = dict(zip(ex.cot["q"].split()[::2], ex.cot["q"].split()[1::2]))
        parsed_p = dict(zip(ex.cot["p"].split()[::2], ex.cot["p"].split()[1::2]))
        for f, v in ex.nodes.items():
            assert cat.compare(f, parsed_q[f], parsed_p[f]) == v
            assert parsed_q[f] in ex.query.split() and parsed_p[f] in ex.product.split()
        assert data.label_from_verdicts(ex.nodes) == ex.label


def test_serialise_parse_round_trip_on_every_example(splits, tok):
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    for ex in sum(splits.values(), []):
        ids = encode(tok, data.serialize_cot(ex.cot, SCHEMA)) + [tok.eos_token_id]
        parsed = data.parse_completion(ids, vocab, SCHEMA)
        assert parsed.valid, (ex.id, parsed.problems)
        assert parsed.consistent and parsed.label == ex.label and parsed.verdicts == ex.nodes
        # spans are token ranges that start and end at the node's tags
        for name, span in parsed.nodes.items():
            assert tok.convert_ids_to_tokens(ids[span.start]) == f"<{name}>"
            assert tok.convert_ids_to_tokens(ids[span.end - 1]) == f"</{name}>"
            assert " ".join(span.words) == ex.cot[name]


def test_parser_never_raises_on_garbage(splits, tok):
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    rng = random.Random(0)
    n_vocab = len(tok)
    gold = [encode(tok, data.serialize_cot(ex.cot, SCHEMA)) for ex in splits["test_id"]]
    tags = list(vocab.id_to_tag)
    n_valid = 0
    for trial in range(2000):
        kind = trial % 4
        if kind == 0:
            ids = [rng.randrange(n_vocab) for _ in range(rng.randint(0, 60))]
        elif kind == 1:  # truncated gold
            g = rng.choice(gold)
            ids = g[: rng.randint(0, len(g))]
        elif kind == 2:  # tag soup
            ids = [rng.choice(tags) for _ in range(rng.randint(0, 30))]
        else:  # gold with random edits
            ids = list(rng.choice(gold))
            for _ in range(rng.randint(1, 3)):
                ids[rng.randrange(len(ids))] = rng.randrange(n_vocab)
        parsed = data.parse_completion(ids, vocab, SCHEMA)
        n_valid += parsed.valid
        if not parsed.valid:
            assert parsed.problems or parsed.label is None
    assert n_valid < 2000  # garbage was really produced


def test_parser_reports_specific_problems(tok):
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    p = lambda s: data.parse_completion(encode(tok, s), vocab, SCHEMA)  # noqa: E731
    ok = "<q> brand nike </q> <p> brand adidas </p> <f:brand> nike adidas mismatch </f:brand> <y> mismatch </y>"
    assert p(ok).valid and p(ok).label == 1
    assert "y: missing" in p(ok.replace("<y> mismatch </y>", "")).problems
    bad_verdict = p(ok.replace("adidas mismatch", "adidas excellent"))
    assert not bad_verdict.valid and any("f:brand" in x for x in bad_verdict.problems)
    missing_f = p("<q> brand nike color red </q> <p> brand adidas color red </p> "
                  "<f:brand> nike adidas mismatch </f:brand> <y> mismatch </y>")
    assert not missing_f.valid and "f:color: missing" in missing_f.problems
    unclosed = p("<q> brand nike </q> <p> brand adidas")
    assert not unclosed.valid and any("not closed" in x for x in unclosed.problems)
    inconsistent = p(ok.replace("<y> mismatch", "<y> excellent"))
    assert inconsistent.valid and not inconsistent.consistent


def test_node_keys_repeat_across_surface_variants(tok):
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    a = data.parse_completion(encode(tok, "<q> color red brand nike </q> <p> brand nike color red </p> "
                                          "<f:brand> nike nike match </f:brand> <f:color> red red match </f:color> "
                                          "<y> excellent </y>"), vocab, SCHEMA)
    b = data.parse_completion(encode(tok, "<q> brand nike color red </q> <p> brand nike color crimson </p> "
                                          "<f:brand> nike nike match </f:brand> <f:color> red crimson match </f:color> "
                                          "<y> excellent </y>"), vocab, SCHEMA)
    ka, kb = data.node_keys(a), data.node_keys(b)
    assert ka["q"] == kb["q"]            # a set of pairs: order does not matter
    assert ka["f:color"] == kb["f:color"] == "match"
    assert ka["p"] != kb["p"]
    assert data.node_keys(a, with_values=True)["f:color"] != data.node_keys(b, with_values=True)["f:color"]


def test_verifiers_are_imperfect_only_where_real_ones_are(tok):
    cat = testbed.Catalogue()
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    text = ("<q> category sneakers color crimson </q> <p> category sneakers color red </p> "
            "<f:category> sneakers sneakers match </f:category> <f:color> crimson red match </f:color> <y> excellent </y>")
    parsed = data.parse_completion(encode(tok, text), vocab, SCHEMA)
    s = data.verifier_scores(parsed, "crimson sneakers", "nike sneakers color red size us_9", cat.head_compare, SCHEMA)
    assert s["q"][0] == 1.0 and s["p"][0] == 1.0 and s["f:color"][0] == 1.0   # grounding: all copied correctly
    assert s["f:category"][1] == 1.0
    assert s["f:color"][1] == 0.0     # the head-only comparator does not know crimson == red: wrong on purpose
    assert cat.compare("color", "crimson", "red") == "match"
    assert s["y"][1] == 1.0           # rule adherence
    # grounding catches a value that is not in the query
    s2 = data.verifier_scores(parsed, "red sneakers", "nike sneakers color red size us_9", cat.head_compare, SCHEMA)
    assert s2["q"][0] == 0.5


def test_an_abstaining_comparator_gives_no_score_where_it_would_guess(tok):
    """reward.comparator_unknown = abstain: on a pair with a form the head-only comparator does not know and unequal
    strings it returns None and the verdict node gets no comparator score (NaN); head forms and equal strings are
    judged as before; grounding and the label's rule adherence do not change."""
    cat = testbed.Catalogue()
    assert cat.head_compare("color", "crimson", "red") == "mismatch"                 # the guess: wrong
    assert cat.head_compare("color", "crimson", "red", unknown="abstain") is None
    assert cat.head_compare("color", "crimson", "crimson", unknown="abstain") == "match"
    assert cat.head_compare("color", "red", "blue", unknown="abstain") == cat.head_compare("color", "red", "blue")
    assert cat.compare("color", "crimson", "red", unknown="abstain") == "match"      # the gold comparator knows it
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA)
    text = ("<q> category sneakers color crimson </q> <p> category sneakers color red </p> "
            "<f:category> sneakers sneakers match </f:category> <f:color> crimson red match </f:color> <y> excellent </y>")
    parsed = data.parse_completion(encode(tok, text), vocab, SCHEMA)
    args = (parsed, "crimson sneakers", "nike sneakers color red size us_9")
    guess = data.verifier_scores(*args, cat.head_compare, SCHEMA)
    task = testbed.Task(SCHEMA, {}, cat, True, "abstain")
    abst = data.verifier_scores(*args, task.comparator, SCHEMA)
    assert guess["f:color"][1] == 0.0 and math.isnan(abst["f:color"][1])
    assert guess["f:color"][0] == abst["f:color"][0] == 1.0
    assert guess["f:category"] == abst["f:category"] == (1.0, 1.0)
    assert guess["y"][1] == abst["y"][1] == 1.0
    assert math.isnan(abst["q"][1]) and abst["q"][0] == guess["q"][0]
    assert testbed.Task(SCHEMA, {}, cat, True).comparator("color", "crimson", "red") == "mismatch"  # the default


@pytest.mark.parametrize("line,msg", [
    ("{not json", "bad JSON"),
    ('{"product": "x", "label": 1}', "missing field 'query'"),
    ('{"query": "a", "product": "x", "label": 7}', "field 'label' = 7 out of range"),
    ('{"query": "a", "product": "x", "label": "2"}', "field 'label' must be int"),
    ('{"query": "", "product": "x", "label": 1}', "field 'query' is empty"),
    ('{"query": "a", "product": "x", "label": 1, "nodes": {"brand": "maybe"}}', "field 'nodes'"),
    ('{"query": "a", "product": "x", "label": 1, "cot": {"q": "brand a", "p": "brand b", "y": "excellent"}}',
     "disagrees with label"),
    ('[1, 2]', "expected a JSON object"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"query": "nike shoes", "product": "nike sneakers", "label": 3})
    path.write_text(good + "\n" + good + "\n" + line + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_jsonl(str(path), 4, SCHEMA)
    assert f"{path}:3:" in str(e.value) and msg in str(e.value) and "\n" not in str(e.value)


def test_jsonl_empty_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(data.DataError, match="empty file"):
        data.load_jsonl(str(tmp_path / "empty.jsonl"))
    with pytest.raises(data.DataError, match="no such file"):
        data.load_jsonl(str(tmp_path / "nope.jsonl"))


def test_jsonl_round_trip(tmp_path, splits):
    path = str(tmp_path / "x.jsonl")
    data.write_jsonl(path, splits["sft"])
    back = data.load_jsonl(path, 4, SCHEMA)
    assert [e.to_json() for e in back] == [e.to_json() for e in splits["sft"]]


def test_synthetic_words_are_all_in_vocabulary(splits, tok):
    for ex in sum(splits.values(), []):  # strict encoding raises on any unknown word
        encode(tok, data.format_prompt(ex.query, ex.product))
        encode(tok, data.serialize_cot(ex.cot, SCHEMA))


def test_longtail_split_has_every_kind_and_pivotal_share(splits):
    lt = splits["test_longtail"]
    kinds = {e.meta["longtail"] for e in lt}
    assert kinds == {"brand_alias", "color_synonym", "color_synonym_unseen", "size_unit", "size_unit_unseen"}
    for k in kinds:
        piv = [e.meta["pivotal"] for e in lt if e.meta["longtail"] == k]
        assert sum(piv) / len(piv) > 0.4, k   # each kind changes the label in a good share of examples
    # the sft split never contains an unseen form
    cat = testbed.Catalogue()
    for ex in splits["sft"]:
        for w in ex.query.split() + ex.product.split():
            f = cat.form.get(w)
            assert f is None or not f[2] or cat.is_rare(f[2]), w


def test_schema_parents_and_custom_dag():
    parents, etypes = SCHEMA.parents()
    slots = SCHEMA.slots
    assert slots[0] == "q" and slots[-1] == "y"
    assert [slots[i] for i in parents[slots.index("f:brand")]] == ["q", "p"]
    assert sorted(slots[i] for i in parents[slots.index("y")]) == sorted(f"f:{k}" for k in data.FACETS)

    class G:
        facets, nodes, edges = ["brand"], ["q", "p", "f", "y"], [["q", "p"], ["p", "f"], ["f", "y"]]
    s = data.GraphSchema.from_config(G)
    assert s.slots == ["q", "p", "f:brand", "y"]

    class Cyc(G):
        edges = [["q", "p"], ["p", "q"]]
    with pytest.raises(ValueError, match="cycle"):
        data.GraphSchema.from_config(Cyc).slots


def test_rl_label_noise_flips_the_share_asked_on_the_rl_pool_only():
    """data.rl_label_noise: about p of the RL pool gets another label (never its own), the truth stays in
    meta.clean_label and is the label node's gold; the other splits, and the pool at p = 0, are the noiseless ones."""
    args = (SCHEMA, 5, 50, 4000, 30, 30, 0.05, 0.5)
    clean = testbed.generate_splits(*args)
    noisy = testbed.generate_splits(*args, rl_label_noise=0.3)
    assert [e.to_json() for e in testbed.generate_splits(*args, rl_label_noise=0.0)["rl"]] == \
        [e.to_json() for e in clean["rl"]]
    for split in ("sft", "test_id", "test_longtail"):
        assert [e.to_json() for e in noisy[split]] == [e.to_json() for e in clean[split]]
    flipped = [(c, n) for c, n in zip(clean["rl"], noisy["rl"]) if "clean_label" in n.meta]
    assert abs(len(flipped) / 4000 - 0.3) < 0.025  # binomial sd 0.007
    assert all(n.label != c.label == n.meta["clean_label"] == data.gold_node("y", n, SCHEMA) for c, n in flipped)
    assert all(n.cot is None and n.nodes == c.nodes for c, n in flipped)  # label-only; the gold verdicts stay
    for n in noisy["rl"]:  # what is written reads back (a CoT would contradict its noisy label)
        data.parse_example(n.to_json(), "rl", 4, SCHEMA)
    assert all(n.label == c.label and n.nodes == c.nodes for c, n in zip(clean["rl"], noisy["rl"])
               if "clean_label" not in n.meta)
    # every other label is drawn: about a third of the flips each
    counts = [sum((n.label - c.label) % 4 == k for c, n in flipped) / len(flipped) for k in (1, 2, 3)]
    assert all(abs(x - 1 / 3) < 0.06 for x in counts), counts
    # a smaller p hits a subset of the same examples
    fewer = testbed.generate_splits(*args, rl_label_noise=0.1)["rl"]
    assert {e.id for e in fewer if "clean_label" in e.meta} <= {e.id for _, e in flipped}


def test_each_noise_kind_writes_its_own_data_directory(tmp_path):
    """The data directory's name carries the noise and its kind, so runs of one never read the other's pool."""
    from dataclasses import replace

    from config import DataConfig
    cfg = DataConfig(dir=str(tmp_path), n_sft=20, n_rl=300, n_test_id=10, n_test_longtail=10, rl_label_noise=0.3)
    uniform = testbed.prepare_synthetic(cfg, SCHEMA)
    adjacent = testbed.prepare_synthetic(replace(cfg, rl_label_noise_kind="adjacent"), SCHEMA)
    assert os.path.basename(os.path.dirname(uniform["rl"])).endswith("-noise0.3")
    assert os.path.basename(os.path.dirname(adjacent["rl"])).endswith("-noise0.3-adjacent")
    read = lambda split, paths: pathlib.Path(paths[split]).read_text()  # noqa: E731
    assert read("sft", uniform) == read("sft", adjacent) and read("rl", uniform) != read("rl", adjacent)


def test_adjacent_label_noise_moves_the_same_examples_one_grade():
    """data.rl_label_noise_kind adjacent: the examples uniform noise hits at the same p and seed, each moved one grade
    (up or down about half the time each where both exist: grades 1 and 2 of 0-3), the truth in meta.clean_label."""
    args = (SCHEMA, 5, 50, 4000, 30, 30, 0.05, 0.5)
    uniform = testbed.generate_splits(*args, rl_label_noise=0.3)["rl"]
    adjacent = testbed.generate_splits(*args, rl_label_noise=0.3, noise_kind="adjacent")["rl"]
    assert [("clean_label" in u.meta, u.meta.get("clean_label", u.label)) for u in uniform] == \
        [("clean_label" in a.meta, a.meta.get("clean_label", a.label)) for a in adjacent]
    moved = [(a.meta["clean_label"], a.label) for a in adjacent if "clean_label" in a.meta]
    assert all(abs(new - old) == 1 for old, new in moved)
    for grade in (1, 2):
        ups = [new > old for old, new in moved if old == grade]
        assert len(ups) > 100 and abs(sum(ups) / len(ups) - 0.5) < 0.12, (grade, len(ups), sum(ups))
    assert all(a.cot is None for a in adjacent if "clean_label" in a.meta)
    with pytest.raises(ValueError, match="adjacent"):
        testbed.label_noise(adjacent[:1], 0.3, 4, random.Random(0), kind="nearby")
