"""Does a verdict's outcome in OTHER prompts say whether it is right? A screen of credit pooled across prompts by step
content, before building it into the trainer (issue 14; results/LOG.md, "Evidence pooled across prompts by content").

    python experiments/pool_screen.py RUN_DIR CHECKPOINT [--prompts 1024] [--seed 11] [--prior 1] [--out FILE]
                                      [--data.dir=DIR ...]

The idea screened: Eq. 1a's Q and V average the rollouts of ONE group that wrote the same content; a verdict step
compares values (F_color: 'scarlet' vs 'red') that recur in other prompts, whose outcomes could value it too. A table
keyed by the step's content, ((slot, its compared (facet, query value, product value)s), what it wrote), keeps the sum
and count of a target over every rollout that wrote it; a step's pooled evidence is Qhat(its key) - Vhat(its inputs,
any verdict), each a mean shrunk to 0 by --prior pseudo-counts (pooled_evidence). Targets: the rollout's group-centred
outcome R_i - mean_j R_j ("outcome"), or the step's own in-group evidence a_{i,v} ("group a": pooling Eq. 1a itself).

The first --prompts items of the RL pool are sampled from CHECKPOINT in chunks of rl.prompts_per_step (G rollouts
each, the run's temperature; credit_screen.sample_groups) and read online as a trainer would: each chunk with the
table of the chunks before it, then added (a static policy: the table of a run would hold a moving one's). After a
burn-in of the first quarter of the chunks, each verdict step with a gold verdict is scored; the table reports the AUC
for telling right verdicts from wrong ones (1: every right step above every wrong one; 0.5: chance), over all steps,
where the comparator abstains (the forms it does not know: most long-tail forms) and where it judges, next to the
in-group evidence of Eq. 1a (value 'others', the default) and the comparator's own score. Trains nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import config  # noqa: E402
import credit  # noqa: E402
import data  # noqa: E402
import graph_grpo as gg  # noqa: E402
from credit_screen import load_run, sample_groups  # noqa: E402

SOURCES = ("pooled outcome", "pooled group a", "group a (in-group, Eq. 1a)", "comparator score")


def content_keys(parses: list[data.ParsedCoT], schema: data.GraphSchema) -> list[list[tuple | None]]:
    """(B, N) the table's key of each well-formed verdict step: ((slot, its compared (facet, query value, product
    value)s), (its verdict, its per-facet verdicts)); None elsewhere."""
    verdicts = [name if schema.slot_info[name].type.role == "verdict" else None for name in schema.slots]
    out = []
    for p in parses:
        row = []
        for name in verdicts:
            span = p.nodes.get(name) if name else None
            c = span.content if span is not None and not span.broken else None
            row.append(((name, tuple((f, q, v) for f, (q, v, _) in c.parts)), (c.verdict, tuple(x[2] for _, x in c.parts)))
                       if isinstance(c, data.Verdict) else None)
        out.append(row)
    return out


def pooled_evidence(sums: dict, keys: list[list[tuple | None]], prior: float) -> torch.Tensor:
    """(B, N) Qhat - Vhat of each keyed step, NaN where unkeyed. sums: (inputs, verdict) -> [sum, count] of the
    rollouts that wrote that verdict on those inputs, (inputs,) -> [sum, count] of every rollout with those inputs;
    each mean is sum / (count + prior), so a key never seen gives 0, and inputs always judged one way give 0."""
    def mean(k):
        s, n = sums.get(k, (0.0, 0.0))
        return s / (n + prior) if n + prior > 0 else 0.0
    out = [[float("nan") if k is None else mean(k) - mean(k[:1]) for k in row] for row in keys]
    return torch.tensor(out, dtype=torch.float64).view(len(keys), len(keys[0]) if keys else 0)


def add_to_table(sums: dict, keys: list[list[tuple | None]], targets: torch.Tensor) -> None:
    """In place: each keyed step i, v adds targets[i, v] and a count of 1 under its (inputs, verdict) and (inputs,)."""
    for i, row in enumerate(keys):
        for v, k in enumerate(row):
            if k is not None:
                for key in (k, k[:1]):
                    acc = sums.setdefault(key, [0.0, 0.0])
                    acc[0] += float(targets[i, v])
                    acc[1] += 1.0


def auc(score: torch.Tensor, right: torch.Tensor) -> float:
    """P(score of a right step > score of a wrong one), ties half (NaN without both kinds)."""
    pos, neg = score[right == 1], score[right == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


def screen(cfg, groups, schema, prior: float) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{source: (score, right, comparator abstains)} over the verdict steps with a gold verdict after the burn-in."""
    G = cfg.rl.num_generations
    tables = {"pooled outcome": {}, "pooled group a": {}}
    seen = {name: [] for name in SOURCES}
    burn = len(groups) // 4
    for j, (ro, _, scores, gold) in enumerate(groups):
        keys = content_keys(ro.parses, schema)
        cb = gg.credit_batch(ro.parses, ro.rewards, G, schema, ro.completion_mask.shape[1], scores["verifier"])
        a = credit.group_own_evidence(cb.rewards.double(), cb.keys, cb.present, cb.parents, G,
                                      leave_one_out=True, q_others=True)  # (B, N): credit.value 'others'
        r = ro.rewards.double().view(-1, G)
        centred = (r - r.mean(1, keepdim=True)).reshape(-1, 1).expand_as(a)                            # (B, N)
        comparator = cb.scores[..., data.SCORE_KINDS.index("comparator")].double()                        # NaN: abstains
        keyed = torch.tensor([[k is not None for k in row] for row in keys], dtype=torch.bool).view_as(cb.present)
        m = keyed & cb.present & ~torch.isnan(gold)
        if j >= burn:
            now = {"pooled outcome": pooled_evidence(tables["pooled outcome"], keys, prior),
                   "pooled group a": pooled_evidence(tables["pooled group a"], keys, prior),
                   "group a (in-group, Eq. 1a)": a, "comparator score": comparator.nan_to_num(0.5)}
            for name, x in now.items():
                seen[name].append((x[m], gold[m], torch.isnan(comparator)[m]))
        add_to_table(tables["pooled outcome"], keys, centred)
        add_to_table(tables["pooled group a"], keys, a)
    return {name: tuple(torch.cat([r[k] for r in rows]) for k in range(3)) for name, rows in seen.items()}


def report(results: dict, header: str) -> str:
    lines = [header, "", "| evidence | AUC, all verdict steps | where the comparator abstains | where it judges |",
             "|---|---:|---:|---:|"]
    for name, (x, y, ab) in results.items():
        lines.append(f"| {name} | {auc(x, y):.3f} | {auc(x[ab], y[ab]):.3f} | {auc(x[~ab], y[~ab]):.3f} |")
    x, y, ab = next(iter(results.values()))
    lines += ["", f"{len(y)} verdict steps scored ({int((y == 0).sum())} wrong); the comparator abstains on "
              f"{int(ab.sum())} ({int((y[ab] == 0).sum())} wrong).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--prior", type=float, default=1.0, help="pseudo-counts shrinking each table mean to 0")
    ap.add_argument("--out", default="", help="append the table to this markdown file")
    args, extra = ap.parse_known_args(argv)
    if args.prompts < 1 or args.prior < 0:
        raise config.ConfigError("--prompts must be at least 1 and --prior non-negative")
    _, cfg, task, model, tok, vocab = load_run(args.run_dir, args.checkpoint, extra, args.seed)
    groups = sample_groups(cfg, model, tok, task, vocab, args.prompts, args.seed)
    text = report(screen(cfg, groups, task.schema, args.prior),
                  f"`python experiments/pool_screen.py {args.run_dir} {args.checkpoint} --prompts {args.prompts} "
                  f"--seed {args.seed} --prior {args.prior:g}{''.join(' ' + e for e in extra)}`: "
                  f"{len(groups) * cfg.rl.prompts_per_step} prompts x {cfg.rl.num_generations} rollouts, the first "
                  f"quarter of the chunks as burn-in")
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    config.cli(main)
