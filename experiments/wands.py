"""The real-data (WANDS) table: the policy trained on the WANDS-built synthetic testbed (configs/wands.yaml) and a
lexical-overlap baseline, both scored on the real WANDS pairs (3 grades) with the same metrics (eval.py).

    python experiments/wands.py --run.num_threads=1      # SFT if runs/wands/sft/checkpoint is missing -> results/wands.md
    python experiments/wands.py --convert pairs.jsonl    # only convert data.wands_dir to the project's JSONL

Other arguments are overrides of configs/wands.yaml, e.g. --data.wands_dir=/path/to/WANDS/dataset (the full files).
The policy reads the real text with the tokenizer of its training data: words that text lacks become <unk>, and
the table reports their share (testbed.vocabulary keeps the real pairs' words out of the vocabulary).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import testbed  # noqa: E402
import eval as evaluation  # noqa: E402
import policy  # noqa: E402
import sft_mask  # noqa: E402
from config import ConfigError, UserError, cli, load_config  # noqa: E402

STOPWORDS = {"a", "an", "and", "the", "for", "with", "in", "of", "to", "on", "by", "or"}


# ----------------------------------------------------------------------------------------------------------
# Lexical-overlap baseline: a rule fixed before looking at any label, nothing fitted

def content_words(text: str) -> list[str]:
    """Lower-cased alphanumeric words, singular (testbed.singular), stopwords dropped, in order."""
    return [testbed.singular(w) for w in re.findall(r"[^\W_]+", text.lower()) if w not in STOPWORDS]


def query_word_hits(query: str, product: str) -> list[bool]:
    """Per content word of the query, in order: does it occur among the product text's content words."""
    p = set(content_words(product))
    return [w in p for w in content_words(query)]


def lexical_label(query: str, product: str) -> int:
    """2 exact: every query content word occurs in the product text; 1 partial: the query's last content word
    (the head noun of an English noun phrase, usually the product type) occurs, or at least half of them do;
    0 irrelevant: otherwise; a query of stopwords only is partial. Labels of the WANDS scale (0 / 1 / 2)."""
    hits = query_word_hits(query, product)
    if not hits:
        return 1
    if all(hits):
        return 2
    return 1 if hits[-1] or 2 * sum(hits) >= len(hits) else 0


# ----------------------------------------------------------------------------------------------------------
# Unknown words: what the policy actually reads of the real text

def unknown_shares(tokenizer, examples, train_words: set[str]) -> dict[str, float]:
    """Shares of the real pairs' word tokens that are <unk> for the policy's tokenizer (query, product, all),
    that never occur in the SFT split's text (the words SFT trained on), and of queries with any <unk>."""
    counts = Counter()
    for ex in examples:
        for side, text in (("query", ex.query), ("product", ex.product)):
            ids = policy.encode(tokenizer, text, strict=False)
            unk = policy.count_unknown(tokenizer, ids)
            counts[f"{side}_tokens"] += len(ids)
            counts[f"{side}_unk"] += unk
            counts["untrained"] += sum(w not in train_words for w in text.split())
            if side == "query":
                counts["queries_with_unk"] += unk > 0
    tokens = counts["query_tokens"] + counts["product_tokens"]
    return {"unk_tokens_all": (counts["query_unk"] + counts["product_unk"]) / tokens,
            "unk_tokens_query": counts["query_unk"] / counts["query_tokens"],
            "unk_tokens_product": counts["product_unk"] / counts["product_tokens"],
            "tokens_not_in_sft_text": counts["untrained"] / tokens,
            "queries_with_any_unk": counts["queries_with_unk"] / len(examples)}


def sft_words(examples) -> set[str]:
    words = set()
    for ex in examples:
        words.update(ex.query.split())
        words.update(ex.product.split())
        for v in (ex.cot or {}).values():
            words.update(v.split())
    return words


# ----------------------------------------------------------------------------------------------------------
# The report

def prediction_shares(pred, names) -> str:
    n = len(pred)
    shares = [sum(p == k for p in pred) / n for k in range(len(names))] + [sum(p is None for p in pred) / n]
    return " / ".join(f"{s:.2f}" for s in shares)


def metric_row(name: str, gold, pred, names) -> dict:
    m = evaluation.summarize_predictions(gold, pred, len(names), names)
    return {"model": name, "n": m["n"], "accuracy": m["accuracy"], "macro-F1": m["macro_f1"],
            "invalid": m["invalid_rate"], "predicted " + " / ".join(names) + " / invalid": prediction_shares(pred, names),
            "_cm": np.array(m["confusion_matrix"])}


def write_report(path: str, cfg, real, rows, by_source, unk, synth, command: str, wall: str) -> str:
    names = list(cfg.data.label_names)
    dist = Counter(ex.label for ex in real)
    lines = [
        "# WANDS: real query-product pairs, 3 grades",
        "",
        f"Command: `{command}` ({wall}). Config: `configs/wands.yaml`; real pairs: `{cfg.data.wands_dir}` "
        f"({len(real)} judged pairs, {len({ex.meta['query_id'] for ex in real})} queries, label-only).",
        "",
        "Gold class distribution: " + ", ".join(f"{names[k]} {dist[k]} ({dist[k] / len(real):.1%})"
                                                for k in range(len(names))) + ".",
        "",
        evaluation.format_table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                                [k for k in rows[0] if not k.startswith("_")]),
        "",
        "By provenance of the labels (`source` column of label.csv: `fixture` is a plain random sample of WANDS "
        "labels, `hj` pairs were drawn to have different labels within a query):",
        "",
        evaluation.format_table(by_source, list(by_source[0])),
        "",
        "What the policy reads of the real text (its tokenizer is built from the training text only):",
        "",
        evaluation.format_table([{"measure": k, "share": v} for k, v in unk.items()], ["measure", "share"]),
        "",
        "The policy on its own synthetic test splits (same checkpoint, the WANDS-built catalogue): "
        + ", ".join(f"{s} accuracy {m['accuracy']:.3f} / macro-F1 {m['macro_f1']:.3f}" for s, m in synth.items()) + ".",
        "",
    ]
    for r in rows:
        lines += [f"Confusion matrix, {r['model']} (rows gold, columns predicted):", "",
                  evaluation.format_confusion_matrix(r["_cm"], names), ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = "\n".join(lines)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Other --section.key=value arguments override the config.")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "wands.yaml"))
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "wands.md"), help="the markdown report")
    ap.add_argument("--convert", metavar="JSONL", help="only convert data.wands_dir to JSONL at this path")
    args, overrides = ap.parse_known_args(argv)
    command = "python experiments/wands.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    os.chdir(ROOT)  # config paths (data.dir, run.out_dir) are relative to the repository root

    def run():
        cfg = load_config(args.config, overrides)
        if args.convert:
            exs = testbed.convert_wands(testbed.resolve_wands_dir(cfg.data.wands_dir), args.convert,
                                        cfg.data.wands_grades)
            print(f"wrote {len(exs)} examples to {args.convert}")
            return
        try:
            task = testbed.load_task(cfg)
        except ValueError as err:  # also a WANDS-built catalogue without the schema's facets
            raise UserError(str(err)) from err
        schema, splits = task.schema, task.splits
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        names = list(schema.label_names)
        if len(names) != 3:
            raise ConfigError(f"data.label_names = {names}: the lexical baseline predicts the 3 WANDS grades")
        sft_dir = os.path.join(cfg.run.out_dir, "sft")
        ckpt = os.path.join(sft_dir, "checkpoint")
        if not os.path.isdir(ckpt):
            print(f"# training the SFT policy -> {ckpt}")
            sft_mask.run_sft(cfg, sft_dir, print_table=False)
        device = policy.resolve_device(cfg.run.device)
        model, tokenizer = policy.load_policy(ckpt, schema.words(), dtype=cfg.run.dtype, device=device)
        real = splits[testbed.WANDS_REAL_SPLIT]
        synthetic = {s: splits[s] for s in ("test_id", "test_longtail")}
        vocab = data.TagVocab.from_tokenizer(tokenizer, schema)
        with policy.autocast(cfg.run.dtype, device):
            synth = evaluation.evaluate_policy(model, tokenizer, task, synthetic, cfg.eval)
            completions = evaluation.generate_greedy(model, tokenizer, real, cfg.eval.batch_size,
                                                     cfg.eval.max_new_tokens, strict=False)
        res_real = evaluation.score_completions(real, completions, vocab, schema)
        parsed = [data.parse_completion(c, vocab, schema) for c in completions]
        policy_pred = [p.label if p.valid else None for p in parsed]
        lexical_pred = [lexical_label(ex.query, ex.product) for ex in real]
        constant = Counter(ex.label for ex in real).most_common(1)[0][0]
        gold = [ex.label for ex in real]
        models = [("SFT policy (CoT, masked SFT on the WANDS-built testbed)", policy_pred),
                  ("lexical overlap rule (no fitting)", lexical_pred),
                  (f"constant '{names[constant]}' (the test majority; reference only)", [constant] * len(real))]
        rows = [metric_row(n, gold, p, names) for n, p in models]
        rows[0]["format valid"] = res_real["format_valid"]
        rows[0]["rule consistent"] = res_real["rule_consistency"]
        by_source = []
        for src in sorted({ex.meta.get("source", "") for ex in real}):
            idx = [i for i, ex in enumerate(real) if ex.meta.get("source", "") == src]
            row = {"source": src or "-", "n": len(idx)}
            for short, (_, pred) in zip(("policy", "lexical"), models):
                m = evaluation.summarize_predictions([gold[i] for i in idx], [pred[i] for i in idx], len(names), names)
                row[f"{short} acc"], row[f"{short} macro-F1"] = m["accuracy"], m["macro_f1"]
            by_source.append(row)
        unk = unknown_shares(tokenizer, real, sft_words(splits["sft"]))
        wall = f"{time.time() - t0:.0f} s wall on this machine, {cfg.run.num_threads or 'all'} thread(s)"
        print(write_report(args.out, cfg, real, rows, by_source, unk, synth, command, wall))
        print(f"\nwrote {args.out}")

    cli(run)

if __name__ == "__main__":
    main()
