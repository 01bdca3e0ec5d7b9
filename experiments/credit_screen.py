"""Credit accuracy of many credit forms on the same sampled groups at one checkpoint, without training (issue 14;
DESIGN 4.2; results/LOG.md, "Credit accuracy without training").

    python experiments/credit_screen.py RUN_DIR CHECKPOINT [--prompts 256] [--seed 0] [--rollout-samples 4]
                                        [--forms 1,2,6] [--by-verdict] [--gradients] [--out results/credit_screen.md]
                                        [--data.dir=DIR ...]

RUN_DIR holds the config.yaml of a run (its data, graph and credit settings); CHECKPOINT is the policy to sample
from (an SFT start, or an RL checkpoint). The first --prompts items of the RL pool are sampled once, G rollouts
each (the run's rl.num_generations and temperature), scored, and every form in FORMS computes its advantages on
those same rollouts through the trainer's own path (graph_grpo.Credit.from_config -> credit.compute_advantages);
the credit accuracy is DESIGN 4.2's, read where the trainer reads it (credit.node_applied_advantages,
credit.credit_accuracy_sums, graph_grpo.credit_accuracy_metrics). Alpha is each form's credit.alpha_init (the
learned alpha of a meta run is not used), the verifier weights are credit.verifier_weights. Further `--key=value`
arguments override RUN_DIR's config for every form (e.g. --data.dir=, where the run's relative data.dir was meant
from another directory: a synthetic data.dir that does not exist is refused rather than generated anew).

It answers what the training studies cannot afford to: how often each form gives a correct step a negative
advantage in the same groups, including the forms that use gold step labels, which bound what non-gold credit
can reach under this sign-based measure. It trains nothing and says nothing about which form learns better.
With --gradients it also compares the forms' step gradients (gradient_similarity): how far a credit form turns one
step's update, and the expected update, away from GRPO's, against how far a second sample of rollouts turns it
(results/LOG.md, "How far a credit form moves the update from GRPO's"; results/credit_gradients.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import credit  # noqa: E402
import data  # noqa: E402
import graph_grpo as gg  # noqa: E402
import policy  # noqa: E402
import testbed  # noqa: E402
from checkpoint import PathError  # noqa: E402

# (label, config overrides on top of RUN_DIR's config). Uses gold: the last two.
FORMS = (
    ("GRPO (outcome)", ("--credit.mode=outcome",)),
    ("the run's credit as configured", ()),
    ("group + verifier evidence, alpha 0", ("--credit.mode=graph", "--credit.evidence=both", "--credit.alpha_init=0")),
    ("group evidence only, alpha 0", ("--credit.mode=graph", "--credit.evidence=group", "--credit.alpha_init=0")),
    ("group evidence only, alpha 1", ("--credit.mode=graph", "--credit.evidence=group", "--credit.alpha_init=1")),
    ("the run's credit + verifier shield", ("--credit.shield=verifier",)),
    ("Monte-Carlo node values, alpha 0", ("--credit.mode=graph", "--credit.evidence=rollout", "--credit.alpha_init=0")),
    ("Monte-Carlo node values, alpha 1", ("--credit.mode=graph", "--credit.evidence=rollout", "--credit.alpha_init=1")),
    ("outcome at the label + label-probe evidence (weight 3), alpha 0",
     ("--credit.mode=graph", "--credit.evidence=outcome", "--credit.probe_weight=3", "--credit.alpha_init=0")),
    ("outcome at the label + label-probe evidence (weight 3), alpha 1",
     ("--credit.mode=graph", "--credit.evidence=outcome", "--credit.probe_weight=3", "--credit.alpha_init=1")),
    ("the run's credit + label-probe evidence (weight 3)", ("--credit.probe_weight=3",)),
    ("process (verifier evidence, alpha 0)", ("--credit.mode=process",)),
    ("TaoSR-SHE stepwise (gold step labels)", ("--credit.mode=stepwise",)),
    ("gold step labels as verifier scores, group + verifier evidence, alpha 1",
     ("--credit.mode=graph", "--credit.evidence=both", "--credit.alpha_init=1", "--reward.local_scores=gold")),
    ("the run's credit + complete shield (judged verdicts only)", ("--credit.shield=complete",)),
    ("the run's credit + verifier shield on verdict steps only",
     ("--credit.shield=verifier", "--credit.shield_roles=[verdict]")),
    ("the run's credit + verifier shield on steps called right", ("--credit.shield=verifier",
                                                                  "--credit.shield_verdicts=[right]")),
    ("the run's credit + verifier shield on steps called right + vouched label",
     ("--credit.shield=verifier", "--credit.shield_verdicts=[right]", "--credit.shield_label=true")),
    ("the run's credit + verifier shield on steps called right, clean steps of unparsed answers keep node credit",
     ("--credit.shield=verifier", "--credit.shield_verdicts=[right]", "--credit.unparsed=nodes")),
    ("the run's credit, clean steps of unparsed answers keep node credit", ("--credit.unparsed=nodes",)),
)
COLUMNS = (("credit/misassigned_correct", "P(A<0 \\| correct)"),
           ("credit/misassigned_correct/evidence", "same, understanding steps"),
           ("credit/misassigned_correct/verdict", "same, verdict steps"),
           ("credit/misassigned_correct/label", "same, label"),
           ("credit/misassigned_wrong", "P(A>0 \\| wrong)"),
           ("credit/misassigned_wrong/verdict", "same, verdict steps"),
           ("credit/wrong_mass_share", "\\|A\\| share on wrong steps of failed rollouts"),
           ("screen/label_share_of_blamed", "labels' share of the correct steps given A<0"),
           ("screen/unjudged_share", "unjudged share of verdict steps"),
           ("screen/unjudged_wrong_blamed", "P(A<0 \\| wrong, unjudged)"),
           ("screen/unjudged_right_blamed", "P(A<0 \\| correct, unjudged)"),
           ("screen/blame_parsed", "P(A<0 \\| correct), answers that parse"),
           ("screen/blamed_unparsed_share", "blamed correct steps: share in answers that do not parse"),
           ("screen/blamed_called_wrong_share", "share called wrong by the verifiers"),
           ("screen/blamed_label_share", "share on labels (answers that parse)"),
           ("screen/vouched_failed_correct", "vouched \\| correct label, failed"),
           ("screen/vouched_failed_wrong", "vouched \\| wrong label, failed"))


def load_run(run_dir: str, checkpoint: str, overrides: list[str], seed: int) -> tuple:
    """(RUN_DIR's config path, its config with `overrides`, the task, the policy at CHECKPOINT on the CPU, its tokenizer
    and tag vocabulary), torch seeded; PathError naming the file where RUN_DIR has no config.yaml or its synthetic
    data.dir does not exist from here."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise PathError(f"{path}: no such file (RUN_DIR must be a run directory with its config.yaml)")
    cfg = config.load_config(path, overrides)
    if cfg.data.source == "synthetic" and not os.path.isdir(cfg.data.dir):
        raise PathError(f"data.dir = {cfg.data.dir} (from {path}) does not exist here: run from the directory the run "
                        f"was started in, or pass --data.dir=")
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.run.num_threads or 1)
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(checkpoint, task.schema.words(), dtype=torch.float32, device="cpu",
                                    key="CHECKPOINT")
    return path, cfg, task, model, tok, data.TagVocab.from_tokenizer(tok, task.schema)


def sample_groups(cfg, model, tok, task, vocab, n_prompts: int, seed: int) -> list[tuple]:
    """[(rollouts, prompt ids, per-source local scores, gold correctness)] in chunks of rl.prompts_per_step."""
    pool, G, chunk, out = task.splits["rl"], cfg.rl.num_generations, cfg.rl.prompts_per_step, []
    for start in range(0, min(n_prompts, len(pool)), chunk):
        exs = pool[start:start + chunk]
        prompts = [policy.encode(tok, data.format_prompt(e.query, e.product), task.strict) for e in exs]
        with torch.no_grad():
            ro = gg.sample_rollouts(model, tok, exs, prompts, cfg.rl, seed * 100_003 + start)
        gg.score_rollouts(ro, vocab, task.schema, cfg.reward)
        golds = [ex for ex in ro.examples for _ in range(G)]
        scores = {src: gg.local_node_scores(ro.parses, golds, task.schema, task.comparator, src)
                  for src in ("verifier", "gold")}
        out.append((ro, prompts, scores, gg.gold_correctness(ro, task.schema)))
    return out


def form_advantages(cfg, s, group, j: int, seed: int) -> tuple[torch.Tensor, credit.CreditBatch, torch.Tensor]:
    """(token advantages (B, T), the credit batch, the rewards) of one form on one chunk of groups, through the
    trainer's path; alpha is the form's credit.alpha_init, the verifier weights its credit.verifier_weights."""
    ro, prompts, scores, _ = group
    cr, G, schema = gg.Credit.from_config(cfg), cfg.rl.num_generations, s.task.schema
    alpha = torch.full((len(schema.edge_kinds),), float(cr.alpha_init), dtype=torch.float64)
    weights = torch.tensor(cfg.credit.verifier_weights, dtype=torch.float64)
    T = ro.completion_mask.shape[1]
    rewards = gg.shaped_rewards(ro.rewards, ro.parses, scores[cr.scores], cfg.reward.shaping_weights) \
        if cr.shaped else ro.rewards
    cb = gg.credit_batch(ro.parses, rewards, G, schema, T, scores[cr.scores] if cr.scores else None,
                         shield_roles=cfg.credit.shield_roles)
    if cr.monte_carlo:
        with torch.no_grad():
            cb.values, _ = gg.monte_carlo_values(s, ro, prompts, cb, seed + gg.MC_SEED + j)
    if cr.probes:
        cb.probes, _ = gg.step_probes(s, ro, prompts, cb)
    adv, _ = credit.compute_advantages(cb, num_tokens=T, alpha=alpha, verifier_weights=weights, **cr.kwargs)
    return adv.detach(), cb, rewards


def unjudged_blame_counts(node_adv: torch.Tensor, correct: torch.Tensor, outcome_adv: torch.Tensor,
                          unjudged: torch.Tensor) -> torch.Tensor:
    """(4,) counts on the steps a verifier kind that judges them left without a score (unjudged (B, N) bool; the
    verdicts over forms the comparator does not know), in rollouts with a nonzero outcome advantage: wrong steps,
    those given A < 0, correct steps, those given A < 0. node_adv (B, N), NaN where absent; correct (B, N) 1 / 0 /
    NaN (no gold); outcome_adv (B,). results/LOG.md, "A shield that trusts only judged verdicts"."""
    live = unjudged & ~torch.isnan(node_adv) & ~torch.isnan(correct) & (outcome_adv != 0)[:, None]
    wrong, right, blamed = live & (correct == 0), live & (correct == 1), node_adv < 0
    return torch.stack([wrong.sum(), (wrong & blamed).sum(), right.sum(), (right & blamed).sum()]).double()


def blame_parts_counts(node_adv: torch.Tensor, correct: torch.Tensor, outcome_adv: torch.Tensor, parsed: torch.Tensor,
                       verdict: torch.Tensor, label: list[int]) -> torch.Tensor:
    """(5,) where the blame of correct steps sits, in rollouts with a nonzero outcome advantage: correct steps of
    answers that parse, those given A < 0; and of every correct step given A < 0, those in answers that do not parse
    (their tokens all take the outcome advantage, credit.token_advantages), and in answers that parse those the
    verifiers call wrong (verdict -1) and those on a label slot (where the outcome enters). node_adv (B, N), NaN
    where absent; correct (B, N) 1 / 0 / NaN; outcome_adv (B,); parsed (B,) bool; verdict (B, N) in {-1, 0, 1}
    (credit.verified_steps). results/LOG.md, "Where the blame of correct steps sits"."""
    live = ~torch.isnan(node_adv) & (correct == 1) & (outcome_adv != 0)[:, None]
    blamed, ok = live & (node_adv < 0), parsed[:, None].expand_as(live)
    is_label = torch.zeros_like(live)
    is_label[:, label] = True
    return torch.stack([(live & ok).sum(), (blamed & ok).sum(), (blamed & ~ok).sum(),
                        (blamed & ok & (verdict < 0)).sum(), (blamed & ok & is_label).sum()]).double()


def vouched_label_counts(correct: torch.Tensor, outcome_adv: torch.Tensor, vouched: torch.Tensor,
                         label: list[int]) -> torch.Tensor:
    """(4,) counts over the label slots of failed rollouts (outcome advantage < 0) with a gold label: correct labels,
    those the verifiers vouch for (credit.vouched_sinks: credit.shield_label spares their blame), wrong labels, those
    vouched for. correct (B, N) 1 / 0 / NaN; outcome_adv (B,); vouched (B, N) bool. Under RL label noise a vouched
    correct label is one a wrong RL label failed; a vouched wrong label is blame the label shield loses
    (results/LOG.md, "Where the blame of correct steps sits, and a shield for the vouched label")."""
    c, v = correct[:, label], vouched[:, label]
    failed = ~torch.isnan(c) & (outcome_adv < 0)[:, None]
    right, wrong = failed & (c == 1), failed & (c == 0)
    return torch.stack([right.sum(), (right & v).sum(), wrong.sum(), (wrong & v).sum()]).double()


def verdict_breakdown_counts(node_adv: torch.Tensor, correct: torch.Tensor, outcome_adv: torch.Tensor,
                             verdict: torch.Tensor, longtail: torch.Tensor, roles: list[str]) -> dict[tuple, list[int]]:
    """{(role, 'long tail' | 'head', 'correct' | 'wrong', verifiers' verdict -1 / 0 / 1): [steps, given A < 0,
    given A > 0]} over the steps with gold in rollouts with a nonzero outcome advantage. node_adv (B, N), NaN where
    absent; correct (B, N) 1 / 0 / NaN; outcome_adv (B,); verdict (B, N) credit.verified_steps of the verifiers'
    scores; longtail (B,) bool: the rollout's prompt carries a long-tail form; roles (N,) each slot's node role."""
    live = ~torch.isnan(node_adv) & ~torch.isnan(correct) & (outcome_adv != 0)[:, None]
    out: dict[tuple, list[int]] = {}
    for i, v in live.nonzero().tolist():
        key = (roles[v], "long tail" if longtail[i] else "head", "correct" if correct[i, v] == 1 else "wrong",
               int(verdict[i, v]))
        c = out.setdefault(key, [0, 0, 0])
        c[0], c[1], c[2] = c[0] + 1, c[1] + int(node_adv[i, v] < 0), c[2] + int(node_adv[i, v] > 0)
    return out


def screen_form(cfg, groups, s, seed: int) -> dict:
    """credit_accuracy_metrics of one form summed over every chunk of groups; screen/vouched_failed_correct |
    _wrong: of the correct and of the wrong labels of failed rollouts, the share the verifiers vouch for
    (vouched_label_counts; the same for every form); screen/blame_parsed and screen/blamed_*_share: where the blamed
    correct steps sit (blame_parts_counts); screen/label_share_of_blamed: of the
    correct steps given A < 0, the share that are label nodes (where the outcome enters: under RL label noise a correct
    label in a rollout a wrong RL label fails is blamed by every form that rewards the label by the outcome); and
    screen/unjudged_*_blamed: P(A < 0) of the wrong and of the correct steps the comparator did not judge, and
    screen/unjudged_share: their share of the verdict steps with gold (unjudged_blame_counts); under 'breakdown',
    verdict_breakdown_counts summed over the chunks (--by-verdict prints it)."""
    G, schema = cfg.rl.num_generations, s.task.schema
    sums = {k: torch.zeros(len(schema.slots), dtype=torch.float64) for k in credit.CREDIT_ACCURACY}
    unjudged, vouched = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    parts = torch.zeros(5, dtype=torch.float64)
    roles, breakdown = [schema.slot_info[name].type.role for name in schema.slots], {}
    label = [v for v, role in enumerate(roles) if role == "label"]
    for j, group in enumerate(groups):
        adv, cb, rewards = form_advantages(cfg, s, group, j, seed)
        outcome = credit.outcome_advantages(rewards, G, "group", cfg.credit.eps)
        node_adv = credit.node_applied_advantages(adv.double(), cb.spans, cb.present)
        acc = credit.credit_accuracy_sums(node_adv, group[3], outcome.double())
        for k in sums:
            sums[k] += acc[k]
        verifier = gg.credit_batch(group[0].parses, rewards, G, schema, adv.shape[1], group[2]["verifier"])
        missing = cb.present & (verifier.judging[None] & torch.isnan(verifier.scores)).any(-1)  # (B, N)
        unjudged += unjudged_blame_counts(node_adv, group[3], outcome.double(), missing)
        longtail = torch.tensor([bool(ex.meta.get("longtail")) for ex in group[0].examples]).repeat_interleave(G)
        verdict = credit.verified_steps(verifier.scores, verifier.present)
        parts += blame_parts_counts(node_adv, group[3], outcome.double(), cb.parsed, verdict, label)
        judged = credit.verified_steps(verifier.scores, verifier.present, verifier.judging)  # as credit.shield_label
        vouched += vouched_label_counts(group[3], outcome.double(), credit.vouched_sinks(judged, verifier.present,
                                                                                          verifier.parents), label)
        for k, c in verdict_breakdown_counts(node_adv, group[3], outcome.double(), verdict, longtail, roles).items():
            breakdown[k] = [a + b for a, b in zip(breakdown.get(k, [0, 0, 0]), c)]
    rec = gg.credit_accuracy_metrics(sums, schema, by="role")  # by role, whatever the node types are called
    verdicts = [v for v, role in enumerate(roles) if role == "verdict"]
    if verdicts and (sums["right"][verdicts].sum() + sums["wrong"][verdicts].sum()) > 0:
        rec["screen/unjudged_share"] = float((unjudged[0] + unjudged[2]) /
                                             (sums["right"][verdicts].sum() + sums["wrong"][verdicts].sum()))
    if unjudged[0] > 0:
        rec["screen/unjudged_wrong_blamed"] = float(unjudged[1] / unjudged[0])
    if unjudged[2] > 0:
        rec["screen/unjudged_right_blamed"] = float(unjudged[3] / unjudged[2])
    if parts[0] > 0:
        rec["screen/blame_parsed"] = float(parts[1] / parts[0])
    if parts[1] + parts[2] > 0:
        for name, k in (("unparsed", 2), ("called_wrong", 3), ("label", 4)):
            rec[f"screen/blamed_{name}_share"] = float(parts[k] / (parts[1] + parts[2]))
    for name, (n, k) in (("correct", (0, 1)), ("wrong", (2, 3))):
        if vouched[n] > 0:
            rec[f"screen/vouched_failed_{name}"] = float(vouched[k] / vouched[n])
    rec["breakdown"] = breakdown
    if sums["right_negative"].sum() > 0:
        rec["screen/label_share_of_blamed"] = float(sums["right_negative"][label].sum() / sums["right_negative"].sum())
    return rec


def step_gradient(model, ro, adv: torch.Tensor, rl) -> torch.Tensor:
    """The flattened policy gradient of one RL step's loss (DESIGN 6) on these rollouts at ratio 1 (the step's first
    update, where the clip is inactive and the term's gradient is -A_t grad log pi_t), with the trainer's
    aggregation over this chunk's tokens and sequences; no KL term."""
    out = gg.logprobs_of(model, ro, rl.temperature)
    mask = ro.completion_mask.float()
    w = gg.aggregation_weights(mask, rl.aggregation, float(mask.sum()), float(mask.shape[0]), rl.max_new_tokens)
    loss = -(w * adv.to(out.logprobs.dtype) * out.logprobs).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def expected_gradient_cosine(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> float:
    """The cosine between two forms' EXPECTED gradients, from two independent samples of each (a1, a2 of form a;
    b1, b2 of form b; b1 on a1's rollouts, b2 on a2's): for independent samples E[<a1, b2>] = <E a, E b>, so
    (<a1, b2> + <a2, b1>) / 2 / sqrt(<a1, a2> <b1, b2>) estimates it without the sampling noise, which pulls the
    cosine of two forms on the same rollouts up (they share it) and that of independent samples towards 0 (NaN
    where a form's cross-sample dot is not positive: noise only)."""
    ab = (torch.dot(a1, b2) + torch.dot(a2, b1)) / 2
    aa, bb = torch.dot(a1, a2), torch.dot(b1, b2)
    return float(ab / torch.sqrt(aa * bb)) if aa > 0 and bb > 0 else float("nan")


def gradient_similarity(forms: list[tuple[str, object]], groups, regroups, s, seed: int) -> list[tuple[str, dict]]:
    """Per form, per chunk (one RL step's prompts): the cosine of its step gradient with GRPO's (the first form) on
    the same rollouts, and with its own gradient on an independent second sample of rollouts of the same prompts
    (what sampling alone changes); the means over chunks, and the form's gradient norm relative to GRPO's. Over all
    chunks together (the gradient of every prompt): the cosine of the form's expected gradient with GRPO's
    (expected_gradient_cosine), whether the credit form changes where the updates go on average."""
    out = {label: {"cos_grpo": [], "cos_resample": [], "norm_ratio": []} for label, _ in forms}
    total = {label: [0.0, 0.0] for label, _ in forms}  # the summed gradients of the two samples
    for j, (group, regroup) in enumerate(zip(groups, regroups)):
        grads = {}
        for label, cfg in forms:
            g = step_gradient(s.model, group[0], form_advantages(cfg, s, group, j, seed)[0], cfg.rl)
            g2 = step_gradient(s.model, regroup[0], form_advantages(cfg, s, regroup, j, seed + 1)[0], cfg.rl)
            grads[label] = g
            total[label] = [total[label][0] + g, total[label][1] + g2]
            out[label]["cos_resample"].append(float(torch.nn.functional.cosine_similarity(g, g2, dim=0)))
        ref = grads[forms[0][0]]
        for label, _ in forms:
            out[label]["cos_grpo"].append(float(torch.nn.functional.cosine_similarity(grads[label], ref, dim=0)))
            out[label]["norm_ratio"].append(float(grads[label].norm() / ref.norm()))
    ref = total[forms[0][0]]
    rows = []
    for label, m in out.items():
        row = {k: sum(v) / len(v) for k, v in m.items()}
        row["cos_expected"] = expected_gradient_cosine(*total[label], *ref)
        rows.append((label, row))
    return rows


def report(rows: list[tuple[str, dict]], header: str) -> str:
    lines = [header, "", "| credit form | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.3f}" if k in m else "-" for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def breakdown_report(rows: list[tuple[str, dict]]) -> str:
    """--by-verdict: per (node role, long-tail or head prompt, gold correctness, the verifiers' verdict), the steps
    and each form's P(A<0) / P(A>0) there (the step counts are the same for every form: the same rollouts)."""
    keys = sorted({k for _, m in rows for k in m["breakdown"]})
    lines = ["", "By the verifiers' verdict (`--by-verdict`; verdict: credit.verified_steps, +1 right, -1 wrong, 0 no "
             "score; rows with a nonzero outcome advantage): P(A<0) / P(A>0) per form", "",
             "| role | prompt | gold | verifiers | steps | " + " | ".join(label for label, _ in rows) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(rows)]
    for k in keys:
        n = rows[0][1]["breakdown"][k][0]
        cells = [f"{m['breakdown'][k][1] / n:.2f} / {m['breakdown'][k][2] / n:.2f}" for _, m in rows]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]:+d} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gradient_report(rows: list[tuple[str, dict]], chunks: int) -> str:
    lines = ["", f"Step gradients (`--gradients`; means over {chunks} chunks of one RL step's prompts each; ratio 1, "
             "no KL): cosine with GRPO's gradient on the same rollouts, cosine with the form's own gradient on a "
             "second sample of rollouts of the same prompts, the gradient norm relative to GRPO's; and over every "
             "prompt, the cosine of the form's expected gradient with GRPO's (two-sample estimate, "
             "`expected_gradient_cosine`).", "",
             "| credit form | cos with GRPO, same rollouts | cos with itself, resampled rollouts | norm / GRPO's | "
             "cos of expected gradients with GRPO's |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {m['cos_grpo']:.3f} | {m['cos_resample']:.3f} | {m['norm_ratio']:.2f} | "
              f"{m['cos_expected']:.3f} |" for label, m in rows]
    return "\n".join(lines) + "\n"


def select_forms(spec: str) -> tuple:
    """The FORMS that --forms names (comma-separated 1-based positions, in the order given; empty: all of them);
    ConfigError naming --forms for anything else. GRPO (position 1) is the goal's reference: name it to read ratios."""
    if not spec:
        return FORMS
    try:
        picks = [int(p) for p in spec.split(",")]
    except ValueError:
        picks = []
    if not picks or any(not 1 <= p <= len(FORMS) for p in picks):
        raise config.ConfigError(f"--forms {spec!r}: expected comma-separated positions 1-{len(FORMS)} of FORMS")
    return tuple(FORMS[p - 1] for p in picks)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rollout-samples", type=int, default=4, help="K of the Monte-Carlo rows (Eq. 1c)")
    ap.add_argument("--forms", default="", help="comma-separated 1-based positions in FORMS to screen (default: all; "
                    "the Monte-Carlo rows cost the most)")
    ap.add_argument("--out", default="", help="append the table to this markdown file")
    ap.add_argument("--by-verdict", action="store_true", help="also break P(A<0) and P(A>0) down by node role, "
                    "long-tail or head prompt, gold correctness and the verifiers' verdict (verdict_breakdown_counts)")
    ap.add_argument("--gradients", action="store_true", help="also compare each form's step gradient with GRPO's "
                    "and with its own on a second sample of rollouts (the forms without Monte-Carlo values)")
    args, extra = ap.parse_known_args(argv)
    if args.prompts < 1 or args.rollout_samples < 1:
        raise config.ConfigError("--prompts and --rollout-samples must be at least 1")
    forms = select_forms(args.forms)
    common = [f"--credit.rollout_samples={args.rollout_samples}", *extra]
    path, base, task, model, tok, vocab = load_run(args.run_dir, args.checkpoint, common, args.seed)
    groups = sample_groups(base, model, tok, task, vocab, args.prompts, args.seed)
    rows = []
    for label, overrides in forms:
        cfg = config.load_config(path, [*common, *overrides])
        s = types.SimpleNamespace(cfg=cfg, model=model, tokenizer=tok, task=task, vocab=vocab)
        rows.append((label, screen_form(cfg, groups, s, args.seed)))
        print(f"{label}: {rows[-1][1].get('credit/misassigned_correct', float('nan')):.3f}", flush=True)
    G = base.rl.num_generations
    text = report(rows, f"`python experiments/credit_screen.py {args.run_dir} {args.checkpoint} --prompts "
                        f"{args.prompts} --seed {args.seed} --rollout-samples {args.rollout_samples}`: "
                        f"{len(groups) * base.rl.prompts_per_step} prompts x {G} rollouts, rows with a nonzero "
                        f"outcome advantage")
    if args.by_verdict:
        text += breakdown_report(rows)
    if args.gradients:
        regroups = sample_groups(base, model, tok, task, vocab, args.prompts, args.seed + 1)
        cfgs = [(label, config.load_config(path, [*common, *overrides])) for label, overrides in forms
                if "--credit.evidence=rollout" not in overrides]
        s = types.SimpleNamespace(cfg=base, model=model, tokenizer=tok, task=task, vocab=vocab)
        text += gradient_report(gradient_similarity(cfgs, groups, regroups, s, args.seed), len(groups))
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    config.cli(main)
