"""Which test errors a policy could learn from its own samples (issue 14; results/LOG.md, "What the policy samples"):
per test item, the greedy answer's reward and the rewards of G sampled answers, at one checkpoint. Nothing trains.

    python experiments/reach_screen.py RUN [RUN ...] [--samples 8] [--items 0] [--seed 0] [--out FILE] [--key=value]
    python experiments/reach_screen.py --mean FILE [FILE ...] [--seeds 0-7]   # tables written by --out, over seeds

RUN is a run directory (its final checkpoint) or a checkpoint inside one (e.g. RUN/sft/checkpoint); its config.yaml
gives the data, the reward and the sampling temperature (rl.temperature). Further `--key=value` arguments override
that config (e.g. --data.dir=, as for experiments/credit_screen.py). Per split, an item is

  solved       the greedy answer earns the outcome reward (DESIGN 3: the right label, following the rollout's verdicts);
  in reach     greedy unsolved, at least one of the G samples rewarded: RL can reinforce that answer, and how well
               it credits the steps decides how fast;
  out of reach greedy unsolved, no sample rewarded: an outcome-driven update has nothing to push towards on this
               item (GRPO and every credit form alike); only new tokens (a replayed gold CoT, SFT) or generalisation
               from other items move it.

The same split by the long-tail kind of the item (pivotal: its long-tail facet decides the label).

A second table asks what the graph could propose where sampling fails: for every sampled answer that earned no
reward, the single-verdict repairs, i.e. one facet's verdict changed, the others kept, such that the business rule
then gives the gold label (the outcome label is all it uses, as GRPO), and how many of them write that facet's gold
verdict (a repair that writes a wrong verdict teaches a wrong step with a right label).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import graph_grpo as gg  # noqa: E402
import policy  # noqa: E402
from checkpoint import PathError  # noqa: E402
from experiments.ablation import parse_seeds  # noqa: E402
from experiments.credit_screen import load_run  # noqa: E402

SPLITS = ("test_longtail", "test_id")
MAIN_HEADER = "| checkpoint | split | items | solved | in reach | out of reach | mean sampled reward | same, unsolved |"
REPAIR_TITLE = "Sampled answers with no reward: single-verdict repairs that reach the gold label under the rule"
REPAIR_HEADER = ("| checkpoint | split | failed answers | with a repair | exactly one | one writes the gold verdict "
                 "| repairs that write the gold verdict | the one repair writes it |")
CHUNK = 64  # prompts sampled at once


def item_rewards(cfg, model, tok, task, vocab, examples, samples: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, list[data.ParsedCoT]]:
    """(greedy reward (n,), sampled rewards (n, samples), the samples' parses (n * samples, item-major)) of each
    example under the training reward (DESIGN 3)."""
    rl = dataclasses.replace(cfg.rl, num_generations=samples)
    greedy = evaluation.generate_greedy(model, tok, examples, cfg.eval.batch_size, cfg.eval.max_new_tokens, task.strict)
    g = np.array([gg.outcome_reward(data.parse_completion(c, vocab, task.schema), ex.label,
                                    len(task.schema.label_names), cfg.reward.kind, cfg.reward.format_penalty,
                                    cfg.reward.require_consistent) for c, ex in zip(greedy, examples)])
    s, parses = [], []
    for start in range(0, len(examples), CHUNK):
        exs = examples[start:start + CHUNK]
        prompts = [policy.encode(tok, data.format_prompt(e.query, e.product), task.strict) for e in exs]
        with torch.no_grad():
            ro = gg.sample_rollouts(model, tok, exs, prompts, rl, seed * 100_003 + start)
        gg.score_rollouts(ro, vocab, task.schema, cfg.reward)
        s.append(ro.rewards.view(-1, samples).numpy())
        parses += ro.parses
    return g, np.concatenate(s), parses


def reach_shares(greedy: np.ndarray, sampled: np.ndarray) -> dict[str, float]:
    """Shares of items solved / in reach / out of reach (module docstring), the mean sampled reward, and among the
    unsolved items the mean sampled reward. greedy (n,), sampled (n, G): rewards in [0, 1]; solved means reward 1."""
    solved = greedy >= 1
    hit = (sampled >= 1).any(1)
    n = max(len(greedy), 1)
    unsolved = ~solved
    return {"n": len(greedy), "solved": solved.sum() / n, "in_reach": (unsolved & hit).sum() / n,
            "out_of_reach": (unsolved & ~hit).sum() / n, "sampled": float(sampled.mean()) if len(sampled) else 0.0,
            "sampled_unsolved": float(sampled[unsolved].mean()) if unsolved.any() else 0.0}


def verdict_repairs(parsed: data.ParsedCoT, ex: data.Example, schema: data.GraphSchema) -> tuple[int, int]:
    """(single-verdict repairs, those that write the gold verdict) of one answer: the (facet, verdict) changes of one
    of its facet verdicts, the others kept, after which the business rule gives ex.label. (0, 0) where the answer
    has no facet verdicts (data.single_verdict_repairs); gold verdicts from ex.nodes (none: no repair counts as gold)."""
    fixes = data.single_verdict_repairs(parsed, ex.label, schema)
    return len(fixes), sum(bool(ex.nodes) and ex.nodes.get(f) == v for f, v in fixes)


def repair_shares(repairs: list[tuple[int, int]]) -> dict[str, float]:
    """Over failed answers' (repairs, gold repairs): the share with at least one repair, with exactly one, with one
    that writes the gold verdict, the share of all repairs that write it, and of the answers with exactly one repair
    the share whose repair writes it."""
    n = max(len(repairs), 1)
    total, unique = sum(r for r, _ in repairs), [gd for r, gd in repairs if r == 1]
    return {"n": len(repairs), "any": sum(r > 0 for r, _ in repairs) / n, "unique": len(unique) / n,
            "gold": sum(gd > 0 for _, gd in repairs) / n,
            "precision": sum(gd for _, gd in repairs) / total if total else 0.0,
            "unique_precision": sum(unique) / len(unique) if unique else 0.0}


def groups_of(examples) -> dict[str, np.ndarray]:
    """{group name: boolean mask}: all items, and on the long tail by whether the long-tail facet decides the label."""
    lt = np.array([bool(e.meta.get("longtail")) for e in examples])
    piv = np.array([bool(e.meta.get("pivotal")) for e in examples])
    out = {"all": np.ones(len(examples), bool)}
    if lt.any():
        out |= {"long tail, pivotal": lt & piv, "long tail, not pivotal": lt & ~piv}
    return out


def mean_over_seeds(paths: list[str], seeds: list[int] | None = None) -> str:
    """Both tables of --out files averaged over seeds: a row's checkpoint names a run directory ROW_s<seed> (its
    final checkpoint or one inside it), and rows of the same ROW, split and table are averaged column by column
    (the item and failed-answer counts too). seeds: only these (None: all found); a row missing one of them is left
    out. Markdown, the two tables' headers as the screen writes them."""
    tables: list[dict[tuple[str, str], dict[int, list[float]]]] = [{}, {}]
    for path in paths:
        part = 0  # a row belongs to the table whose header came last (a file may hold several screens' output)
        with open(path) as f:
            for line in f.read().splitlines():
                part = {MAIN_HEADER: 0, REPAIR_HEADER: 1}.get(line.strip(), part)
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                m = re.search(r"([^/]+)_s(\d+)(/|$)", cells[0]) if line.startswith("| ") else None
                if m and cells[2].isdigit():  # a table row, not its header or separator
                    tables[part].setdefault((m.group(1), cells[1]), {})[int(m.group(2))] = [float(c) for c in cells[2:]]
    out = []
    for header, rows in zip((MAIN_HEADER, REPAIR_HEADER), tables):
        out += ["", header, "|---|---|" + "---:|" * (header.count("|") - 3)]
        for (row, split), by_seed in rows.items():
            want = sorted(by_seed) if seeds is None else seeds
            if all(k in by_seed for k in want):
                mean = np.mean([by_seed[k] for k in want], 0)
                out.append(f"| {row} ({len(want)} seeds) | {split} | {mean[0]:.0f} | "
                           + " | ".join(f"{x:.3f}" for x in mean[1:]) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories or checkpoints inside them")
    ap.add_argument("--samples", type=int, default=8, help="G sampled answers per item")
    ap.add_argument("--items", type=int, default=0, help="first N items of each split (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="append the table to this markdown file")
    ap.add_argument("--mean", action="store_true", help="RUN ... are --out files: print their tables averaged over "
                    "seeds (mean_over_seeds)")
    ap.add_argument("--seeds", default="", help="with --mean: only these seeds, e.g. 0-3 (default: all found)")
    args, extra = ap.parse_known_args(argv)
    if args.samples < 1 or args.items < 0:
        raise config.ConfigError("--samples must be at least 1 and --items at least 0")
    if args.mean:
        print(mean_over_seeds(args.runs, parse_seeds(args.seeds) if args.seeds else None), end="")
        return
    lines = [f"`python experiments/reach_screen.py ... --samples {args.samples} --items {args.items} --seed "
             f"{args.seed}{''.join(' ' + x for x in extra)}` (training reward; temperature = the run's rl.temperature "
             "unless overridden)", "", MAIN_HEADER,
             "|---|---|---|---:|---:|---:|---:|---:|"]
    repair_lines = ["", REPAIR_TITLE, "", REPAIR_HEADER, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in args.runs:
        try:
            path, ckpt = evaluation.find_run(run)
        except FileNotFoundError as e:
            raise PathError(str(e)) from None
        _, cfg, task, model, tok, vocab = load_run(os.path.dirname(path), ckpt, extra, args.seed)
        for split in SPLITS:
            exs = task.splits[split][:args.items or None]
            g, s, parses = item_rewards(cfg, model, tok, task, vocab, exs, args.samples, args.seed)
            for name, m in groups_of(exs).items():
                r = reach_shares(g[m], s[m])
                lines.append(f"| {run} | {split}: {name} | {r['n']} | {r['solved']:.3f} | {r['in_reach']:.3f} | "
                             f"{r['out_of_reach']:.3f} | {r['sampled']:.3f} | {r['sampled_unsolved']:.3f} |")
                print(lines[-1], flush=True)
                failed = [verdict_repairs(parses[i * args.samples + j], exs[i], task.schema)
                          for i in np.flatnonzero(m) for j in range(args.samples) if s[i, j] < 1]
                q = repair_shares(failed)
                repair_lines.append(f"| {run} | {split}: {name} | {q['n']} | {q['any']:.3f} | {q['unique']:.3f} | "
                                    f"{q['gold']:.3f} | {q['precision']:.3f} | {q['unique_precision']:.3f} |")
    text = "\n".join(lines + repair_lines) + "\n"
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    config.cli(main)
