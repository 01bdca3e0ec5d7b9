"""SmolLM2-135M-Instruct on the real WANDS pairs (issue 15): zero-shot with a label prompt, and after fine-tuning on
the WANDS-built synthetic testbed for a fixed CPU budget; next to results/wands.md's lexical rule and majority class.

    python experiments/wands_smollm2.py --minutes 40 --threads 1      # -> results/wands_smollm2.md

The model answers a chat-template question ("How relevant is the product to the query? Answer Exact, Partial or
Irrelevant.") and is read by scoring: the label is the grade whose first token has the highest log-probability as the
answer's first token (no generation, no parsing; every pair gets a label), and, calibrated, the same after subtracting
a content-free pair's log-probabilities (contextual calibration). Fine-tuning (a fair way to fit one CPU hour, as the issue
allows): label-only targets (the cross-entropy of the gold grade's words) on the WANDS-built testbed's synthetic pairs
(configs/wands.yaml: the catalogue comes from WANDS product text, never from the judged pairs' labels or queries),
with the embeddings and all but the top --train-layers decoder layers frozen. The real pairs are only evaluated.

Cross-validated read-out rows (--cv-folds K, default 5; 0: none): how much of the grade the model's zero-shot
log-probabilities carry, measured the way a real user with a few hundred judged pairs would: a linear read-out
(multinomial logistic regression, class-balanced, fitted by hand with L-BFGS) from features to the 3 grades, fitted
on the real pairs of K-1 folds and applied to the held-out fold, the folds split by query (no query in two folds);
every pair is predicted once, by the read-out that never saw it. The same read-out of the lexical rule's own inputs
is the fair comparison. --minutes 0 skips the fine-tuning.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import eval as evaluation  # noqa: E402
from experiments.wands import query_word_hits  # noqa: E402
import policy  # noqa: E402
import testbed  # noqa: E402
from config import cli, load_config  # noqa: E402

GRADES = ("Irrelevant", "Partial", "Exact")  # WANDS's, lowest first: the label index is the position
QUESTION = "How relevant is the product to the query? Answer Exact, Partial or Irrelevant."


def label_prompt(tokenizer, query: str, product: str) -> list[int]:
    messages = [{"role": "user", "content": f"Query: {query}\nProduct: {product}\n{QUESTION}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def grade_logprobs(model, tokenizer, pairs, batch: int = 16) -> torch.Tensor:
    """(n, 3) log-probability of each grade's first token as the answer's first token after each pair's prompt: one
    forward per pair, batched (the grades' first tokens differ, 'Ir' / 'Part' / 'Ex' in SmolLM2's tokenizer, and
    their second tokens are all but certain after them; checked by grade_first_tokens)."""
    first = grade_first_tokens(tokenizer)
    out = []
    for i in range(0, len(pairs), batch):
        ids, attn = policy.left_pad([label_prompt(tokenizer, q, p) for q, p in pairs[i:i + batch]], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=policy.position_ids_from_mask(attn),
                       logits_to_keep=1).logits[:, -1].float()
        out.append(torch.log_softmax(logits, -1)[:, first])
    return torch.cat(out)


def grade_first_tokens(tokenizer) -> list[int]:
    first = [tokenizer.encode(g, add_special_tokens=False)[0] for g in GRADES]
    if len(set(first)) != len(first):
        raise SystemExit(f"wands_smollm2: the grades {GRADES} share a first token in this tokenizer; read whole words")
    return first


def predict(model, tokenizer, pairs, calibrate: bool = False) -> list[int]:
    """argmax over the grades; calibrate: contextual calibration (Zhao et al., 2021), the grades' log-probabilities
    for a content-free pair ('N/A', 'N/A') subtracted first, so the prompt's own preference for a word is removed."""
    with torch.no_grad():
        scores = grade_logprobs(model, tokenizer, pairs)
        if calibrate:
            scores = scores - grade_logprobs(model, tokenizer, [("N/A", "N/A")])
        return scores.argmax(1).tolist()


# ----------------------------------------------------------------------------------------------------------
# cross-validated linear read-out on the real pairs


def lexical_features(query: str, product: str) -> list[float]:
    """(3,) the lexical rule's inputs (experiments/wands.py): the share of the query's content words found in the
    product text, whether its last one (the head noun) is, whether all are; a query of stopwords only: 0, 0, 0."""
    hits = query_word_hits(query, product)
    return [sum(hits) / len(hits), float(hits[-1]), float(all(hits))] if hits else [0.0, 0.0, 0.0]


def query_folds(queries: list[str], k: int) -> list[int]:
    """Fold of each pair: the distinct queries in sorted order are dealt round-robin into k folds, so every pair of
    one query is in the same fold (a read-out is never tested on a query it was fitted on)."""
    rank = {q: i for i, q in enumerate(sorted(set(queries)))}
    return [rank[q] % k for q in queries]


def fit_readout(X: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = 1e-2):
    """Multinomial logistic regression, X (n, d) float64, y (n,) long: features standardised by the fitting rows'
    mean / std, cross-entropy weighted by n / (n_classes * count_c) per class (macro-F1 weighs classes equally),
    plus weight_decay * |W|^2; L-BFGS to convergence. Returns predict(X_new) -> (m,) long."""
    mu, sd = X.mean(0), X.std(0).clamp(min=1e-6)
    Z = (X - mu) / sd
    counts = torch.bincount(y, minlength=n_classes).to(X.dtype)
    cw = torch.where(counts > 0, len(y) / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    W = torch.zeros(X.shape[1], n_classes, dtype=X.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ W + b, y, weight=cw) + weight_decay * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    W, b = W.detach(), b.detach()
    return lambda X_new: (((X_new - mu) / sd) @ W + b).argmax(1)


def cross_validated_predictions(X: torch.Tensor, y: list[int], folds: list[int], n_classes: int) -> list[int]:
    """Each pair's grade from the read-out fitted on every other fold (fit_readout); X (n, d)."""
    y_t, f_t = torch.tensor(y), torch.tensor(folds)
    pred = torch.empty(len(y), dtype=torch.long)
    for k in sorted(set(folds)):
        test = f_t == k
        pred[test] = fit_readout(X[~test], y_t[~test], n_classes)(X[test])
    return pred.tolist()


def finetune(model, tokenizer, examples, minutes: float, train_layers: int, lr: float, batch: int, seed: int) -> dict:
    """Label-only fine-tuning for a wall-clock budget: the gold grade's words after the prompt, cross-entropy over the
    three grades' log-probabilities (the same reading as predict), top `train_layers` layers + final norm trained."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for layer in model.model.layers[-train_layers:] for p in layer.parameters()]
    trainable += list(model.model.norm.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, steps, seen, losses = time.time(), 0, 0, []
    while time.time() - t0 < 60 * minutes:
        idx = torch.randint(len(examples), (batch,), generator=gen).tolist()
        scores = grade_logprobs(model, tokenizer, [(examples[i].query, examples[i].product) for i in idx], batch)
        loss = torch.nn.functional.cross_entropy(scores, torch.tensor([examples[i].label for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps, seen = steps + 1, seen + batch
        losses.append(loss.item())
    model.eval()
    return {"steps": steps, "examples": seen, "minutes": (time.time() - t0) / 60,
            "loss_first_10": sum(losses[:10]) / max(1, len(losses[:10])), "loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m"))
    ap.add_argument("--minutes", type=float, default=40.0, help="fine-tuning budget (wall clock)")
    ap.add_argument("--train-layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cv-folds", type=int, default=5, help="folds of the cross-validated read-out rows (0: none)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "wands_smollm2.md"))
    args, overrides = ap.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    cfg = load_config(os.path.join(ROOT, "configs", "wands.yaml"), overrides)
    task = testbed.load_task(cfg)
    real = task.splits[testbed.WANDS_REAL_SPLIT]
    gold, names = [ex.label for ex in real], list(cfg.data.label_names)
    model, tokenizer = policy.load_policy(args.model, [], dtype="float32", key="--model")
    pairs = [(ex.query, ex.product) for ex in real]
    rows = []
    t0 = time.time()
    zero = predict(model, tokenizer, pairs)
    rows.append({"model": "SmolLM2-135M-Instruct, zero-shot label prompt", **summary(gold, zero, names),
                 "minutes": round((time.time() - t0) / 60, 1)})
    zero_cal = predict(model, tokenizer, pairs, calibrate=True)
    rows.append({"model": "the same, contextual calibration", **summary(gold, zero_cal, names), "minutes": ""})
    if args.cv_folds:
        folds = query_folds([q for q, _ in pairs], args.cv_folds)
        with torch.no_grad():
            lp = grade_logprobs(model, tokenizer, pairs).double()
        lex = torch.tensor([lexical_features(q, p) for q, p in pairs], dtype=torch.float64)
        where = f"fitted on the other {args.cv_folds - 1} folds' real labels ({args.cv_folds} folds by query)"
        for what, X in ((f"lexical rule's inputs, linear read-out {where}", lex),
                        (f"SmolLM2 zero-shot grade log-probs, linear read-out {where}", lp),
                        ("both, linear read-out, the same folds", torch.cat([lex, lp], 1))):
            rows.append({"model": what, **summary(gold, cross_validated_predictions(X, gold, folds, len(names)), names),
                         "minutes": ""})
    info = None
    if args.minutes > 0:
        torch.manual_seed(0)
        train = task.splits["sft"] + task.splits["rl"]
        info = finetune(model, tokenizer, train, args.minutes, args.train_layers, args.lr, args.batch, seed=0)
        tuned = predict(model, tokenizer, pairs)
        rows.append({"model": f"SmolLM2-135M-Instruct, label-only fine-tuning on the WANDS-built testbed ({info['steps']} "
                              f"steps, {info['examples']} synthetic pairs, top {args.train_layers} layers)",
                     **summary(gold, tuned, names), "minutes": round(info["minutes"], 1)})
        tuned_cal = predict(model, tokenizer, pairs, calibrate=True)
        rows.append({"model": "the same, contextual calibration", **summary(gold, tuned_cal, names), "minutes": ""})
    command = "python experiments/wands_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv)
    tuning = (f"fine-tuning: lr {args.lr}, batch {args.batch}, loss {info['loss_first_10']:.3f} (first 10 steps) -> "
              f"{info['loss_last_10']:.3f} (last 10), {info['minutes']:.1f} min wall" if info else "no fine-tuning")
    text = "\n".join([f"# SmolLM2-135M-Instruct on the real WANDS pairs (`{command}`)", "",
                      f"{len(real)} judged pairs; {args.threads} CPU thread(s); {tuning}. Read by the log-probability "
                      f"of each grade's first token after a chat-template question (calibrated rows: minus the same "
                      f"for a content-free pair); every pair gets a label.", "",
                      evaluation.format_table(rows, list(rows[0])), ""])
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


def summary(gold, pred, names) -> dict:
    m = evaluation.summarize_predictions(gold, pred, len(names), names)
    shares = " / ".join(f"{sum(p == k for p in pred) / len(pred):.2f}" for k in range(len(names)))
    return {"accuracy": m["accuracy"], "macro-F1": m["macro_f1"], "predicted " + " / ".join(names): shares}


if __name__ == "__main__":
    cli(main)
