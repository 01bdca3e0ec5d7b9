"""Evaluation (DESIGN section 11): label metrics, then generation-based evaluation of runs.

The metric functions at the top are pure (numpy and plain Python); the generation-based evaluation below
them runs a policy greedily on the test splits, parses its CoTs and scores them.

    python eval.py runs/base/sft              # a run directory (config.yaml + checkpoint/) or a checkpoint
    python eval.py runs/a runs/b --out cmp.md --plot     # one comparison table (+ cmp.png training curves)
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

import data
import policy
import testbed
from config import cli, load_config


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
# Conventions, the same everywhere below:
# - labels are ints 0..K-1; a prediction of None or -1 is unparseable ("invalid");
# - the confusion matrix is (K, K + 1): rows gold, columns predicted, the last column invalid;
# - an invalid prediction is wrong: it counts against accuracy and, as a false negative of its
#   gold class, against that class's recall and hence macro-F1. It is a false positive of no
#   class, so no precision changes. This equals sklearn's
#   f1_score(gold, pred_with_invalid_as_K, labels=range(K), average="macro", zero_division=0).
# - a ratio whose denominator is 0 is 0 (sklearn's zero_division=0).

INVALID = -1


def _is_invalid(p: Any) -> bool:
    return p is None or p == INVALID


def confusion_matrix(gold: Sequence[int], pred: Sequence[int | None], num_classes: int) -> np.ndarray:
    """(K, K + 1) int64 counts: cm[g, p] = #items with gold g predicted p; cm[g, K] = #items with
    gold g whose prediction is invalid (None or -1)."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} items, pred has {len(pred)}")
    cm = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, pred)):
        if g is None or not 0 <= g < num_classes:
            raise ValueError(f"gold[{i}] = {g!r}: expected a label in 0..{num_classes - 1}")
        if _is_invalid(p):
            cm[g, num_classes] += 1
        elif 0 <= p < num_classes:
            cm[g, p] += 1
        else:
            raise ValueError(f"pred[{i}] = {p!r}: expected a label in 0..{num_classes - 1}, None or -1")
    return cm


def accuracy(gold: Sequence[int], pred: Sequence[int | None]) -> float:
    """Share of items whose prediction equals the gold label (invalid predictions are wrong);
    nan for no items."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} items, pred has {len(pred)}")
    if len(gold) == 0:
        return math.nan
    return sum(not _is_invalid(p) and p == g for g, p in zip(gold, pred)) / len(gold)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per class k of a (K, K + 1) confusion matrix: precision = tp / predicted k, recall =
    tp / gold k (invalid predictions included), f1 = 2 tp / (2 tp + fp + fn), support = gold k.
    Each (K,); 0 where the denominator is 0."""
    num_classes = cm.shape[0]
    tp = np.diag(cm[:, :num_classes]).astype(np.float64)  # (K,)
    predicted = cm[:, :num_classes].sum(axis=0)  # (K,) invalid predictions belong to no class
    support = cm.sum(axis=1)  # (K,) includes the invalid column
    fp, fn = predicted - tp, support - tp
    return {
        "precision": _safe_div(tp, predicted),
        "recall": _safe_div(tp, support),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "support": support,
    }


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over all K classes; a class absent from both gold and
    predictions counts 0. Invalid predictions are wrong (they lower their gold class's recall)."""
    return float(per_class_prf(cm)["f1"].mean())


def summarize_predictions(gold: Sequence[int], pred: Sequence[int | None], num_classes: int,
                          label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """All label metrics of one test set as plain Python (JSON-ready):
    n, accuracy, macro_f1, invalid_rate, per_class {name: {precision, recall, f1, support}},
    confusion_matrix (rows gold, columns predicted + invalid) and confusion_columns."""
    names = list(label_names) if label_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label names for {num_classes} classes: {names}")
    cm = confusion_matrix(gold, pred, num_classes)
    prf = per_class_prf(cm)
    n = int(cm.sum())
    return {
        "n": n,
        "accuracy": accuracy(gold, pred),
        "macro_f1": macro_f1(cm),
        "invalid_rate": int(cm[:, num_classes].sum()) / n if n else math.nan,
        "per_class": {name: {"precision": float(prf["precision"][k]), "recall": float(prf["recall"][k]),
                             "f1": float(prf["f1"][k]), "support": int(prf["support"][k])}
                      for k, name in enumerate(names)},
        "confusion_matrix": cm.tolist(),
        "confusion_columns": names + ["invalid"],
    }


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, np.floating):
        return f"{float(value):.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """Markdown table of `rows` (dicts) over `columns` (keys, used as headers): floats with
    `digits` decimals, missing or None values as '-'; numeric columns right-aligned."""
    cells = [[_cell(row.get(c), digits) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float, np.number)) and not isinstance(row.get(c), bool)
                   for row in rows if row.get(c) is not None) and any(row.get(c) is not None for row in rows)
               for c in columns]
    widths = [max([len(str(c)), 3] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line([str(c) for c in columns]), rule] + [line(r) for r in cells])


def format_confusion_matrix(cm: np.ndarray, label_names: Sequence[str]) -> str:
    """Markdown table of a (K, K + 1) confusion matrix: one row per gold label, one column per
    predicted label plus 'invalid'."""
    columns = ["gold \\ pred"] + list(label_names) + ["invalid"]
    rows = [dict(zip(columns, [name] + [int(x) for x in cm[k]])) for k, name in enumerate(label_names)]
    return format_table(rows, columns)


# ----------------------------------------------------------------------------------------------------------
# Generation-based evaluation (DESIGN §11): greedy CoT, parse, score

LONGTAIL_VERDICT_KEY = "longtail_verdicts"


def verifier_agreement(examples, parses, schema, comparator) -> dict:
    """Agreement of each local verifier score kind with gold node correctness, per node type (DESIGN §3):
    {'<kind>/<node type>': share of scored nodes where (score >= 0.5) == (node is right)}."""
    hits: dict[str, list[int]] = {}
    for ex, p in zip(examples, parses):
        scores = data.verifier_scores(p, ex.query, ex.product, comparator, schema)
        for name, vals in scores.items():
            right = data.node_is_correct(name, p, ex, schema)
            if right is None:
                continue
            for kind, s in zip(data.SCORE_KINDS, vals):
                if not math.isnan(s):
                    hits.setdefault(f"{kind}/{schema.slot_info[name].type.name}", []).append(int((s >= 0.5) == right))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def score_completions(examples, completions, vocab, schema, comparator=None) -> dict:
    """Metrics of parsed completions against gold: label metrics (an invalid completion is a wrong
    prediction), format-valid and rule-consistency rates, per-node accuracy where gold nodes exist, and on
    long-tail examples the facet accuracy and the share of each verdict on the long-tail facet."""
    n = len(examples)
    parsed = [data.parse_completion(c, vocab, schema) for c in completions]
    gold = [ex.label for ex in examples]
    pred = [p.label if p.valid else None for p in parsed]
    out = summarize_predictions(gold, pred, len(schema.label_names), list(schema.label_names))
    out["n"] = n
    out["format_valid"] = sum(p.valid for p in parsed) / max(1, n)
    out["rule_consistency"] = sum(p.consistent for p in parsed) / max(1, n)
    node_hits: dict[str, list[int]] = {}
    lt_hits, lt_shares = [], {v: 0 for v in data.VERDICTS + ("missing",)}
    by_kind: dict[str, list[int]] = {}
    for ex, p, y in zip(examples, parsed, pred):
        for name, slot in schema.slot_info.items():  # nodes the example has gold for; the label counts invalid as wrong
            right = int(y == ex.label) if slot.type.role == "label" else data.node_is_correct(name, p, ex, schema)
            if right is not None:
                node_hits.setdefault(name, []).append(int(right))
        kind = ex.meta.get("longtail")
        if kind:
            facet = ex.meta["longtail_facet"]
            got = p.verdicts.get(facet, "missing")
            lt_hits.append(int(got == ex.nodes[facet]))
            lt_shares[got] += 1
            by_kind.setdefault(kind, []).append(int(y == ex.label))
    out["node_accuracy"] = {k: sum(v) / len(v) for k, v in node_hits.items()}
    if comparator is not None:
        out["verifier_agreement"] = verifier_agreement(examples, parsed, schema, comparator)
    if lt_hits:
        out["longtail_facet_accuracy"] = sum(lt_hits) / len(lt_hits)
        out[LONGTAIL_VERDICT_KEY] = {k: v / len(lt_hits) for k, v in lt_shares.items()}
        out["accuracy_by_longtail_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    return out


def generate_greedy(model, tokenizer, examples, batch_size: int, max_new_tokens: int, strict: bool):
    """Greedy CoT for each example, batched, with a KV cache (policy.sample)."""
    prompts = [policy.encode(tokenizer, data.format_prompt(ex.query, ex.product), strict) for ex in examples]
    out = []
    for i in range(0, len(prompts), batch_size):
        out += policy.sample(model, prompts[i:i + batch_size], 1, max_new_tokens, 1.0, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, seed=0, greedy=True)
    return out


def evaluate_policy(model, tokenizer, task, splits: dict, eval_cfg) -> dict:
    """{split name: metrics} for every given split (DESIGN §11); `task` (testbed.Task) gives the schema, the
    verifiers' comparator and whether the words must be known."""
    vocab = data.TagVocab.from_tokenizer(tokenizer, task.schema)
    results = {}
    for name, examples in splits.items():
        if eval_cfg.max_items:
            examples = examples[:eval_cfg.max_items]
        completions = generate_greedy(model, tokenizer, examples, eval_cfg.batch_size, eval_cfg.max_new_tokens,
                                      task.strict)
        results[name] = score_completions(examples, completions, vocab, task.schema, task.comparator)
    return results


def results_table(results: dict) -> str:
    """Markdown: one row per split with the headline numbers and the per-node accuracy."""
    rows = []
    for split, m in results.items():
        row = {"split": split, "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
               "format_valid": m["format_valid"], "rule_consistency": m["rule_consistency"]}
        row.update({f"node/{k}": v for k, v in m["node_accuracy"].items()})
        if "longtail_facet_accuracy" in m:
            row["longtail_facet_acc"] = m["longtail_facet_accuracy"]
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return format_table(rows, cols)


class PlotUnavailable(RuntimeError):
    """Raised when plotting is asked for without its optional extra installed."""


def plot_panels(panels: dict[str, dict[str, list[tuple[Sequence, Sequence]]]], path: str, xlabel: str = "step",
                smooth: dict[str, int] | None = None) -> None:
    """One subplot per panel, one line per label: the mean over that label's runs at the x values they share,
    shaded +- one std over runs (none for a single run). `smooth`: {panel: window} trailing moving average
    applied per run first. matplotlib is an optional extra, imported here only."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("plotting needs the optional extra matplotlib: pip install matplotlib") from None
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    palette = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    color = {label: palette(i % palette.N) for i, label in enumerate(labels)}  # one colour per line in every panel
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        w = (smooth or {}).get(title, 1)
        for label, runs in lines.items():
            runs = [(list(xs), moving_average(list(ys), w)) for xs, ys in runs if len(xs)]
            if not runs:
                continue
            common, ys = aligned_runs(runs)
            if not common:
                continue
            mean = ys.mean(axis=0)
            ax.plot(common, mean, label=f"{label} (n={len(runs)})", lw=1.4, color=color[label])
            if len(runs) > 1:
                sd = ys.std(axis=0, ddof=1)
                ax.fill_between(common, mean - sd, mean + sd, color=color[label], alpha=0.12, lw=0)
        ax.set_title(title + (f", moving average {w}" if w > 1 else ""), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")  # per panel: panels may hold different lines
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def aligned_runs(runs: Sequence[tuple[Sequence, Sequence]]) -> tuple[list, np.ndarray]:
    """(x values every run has, (n_runs, n_x) array of the runs' values there)."""
    common = sorted(set.intersection(*[set(xs) for xs, _ in runs])) if runs else []
    return common, np.array([[dict(zip(xs, ys))[x] for x in common] for xs, ys in runs], dtype=float)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a killed run's torn last line is skipped."""
    recs = []
    for line in open(path):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return recs


def metric_curve(recs: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(RL updates, values) of one metric: the record of step s is after s + 1 updates; an eval/ metric also
    gets its pre-RL point (eval_start/, logged with step 0) at 0 updates."""
    start = key.replace("eval/", "eval_start/", 1)
    pts = [(0, r[start]) for r in recs[:1] if key.startswith("eval/") and start in r]
    pts += [(r["step"] + 1, r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return [x for x, _ in pts], [y for _, y in pts]


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    if window <= 1:
        return ys
    c = np.cumsum(np.insert(np.asarray(ys, dtype=float), 0, 0.0))
    return [(c[i + 1] - c[max(0, i + 1 - window)]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(ys))]


def evaluate_run(cfg, checkpoint: str, out_dir: str, print_table: bool = True) -> dict:
    """Load the policy from `checkpoint`, evaluate every test split of cfg, write out_dir/eval.json."""
    device = policy.resolve_device(cfg.run.device)
    task = testbed.load_task(cfg)
    schema = task.schema
    model, tokenizer = policy.load_policy(checkpoint, schema.words(), dtype=cfg.run.dtype, device=device)
    with policy.autocast(cfg.run.dtype, device):
        results = evaluate_policy(model, tokenizer, task, task.tests, cfg.eval)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    if print_table:
        print(results_table(results))
        for split, m in results.items():
            print(f"\n{split}: confusion matrix (rows gold, columns predicted, last column invalid)")
            print(format_confusion_matrix(np.array(m["confusion_matrix"]), schema.label_names))
    return results


def find_run(path: str) -> tuple[str, str]:
    """A run directory (config.yaml + checkpoint/) or a checkpoint inside one -> (config path, checkpoint)."""
    path = path.rstrip("/")
    if os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isdir(os.path.join(path, "checkpoint")):
        return os.path.join(path, "config.yaml"), os.path.join(path, "checkpoint")
    parent = os.path.dirname(path)
    for up in (parent, os.path.dirname(parent)):
        if os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(up, "config.yaml")):
            return os.path.join(up, "config.yaml"), path
    raise FileNotFoundError(f"{path}: not a run directory (config.yaml + checkpoint/) or a checkpoint inside one")


def run_rows(path: str, results: dict, student_path: str | None) -> list[dict]:
    """Comparison-table rows of one run: its policy (the teacher when a student exists), then its student."""
    rows = []
    models = [("policy", results)]
    if student_path and os.path.exists(student_path):
        models.append(("student", json.load(open(student_path))["student"]))
    for model, res in models:
        row = {"run": path, "model": model}
        for split in ("test_id", "test_longtail"):
            if split in res:
                row[f"{split} acc"], row[f"{split} macro-F1"] = res[split]["accuracy"], res[split]["macro_f1"]
        lt = res.get("test_longtail", {})
        for key in ("format_valid", "rule_consistency", "longtail_facet_accuracy"):
            if key in lt:
                row[f"lt {key}"] = lt[key]
        rows.append(row)
    return rows


def _is_curve_key(key: str) -> bool:
    return key in ("reward", "kl") or key.startswith("alpha/") or (key.startswith("eval/") and key.endswith("/accuracy"))


def training_curves(paths: Sequence[str]) -> dict:
    """plot_panels input from each run's metrics.jsonl: reward, kl, drift evaluations, alpha per edge type."""
    panels: dict[str, dict] = {}
    for path in paths:
        mpath = os.path.join(path, "metrics.jsonl")
        if not os.path.exists(mpath):
            continue
        recs = read_metrics(mpath)
        for key in sorted({k for r in recs for k in r if _is_curve_key(k)}):
            xs, ys = metric_curve(recs, key)
            if xs:
                panels.setdefault(key, {})[path] = [(xs, ys)]
    return panels


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(
        description="Evaluate run directories (or checkpoints) on their config's test splits and print one "
                    "comparison table: a row per run, plus a student row where <run>/student/eval.json exists.")
    ap.add_argument("paths", nargs="+", help="run directories (runs/<name>, runs/<name>/sft) or checkpoint directories")
    ap.add_argument("--max-items", type=int, default=None, help="evaluate the first N items of each split")
    ap.add_argument("--recompute", action="store_true", help="evaluate again even where eval.json exists")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    ap.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                    help="write training curves (reward, kl, accuracy, alpha per edge type); default path: next "
                         "to --out, else curves.png (needs the optional extra matplotlib)")
    args = ap.parse_args(argv)

    def compare():
        rows, run_dirs = [], []
        for path in args.paths:
            cfg_path, ckpt = find_run(path)
            out_dir = path if os.path.isfile(os.path.join(path, "config.yaml")) else os.path.dirname(cfg_path)
            cached = os.path.join(out_dir, "eval.json")
            if os.path.exists(cached) and not args.recompute and args.max_items is None:
                results = json.load(open(cached))
            else:
                cfg = load_config(cfg_path)
                if args.max_items is not None:
                    cfg.eval.max_items = args.max_items
                print(f"# evaluating {path}")
                results = evaluate_run(cfg, ckpt, out_dir, print_table=len(args.paths) == 1)
            rows += run_rows(path, results, os.path.join(out_dir, "student", "eval.json"))
            run_dirs.append(out_dir)
        table = format_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
        print(table)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(table + "\n")
        if args.plot is not None:
            png = args.plot or (os.path.splitext(args.out)[0] + ".png" if args.out else "curves.png")
            try:
                plot_panels(training_curves(run_dirs), png)
                print(f"wrote {png}")
            except PlotUnavailable as err:
                print(f"--plot: {err}")

    cli(compare)


if __name__ == "__main__":
    main()
