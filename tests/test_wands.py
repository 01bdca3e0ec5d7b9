"""The WANDS track (data.py section 7): the converter, its one-line errors, the 3-level label scale, the
WANDS-built catalogue and testbed, and the lexical baseline of experiments/wands.py."""
import importlib.util
import json
import os
import shutil
from collections import Counter

import pytest

import data
import policy
import testbed
from config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WANDS = testbed.resolve_wands_dir("../shared/data/wands_mini")
GRADES = ("Irrelevant", "Partial", "Exact")
needs_wands = pytest.mark.skipif(not os.path.isdir(WANDS), reason=f"WANDS mini data not found at {WANDS}")


class Graph:
    facets = ["category", "style", "color", "size"]
    edges = [["q", "f"], ["p", "f"], ["f", "y"]]


SCHEMA3 = data.GraphSchema.from_config(Graph, ["irrelevant", "partial", "exact"], [0, 1, 1, 2])


@pytest.fixture(scope="module")
def real():
    if not os.path.isdir(WANDS):
        pytest.skip(f"WANDS mini data not found at {WANDS}")
    return testbed.wands_examples(WANDS, GRADES)


@pytest.fixture(scope="module")
def wands_splits():
    if not os.path.isdir(WANDS):
        pytest.skip(f"WANDS mini data not found at {WANDS}")
    cat = testbed.wands_catalogue(testbed.read_wands(WANDS)[1])
    return cat, testbed.generate_splits(SCHEMA3, 5, 150, 150, 60, 60, 0.05, 0.5, False, cat)


# --- the converter ---------------------------------------------------------------------------------------

@needs_wands
def test_converter_counts_match_stats_json(real, tmp_path):
    stats = json.load(open(os.path.join(WANDS, "stats.json")))
    assert len(real) == stats["labels"] == 296
    assert len({ex.meta["query_id"] for ex in real}) == stats["queries_with_labels"] == 104
    assert len({ex.meta["product_id"] for ex in real}) == stats["products"] == 252
    dist = Counter(ex.meta["grade"] for ex in real)
    assert dist == stats["label_distribution"] == {"Exact": 42, "Partial": 155, "Irrelevant": 99}
    assert Counter(ex.label for ex in real) == {2: 42, 1: 155, 0: 99}
    assert all(ex.cot is None and ex.nodes is None and ex.meta["vocab"] is False for ex in real)  # label-only
    out = tmp_path / "wands.jsonl"
    testbed.convert_wands(WANDS, str(out), GRADES)
    back = data.load_jsonl(str(out), 3, SCHEMA3)
    assert [e.to_json() for e in back] == [e.to_json() for e in real]


@needs_wands
def test_label_mapping_follows_the_label_and_grade_columns(real):
    rows = testbed.read_wands_table(os.path.join(WANDS, "label.csv"))
    assert len(rows) == len(real)
    for (_, row), ex in zip(rows, real):
        assert ex.label == GRADES.index(row["label"]) == int(row["grade"])
        assert (ex.meta["query_id"], ex.meta["product_id"]) == (int(row["query_id"]), int(row["product_id"]))
    first = real[0]  # query 0 'salon chair' against product 9191, graded Partial
    assert first.query == "salon chair" and first.label == 1 and first.product.endswith("accent chairs")
    # the label scale comes from the config (data.wands_grades); one that contradicts the files' grade column
    # is refused rather than silently reversing the labels
    with pytest.raises(data.DataError, match=r"label\.csv:\d+: column 'grade' = '\d' disagrees"):
        testbed.wands_examples(WANDS, GRADES[::-1])


def _broken_copy(tmp_path, name, line, edit):
    d = tmp_path / "wands"
    shutil.copytree(WANDS, d, ignore=shutil.ignore_patterns("raw", "*.jsonl", "query_attributes_llm.csv"),
                    copy_function=shutil.copyfile)  # the shipped files are read-only; the copies must not be
    os.chmod(d, 0o755)
    path = d / name
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(d), str(path)


@needs_wands
@pytest.mark.parametrize("name,line,edit,column", [
    ("label.csv", 5, lambda s: "\t".join(s.split("\t")[:3]), "label"),               # a column missing
    ("label.csv", 7, lambda s: s + "\textra", "column 7"),                            # one too many
    ("label.csv", 9, lambda s: s.replace("Partial", "Parcial").replace("Exact", "Exakt")
     .replace("Irrelevant", "Irrelevante"), "label"),                                 # unknown grade
    ("label.csv", 11, lambda s: "\t".join([s.split("\t")[0], "x1"] + s.split("\t")[2:]), "query_id"),
    ("label.csv", 12, lambda s: "\t".join(s.split("\t")[:2] + ["99999999"] + s.split("\t")[3:]), "product_id"),
    ("product.csv", 4, lambda s: "abc\t" + s.split("\t", 1)[1], "product_id"),
    ("query.csv", 3, lambda s: s.split("\t")[0], "query"),
])
def test_malformed_row_names_file_line_and_column(tmp_path, name, line, edit, column):
    d, path = _broken_copy(tmp_path, name, line, edit)
    with pytest.raises(data.DataError) as err:
        testbed.wands_examples(d, GRADES)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}: ") and column in msg and "\n" not in msg


@needs_wands
def test_missing_header_column_and_missing_file(tmp_path):
    d, path = _broken_copy(tmp_path, "label.csv", 1, lambda s: s.replace("product_id", "item_id"))
    with pytest.raises(data.DataError, match=r"label\.csv:1: header lacks column 'product_id'"):
        testbed.wands_examples(d, GRADES)
    with pytest.raises(data.DataError, match="no such file"):
        testbed.wands_examples(str(tmp_path / "nowhere"), GRADES)


# --- the label scale -------------------------------------------------------------------------------------

def test_label_rule_is_checked_and_the_default_is_unchanged():
    assert data.check_label_rule([], 4) == (0, 1, 2, 3) == data.GraphSchema().label_rule
    assert data.check_label_rule([0, 1, 1, 2], 3) == (0, 1, 1, 2)
    for rule, n in (([], 3), ([0, 1, 2], 3), ([0, 2, 1, 2], 3), ([0, 1, 1, 1], 3), ([0, 1, 2, 4], 4)):
        with pytest.raises(ValueError, match="data.label_rule"):
            data.check_label_rule(rule, n)
    cases = [{"category": "mismatch", "brand": "match"}, {"category": "match", "size": "mismatch"},
             {"category": "partial", "color": "match"}, {"category": "match", "color": "match"}]
    schema3 = data.GraphSchema(label_names=("irrelevant", "partial", "exact"), label_rule=(0, 1, 1, 2))
    assert [data.label_from_verdicts(v) for v in cases] == [0, 1, 2, 3]
    assert [schema3.label_from_verdicts(v) for v in cases] == [0, 1, 1, 2]
    # with 3 levels a brand mismatch next to a colour partial no longer decides the label
    v = {"category": "match", "brand": "mismatch", "color": "partial"}
    assert data.DEFAULT_SCHEMA.label_dependence(v)["brand"] and not schema3.label_dependence(v)["brand"]


# --- the WANDS-built catalogue and testbed ---------------------------------------------------------------

def test_wands_testbed_examples_parse_and_use_three_levels(wands_splits):
    cat, splits = wands_splits
    assert set(cat.facet_names.values()) == set(SCHEMA3.facets)
    assert "chair" in cat.leaf_group and "modern" in cat.brand_domain  # from product classes and style facets
    examples = [ex for exs in splits.values() for ex in exs]
    tok = policy.build_word_tokenizer(testbed.vocabulary(SCHEMA3, examples))
    vocab = data.TagVocab.from_tokenizer(tok, SCHEMA3)
    for name, exs in splits.items():
        assert Counter(ex.label for ex in exs).keys() == {0, 1, 2}, name
    for ex in examples:
        assert set(ex.nodes) <= set(SCHEMA3.facets)
        assert ex.label == SCHEMA3.label_from_verdicts(ex.nodes)
        ids = policy.encode(tok, data.serialize_cot(ex.cot, SCHEMA3), strict=True)
        policy.encode(tok, data.format_prompt(ex.query, ex.product), strict=True)
        parsed = data.parse_completion(ids, vocab, SCHEMA3)
        assert parsed.valid and parsed.consistent and parsed.label == ex.label, (ex.to_json(), parsed.problems)
        assert parsed.verdicts == ex.nodes
        assert all(cat.compare(f, *dict(parsed.nodes[f"f:{f}"].content.parts)[f][:2]) == v for f, v in ex.nodes.items())
    kinds = Counter(ex.meta["longtail"] for ex in splits["test_longtail"])
    assert {"brand_alias", "color_synonym", "size_unit"} <= set(kinds)


def test_default_catalogue_is_the_hand_made_one():
    cat = testbed.Catalogue()
    assert cat.facet_names == {f: f for f in data.FACETS} and cat.category_tree is testbed.CATEGORY_TREE
    with pytest.raises(ValueError, match="graph.facets"):
        testbed.generate_splits(SCHEMA3, 1, 2, 0, 0, 0, 0.0, 0.5)  # style is not a facet of the default catalogue


@needs_wands
def test_real_words_stay_out_of_the_vocabulary(real, wands_splits):
    _, splits = wands_splits
    words = set(testbed.vocabulary(SCHEMA3, list(splits["sft"]) + real))
    assert words == set(testbed.vocabulary(SCHEMA3, splits["sft"]))
    assert "salon" not in words and "chair" in words


@needs_wands
def test_wands_config_loads_the_real_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # wands_dir resolves from the repository root, not the working directory
    cfg = load_config(os.path.join(ROOT, "configs", "wands.yaml"),
                      [f"--data.dir={tmp_path}", "--data.n_sft=30", "--data.n_rl=30", "--data.n_test_id=20",
                       "--data.n_test_longtail=20"])
    assert cfg.data.source == "wands" and cfg.data.label_rule == [0, 1, 1, 2]
    task = testbed.load_task(cfg)
    schema, splits = task.schema, task.splits
    assert list(task.tests) == ["test_id", "test_longtail", testbed.WANDS_REAL_SPLIT] and not task.strict
    assert len(splits["wands"]) == 296 and schema.label_names == ("irrelevant", "partial", "exact")
    assert all(ex.cot is not None for ex in splits["sft"])


# --- the lexical baseline --------------------------------------------------------------------------------

def test_lexical_rule():
    spec = importlib.util.spec_from_file_location("wands_experiment", os.path.join(ROOT, "experiments", "wands.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.lexical_label("turquoise pillows", "turquoise pillow cover accent pillows") == 2
    assert mod.lexical_label("salon chair", "velvet accent chair") == 1     # the head noun matches
    assert mod.lexical_label("modern wood desk", "modern wood bench") == 1  # two of three words
    assert mod.lexical_label("dinosaur", "l-shape gaming desk") == 0
