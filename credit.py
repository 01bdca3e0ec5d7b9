"""
Graph-GRPO credit assignment: the paper's contribution (DESIGN.md sections 3-5).

Tensors in, tensors out. The trainer parses its rollouts into a CreditBatch and calls

    token_adv, stats = compute_advantages(batch, num_tokens=T, mode=..., evidence=..., gate=...,
                                          scale=..., alpha=controller.alpha(), ...)

to get the (B, T) advantage tensor the policy loss needs (detach it for the loss). With the meta
controller it then builds the Eq. 3 surrogate from the same, still attached, token advantages:

    d = output_layer_token_dots(hidden, logits, tokens, output_layer_grad(h_main, dlogits_main), temp)
    grad_phi, grad_psi = controller.gradients(lookahead_alpha_surrogate(token_adv, d, mask, lr, n_tok))
    controller.accumulate(grad_phi, grad_psi)

Equations (DESIGN.md numbering):
    Eq. 1a  a_{i,v} = Q_{i,v} - V_{i,v}                                  group_own_evidence
    Eq. 1b  c_{i,v} = a_{i,v} + sum_u alpha_{e(v,u)} g_{i,v,u} c_{i,u}   propagate_credit
    Eq. 2   A_{i,v} = c_{i,v} / (std_j R_j + eps)                        node_advantages
    Eq. 3   dL_main(theta')/dalpha ~= (eta/N) sum_t dA_t/dalpha d_t       lookahead_alpha_surrogate

This file imports nothing from the rest of the project on purpose: it is the part a reader of the
paper checks, and its tests build every input by hand.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# eps added to the reward std in Eqs. 2 and the GRPO advantage. Peers differ (DESIGN.md section 6:
# TRL 1e-4, verl 1e-6, OpenRLHF 1e-9); we match TRL GRPOTrainer, whose metric names we keep.
DEFAULT_EPS = 1e-4

# |a| at or below this counts as "no own evidence" in the stats; Eq. 1a differences of means are exact
# zeros when the matched sets agree, so this only absorbs float noise of distinct but equal-valued means.
ZERO_EVIDENCE_TOL = 1e-9

OUTCOME_SCALES = ("group", "batch", "none")
NODE_SCALES = ("group_outcome", "none", "node")
EVIDENCE_FORMS = ("group", "baseline", "verifier", "both", "rollout", "outcome")
GATE_FORMS = ("rule", "none")
VALUE_FORMS = ("include_self", "leave_one_out", "others")
SHIELD_FORMS = ("none", "verifier", "complete")
SHIELD_VERDICTS = ("right", "wrong")  # credit.shield_verdicts: the verifiers' verdicts the shield acts on
UNPARSED_FORMS = ("outcome", "nodes")  # credit.unparsed: what the tokens of an answer that does not parse get
GATE_RULES = ("window", "sequential")
MODES = ("outcome", "graph")


# -----------------------------------------------------------------------------
# the batch


@dataclass
class CreditBatch:
    """Everything credit assignment needs about B = n_groups * G parsed rollouts (N node slots).

    Rollouts of one prompt are contiguous (rows g*G .. g*G+G-1). A node slot is one node of the union
    schema graph (e.g. Q, P, F_brand, F_color, ..., Y); slot v of rollout i may be absent (the query did
    not mention the facet, or the step did not parse). Slots may come in any order: propagation computes
    its own topological order from `parents`.
    """
    rewards: Tensor              # (B,) float outcome reward R_i
    group_size: int              # G
    present: Tensor              # (B, N) bool: slot v exists and parsed in rollout i
    keys: Tensor                 # (B, N) long canonical content id; equal id == same content; ignored where absent
    parents: list[list[int]]     # per slot, its parent slots in the union schema graph
    edge_types: list[list[int]]  # per slot, the edge-type index of each parent edge (same shape as parents)
    num_edge_types: int
    gate: Tensor                 # (B, N, N) float in {0, 1}: gate[i, v, u] = g_{i,v,u} for edge v -> u (1 where no rule applies)
    spans: Tensor                # (B, N, 2) long [start, end) token range of slot v in the completion, -1 where absent
    parsed: Tensor               # (B,) bool: format valid; False rows get the outcome advantage on every token
    scores: Tensor | None = None  # (B, N, S) float in [0, 1] local verifier scores per kind; NaN where a kind does not apply
    judging: Tensor | None = None  # (N, S) bool: the kinds that judge slot v's content (a NaN there: the verifier abstained)
    shielded_slots: Tensor | None = None  # (N,) bool: the slots the shield filters (credit.shield_roles); None: all
    values: Tensor | None = None  # (B, N, 2) Monte-Carlo values of the prefix before / after slot v (Eq. 1c)
    probes: Tensor | None = None  # (B, N) label-probe evidence of slot v (graph_grpo.step_probes); NaN where none
    clean: Tensor | None = None  # (B, N) bool: slot v is well-formed and no parse problem names it (credit.unparsed)

    @property
    def num_slots(self) -> int:
        return self.present.shape[1]

    def validate(self) -> None:
        """Raise ValueError naming the first field whose shape or content is inconsistent."""
        B, N = self.present.shape
        G = self.group_size
        if G < 1 or B % G:
            raise ValueError(f"CreditBatch.group_size={G} does not divide batch size {B}")
        expect = {"rewards": (B,), "keys": (B, N), "gate": (B, N, N), "spans": (B, N, 2), "parsed": (B,)}
        for name, shape in expect.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"CreditBatch.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        for name in ("probes", "clean"):
            if getattr(self, name) is not None and tuple(getattr(self, name).shape) != (B, N):
                raise ValueError(f"CreditBatch.{name} has shape {tuple(getattr(self, name).shape)}, expected ({B}, {N})")
        if self.scores is not None and tuple(self.scores.shape[:2]) != (B, N):
            raise ValueError(f"CreditBatch.scores has shape {tuple(self.scores.shape)}, expected ({B}, {N}, S)")
        if self.shielded_slots is not None and tuple(self.shielded_slots.shape) != (N,):
            raise ValueError(f"CreditBatch.shielded_slots has shape {tuple(self.shielded_slots.shape)}, expected ({N},)")
        if self.judging is not None and (self.scores is None or tuple(self.judging.shape) != (N, self.scores.shape[2])):
            raise ValueError(f"CreditBatch.judging has shape {tuple(self.judging.shape)}, expected ({N}, S) with scores")
        check_schema(self.parents, self.edge_types, self.num_edge_types, N)


def check_schema(parents: list[list[int]], edge_types: list[list[int]], num_edge_types: int, num_slots: int) -> None:
    """Raise ValueError naming the slot whose parent or edge-type list is malformed."""
    if len(parents) != num_slots or len(edge_types) != num_slots:
        raise ValueError(f"parents/edge_types have {len(parents)}/{len(edge_types)} entries, expected {num_slots} slots")
    for u, (ps, es) in enumerate(zip(parents, edge_types)):
        if len(ps) != len(es):
            raise ValueError(f"slot {u}: {len(ps)} parents but {len(es)} edge types")
        for p, e in zip(ps, es):
            if not 0 <= p < num_slots or p == u:
                raise ValueError(f"slot {u}: parent {p} is not another slot in 0..{num_slots - 1}")
            if not 0 <= e < num_edge_types:
                raise ValueError(f"slot {u}: edge type {e} outside 0..{num_edge_types - 1}")


def topological_order(parents: list[list[int]]) -> list[int]:
    """Slots ordered parents before children (Kahn's algorithm, ties by slot index); ValueError on a cycle."""
    n = len(parents)
    indeg = [len(set(ps)) for ps in parents]
    children = schema_children(parents)
    ready = [v for v in range(n) if indeg[v] == 0]
    order = []
    while ready:
        v = min(ready)
        ready.remove(v)
        order.append(v)
        for u in {u for u, _ in children[v]}:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != n:
        raise ValueError(f"schema graph has a cycle through slots {sorted(set(range(n)) - set(order))}")
    return order


def schema_children(parents: list[list[int]], edge_types: list[list[int]] | None = None) -> list[list[tuple[int, int]]]:
    """Per slot v, the (child u, edge type) pairs of its outgoing edges (edge type -1 without edge_types)."""
    children: list[list[tuple[int, int]]] = [[] for _ in parents]
    for u, ps in enumerate(parents):
        for k, p in enumerate(ps):
            children[p].append((u, edge_types[u][k] if edge_types is not None else -1))
    return children


def sink_slots(parents: list[list[int]], device: torch.device | str = "cpu") -> Tensor:
    """(N,) bool: slots without children in the schema graph (the label Y in the default schema)."""
    has_child = torch.zeros(len(parents), dtype=torch.bool, device=device)
    for ps in parents:
        for p in ps:
            has_child[p] = True
    return ~has_child


# -----------------------------------------------------------------------------
# outcome advantage (GRPO)


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(n_groups,) bool: groups whose rewards are all equal (no outcome signal; TRL's frac_reward_zero_std).

    Exact equality (max == min), not TRL's isclose(std, 0); a group of size 1 counts as zero-std.
    """
    r = rewards.view(-1, group_size)  # (n, G)
    return r.amax(1) == r.amin(1)


def outcome_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = DEFAULT_EPS,
                       batch_std: float | None = None) -> Tensor:
    """(B,) GRPO sequence advantage: (R_i - mean_group R) / (std + eps).

    scale: 'group' divides by the group's std (GRPO, TRL scale_rewards='group'); 'batch' by the std of
    all B rewards while still centring per group (TRL scale_rewards='batch'); 'none' does not divide
    (Dr. GRPO). batch_std: the std of the whole batch over all ranks (TRL gathers the batch before it takes the
    std); default: these rewards'. The std is the unbiased (n - 1) estimator, as in TRL, verl and OpenRLHF; eps = 1e-4
    matches TRL. A group of size 1 gets advantage 0 (TRL; verl would pass the raw score through), and
    a group whose rewards are all equal gets exactly 0 (its centred rewards are exact zeros).
    """
    if scale not in OUTCOME_SCALES:
        raise ValueError(f"outcome scale={scale!r}, expected one of {OUTCOME_SCALES}")
    if group_size == 1:
        return torch.zeros_like(rewards)
    r = rewards.view(-1, group_size)  # (n, G)
    centred = r - r.mean(1, keepdim=True)
    centred = torch.where(zero_std_groups(rewards, group_size)[:, None], torch.zeros_like(centred), centred)
    if scale == "group":
        centred = centred / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    return centred.reshape(-1)


# -----------------------------------------------------------------------------
# Eq. 1a: own evidence from the group


def _same_content(keys: Tensor, present: Tensor, group_size: int) -> Tensor:
    """(n, G, G, N) bool: rollouts i and j of a group have the same content at slot v.

    Absence is a content value of its own: two rollouts that both lack v agree at v, one that has v and
    one that lacks it do not.
    """
    k = keys.view(-1, group_size, keys.shape[1])  # (n, G, N)
    p = present.view(-1, group_size, present.shape[1])
    both = p[:, :, None, :] & p[:, None, :, :]  # (n, G, G, N)
    neither = ~p[:, :, None, :] & ~p[:, None, :, :]
    return (both & (k[:, :, None, :] == k[:, None, :, :])) | neither


def _masked_mean_dev(dev: Tensor, mask: Tensor) -> Tensor:
    """(n, G): mean over j of dev[:, i, j] where mask[:, i, j]; mask always holds j = i, so never empty."""
    m = mask.to(dev.dtype)
    return (dev * m).sum(-1) / m.sum(-1)


def group_values(rewards: Tensor, keys: Tensor, present: Tensor, parents: list[list[int]],
                 group_size: int, leave_one_out: bool = False, q_others: bool = False) -> tuple[Tensor, Tensor]:
    """(Q - R, V - R), each (B, N), of Eq. 1a, estimated within each group by key matching.

    Q_{i,v} = mean R_j over rollouts j of i's group with the same content as i at v and at every parent
    of v; V_{i,v} = the same with the parents only (a root's V is the group mean). Returned relative to
    R_i, computed as means of R_j - R_i, so that equal matched sets and constant rewards give exact
    zeros (no float residue from sum / count). Values where slot v is absent are meaningless.

    leave_one_out (an option DESIGN does not have; `credit.value: leave_one_out`): V_{i,v} averages the OTHER
    rollouts with i's parent content, and the other rollouts of the group where none shares it (RLOO's
    baseline). DESIGN's V includes rollout i itself, which shrinks a node's advantage by (1 - 1/n), n the
    number of rollouts sharing its parents' content, and to 0 when n = 1 (measured in the graph bandit).

    q_others (with leave_one_out; `credit.value: others`, ours): Q_{i,v} too averages the OTHER rollouts with i's
    content at v and its parents, and is R_i where none shares it. A step every rollout wrote the same way then
    gets Q = V, own evidence 0, as under DESIGN's V, where leave_one_out alone gives it (R_i - mean of the
    others) / G, GRPO's sign (results/LOG.md, "Whose verdicts to trust"); a unique step keeps leave_one_out's R_i - V.
    """
    B, N = present.shape
    r = rewards.view(-1, group_size)  # (n, G)
    dev = r[:, None, :] - r[:, :, None]  # (n, G, G): dev[:, i, j] = R_j - R_i
    same = _same_content(keys, present, group_size)  # (n, G, G, N)
    all_true = torch.ones_like(dev, dtype=torch.bool)
    others = ~torch.eye(group_size, dtype=torch.bool, device=dev.device)[None]  # (1, G, G)
    q_dev, v_dev = [], []
    for v in range(N):
        same_pa = all_true
        for p in parents[v]:
            same_pa = same_pa & same[..., p]
        if leave_one_out and group_size > 1:
            loo = same_pa & others
            v_mask = torch.where(loo.any(-1, keepdim=True), loo, others.expand_as(loo))
            v_dev.append(_masked_mean_dev(dev, v_mask))
        else:
            v_dev.append(_masked_mean_dev(dev, same_pa))
        q_mask = same_pa & same[..., v]
        if q_others and group_size > 1:
            q_loo = q_mask & others
            q_mask = torch.where(q_loo.any(-1, keepdim=True), q_loo, ~others.expand_as(q_loo))  # none: R_i itself
        q_dev.append(_masked_mean_dev(dev, q_mask))
    return torch.stack(q_dev, -1).reshape(B, N), torch.stack(v_dev, -1).reshape(B, N)


def group_own_evidence(rewards: Tensor, keys: Tensor, present: Tensor, parents: list[list[int]],
                       group_size: int, leave_one_out: bool = False, q_others: bool = False) -> Tensor:
    """(B, N) Eq. 1a own evidence a_{i,v} = Q_{i,v} - V_{i,v}; at a sink a_{i,v} = R_i - V_{i,v}; 0 where absent.

    A sink is a slot without children in the schema (the label Y). If the reward is a function of the
    sink's content and its parents' (as the label reward is), R_i - V equals Q - V; defining it as
    R_i - V keeps the sink's credit the outcome itself when it is not (e.g. a graded or noisy reward).
    A node whose content is the same in every rollout of its group (with the same parents) gets
    exactly 0 with DESIGN's V: Q and V then average the same rollouts. With leave_one_out it gets
    (R_i - mean of the others) / G instead, a scaled GRPO advantage with GRPO's sign (tested); with q_others
    again 0.
    """
    q_dev, v_dev = group_values(rewards, keys, present, parents, group_size, leave_one_out, q_others)
    a = torch.where(sink_slots(parents, rewards.device)[None, :], -v_dev, q_dev - v_dev)
    return torch.where(present, a, torch.zeros_like(a))


def baseline_credit(rewards: Tensor, keys: Tensor, present: Tensor, parents: list[list[int]],
                    group_size: int, leave_one_out: bool = False) -> Tensor:
    """(B, N) the `baseline` form c_{i,v} = R_i - V_{i,v} (DESIGN section 4), no propagation; 0 where absent.

    The outcome with a baseline that depends only on the node's inputs: an unbiased policy-gradient
    estimate. It equals Eq. 1b with alpha = 1 on a chain whose upstream contents agree.
    """
    _, v_dev = group_values(rewards, keys, present, parents, group_size, leave_one_out)
    return torch.where(present, -v_dev, torch.zeros_like(v_dev))


# -----------------------------------------------------------------------------
# Eq. 1c: own evidence from Monte-Carlo node values (DESIGN 4.1)


def rollout_own_evidence(values: Tensor, present: Tensor) -> Tensor:
    """(B, N) Eq. 1c a_{i,v} = Vhat_i(<=v) - Vhat_i(<v); 0 where absent.

    values (B, N, 2): [Vhat_i(<v), Vhat_i(<=v)], the mean outcome of continuations of rollout i's prefix before and
    after node v (the trainer samples them; Vhat after the last node is R_i, before the first the group mean). On a
    chain of contiguous nodes the credits telescope to R_i - Vhat_i(start): GRPO's advantage with a state
    baseline, split into each step's share.
    """
    a = values[..., 1] - values[..., 0]
    return torch.where(present, a, torch.zeros_like(a))


# -----------------------------------------------------------------------------
# verifier evidence (independent process reward)


def verifier_evidence(scores: Tensor, present: Tensor, group_size: int, weights: Tensor) -> Tensor:
    """(B, N) sum_k beta_k * (s_{i,v,k} - mean_j s_{j,v,k}): the `verifier` own evidence (DESIGN section 4).

    scores (B, N, S) in [0, 1], NaN where kind k does not apply to the node; weights (S,) = beta per
    score kind, may require grad (the controller's learned trust weights). The mean runs over the
    rollouts of the group that have the node and a score of that kind; a kind contributes 0 where it
    does not apply.
    """
    B, N, S = scores.shape
    if weights.shape != (S,):
        raise ValueError(f"verifier weights have shape {tuple(weights.shape)}, expected ({S},) for {S} score kinds")
    valid = present[..., None] & ~torch.isnan(scores)  # (B, N, S)
    s = torch.where(valid, scores, torch.zeros_like(scores))  # NaN-free so that autograd never sees NaN * 0
    sg = s.view(-1, group_size, N, S)
    vg = valid.view(-1, group_size, N, S).to(s.dtype)
    mean = sg.sum(1, keepdim=True) / vg.sum(1, keepdim=True).clamp(min=1)  # (n, 1, N, S)
    centred = torch.where(valid, (sg - mean).view(B, N, S), torch.zeros_like(s))
    return (centred * weights.to(device=s.device, dtype=s.dtype)).sum(-1)


# -----------------------------------------------------------------------------
# Eq. 1b: propagation, Eq. 2: one scale per group


def verified_steps(scores: Tensor, present: Tensor, judging: Tensor | None = None) -> Tensor:
    """(B, N) the verifiers' local verdict on each step: +1 right (every score that applies is 1), -1 wrong (some
    score below 1), 0 unknown (absent, or no score applies). scores (B, N, S) in [0, 1], NaN where a kind does not
    apply (data.verifier_scores). judging (N, S) bool, optional (credit.shield = complete): the kinds that judge a
    slot's content; a step with NaN in one of them (the verifier abstained, e.g. the comparator on a long-tail form)
    is not called right, only wrong where a known score says so: grounding alone does not make a verdict right."""
    known = ~torch.isnan(scores)  # (B, N, S)
    low = torch.where(known, scores, torch.ones_like(scores)).amin(-1)  # (B, N); 1 where nothing is known
    any_known = known.any(-1) & present
    right = any_known & (low >= 1)
    if judging is not None:
        right = right & (known | ~judging.to(known.device)[None]).all(-1)  # (B, N): every judging kind known
    return right.to(torch.long) - (any_known & (low < 1)).to(torch.long)


def shielded(propagated: Tensor, verdict: Tensor) -> Tensor:
    """The credit a step receives from its children under the verifier shield (credit.shield = verifier, our
    variant of Eq. 1b): only its positive part where the verifiers call the step right (a failure downstream is
    not its fault), only its negative part where they call it wrong, all of it where they say nothing.
    propagated, verdict: (B,). Differentiable (clamp passes the gradient where it is inactive)."""
    return torch.where(verdict > 0, propagated.clamp(min=0),
                       torch.where(verdict < 0, propagated.clamp(max=0), propagated))


def vouched_sinks(verdict: Tensor, present: Tensor, parents: list[list[int]]) -> Tensor:
    """(B, N) bool: the sinks (the label) the verifiers vouch for whole (credit.shield_label; ours, issue 14): the sink
    is present with a present parent, it is called right (the label's verdict: it follows the rule from the rollout's
    own verdicts), and so is every present step it depends on (its ancestors). verdict (B, N) in {-1, 0, 1}
    (verified_steps, before any slot or side filter). A step the rollout left out is not judged: an answer that omits a
    facet can still be vouched for (the screen counts how often a vouched label is wrong)."""
    chain: list[Tensor] = [None] * len(parents)  # chain[v] (B,): v and every present ancestor called right or absent
    for v in topological_order(parents):
        ok = (verdict[:, v] > 0) | ~present[:, v]
        for u in parents[v]:
            ok = ok & chain[u]
        chain[v] = ok
    sinks = sink_slots(parents, present.device)
    out = torch.zeros_like(present)
    for v in sinks.nonzero().flatten().tolist():
        has_parent = torch.zeros_like(present[:, v])
        for u in parents[v]:
            has_parent = has_parent | present[:, u]
        out[:, v] = present[:, v] & (verdict[:, v] > 0) & has_parent & chain[v]
    return out


def propagate_credit(a: Tensor, alpha: Tensor, gate: Tensor, parents: list[list[int]],
                     edge_types: list[list[int]], present: Tensor, shield: Tensor | None = None) -> Tensor:
    """(B, N) Eq. 1b c_{i,v} = a_{i,v} + sum_{u in children(v)} alpha_{e(v,u)} g_{i,v,u} c_{i,u}.

    Children first (reverse topological order). c is 0 where the slot is absent, so a missing child
    contributes nothing. Differentiable in alpha (num_edge_types,) and a: credits are kept per slot
    in a list and stacked at the end, with no in-place writes. shield (B, N) in {-1, 0, 1} (verified_steps):
    the sum over children passes through `shielded` before it is added to a_{i,v}.
    """
    B, N = a.shape
    alpha = alpha.to(device=a.device, dtype=a.dtype)  # the controller keeps alpha on the CPU in float64
    gate = gate.to(a.dtype)
    children = schema_children(parents, edge_types)
    zero = torch.zeros(B, dtype=a.dtype, device=a.device)
    c: list[Tensor | None] = [None] * N
    for v in reversed(topological_order(parents)):
        terms = [alpha[e] * gate[:, v, u] * c[u] for u, e in children[v]]
        cv = a[:, v]
        if shield is None:
            for t in terms:
                cv = cv + t
        elif terms:
            cv = cv + shielded(torch.stack(terms).sum(0), shield[:, v])
        c[v] = torch.where(present[:, v], cv, zero)
    return torch.stack(c, 1)


def node_advantages(c: Tensor, rewards: Tensor, group_size: int, scale: str = "group_outcome",
                    eps: float = DEFAULT_EPS, present: Tensor | None = None) -> Tensor:
    """(B, N) Eq. 2 A_{i,v} = c_{i,v} / (std_j R_j + eps), one scale per group.

    scale: 'group_outcome' (default) divides by the group's outcome std (unbiased, as outcome_advantages);
    'none' returns c; 'node' (DESIGN 0.1, the paper's per-node normalisation; needs `present`) is a z-score of c
    over the group's rollouts that have v: (c_{i,v} - mean_j c_{j,v}) / (std_j c_{j,v} + eps), 0 where v is
    absent. Centring is our reading of "normalised within the group" (as GRPO normalises rewards); without it a
    node credit with a nonzero mean and a tiny spread was divided by that spread alone (measured before this
    change: mean |A| of 37 on the understanding steps, 200-step ablation, seed 0), where a z-score is at most
    sqrt(G - 1) in size. A copy of the outcome advantage normalises back to GRPO's (test_schema.py).
    Where the divisor would be a zero std (all rewards equal, or a node's credit constant) or undefined
    (fewer than 2 values) we divide by 1 instead: group evidence is exactly 0 there anyway, and
    dividing verifier evidence by eps alone would multiply it by 1/eps ('node': the centred credit, 0 there).
    """
    if scale not in NODE_SCALES:
        raise ValueError(f"node scale={scale!r}, expected one of {NODE_SCALES}")
    if scale == "none":
        return c
    B, N = c.shape
    if scale == "group_outcome":
        if group_size == 1:
            return c
        r = rewards.view(-1, group_size)
        denom = torch.where(zero_std_groups(rewards, group_size), torch.ones_like(r[:, 0]), r.std(1) + eps)
        return (c.view(-1, group_size, N) / denom[:, None, None].to(c.dtype)).view(B, N)
    if present is None:
        raise ValueError("node_advantages(scale='node') needs the present mask")
    cg = c.view(-1, group_size, N)
    m = present.view(-1, group_size, N).to(c.dtype)
    count = m.sum(1, keepdim=True)  # (n, 1, N)
    mean = (cg * m).sum(1, keepdim=True) / count.clamp(min=1)
    var = (((cg - mean) * m) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    std = var.sqrt()
    denom = torch.where((count < 2) | (std == 0), torch.ones_like(std), std + eps)
    return ((cg - mean) * m / denom).view(B, N)  # (B, N); absent: 0


def token_advantages(node_adv: Tensor, spans: Tensor, parsed: Tensor, outcome_adv: Tensor,
                     num_tokens: int) -> Tensor:
    """(B, T) per-token advantages: every token of slot v's span gets A_{i,v} (DESIGN section 4).

    Tokens outside every span (separators, end of sequence) and every token of a rollout that does
    not parse get the outcome advantage. Differentiable w.r.t. node_adv (Eq. 3 needs dA_t/dalpha).
    Spans with start < 0 are absent; overlapping spans are an error. parsed (B,) bool, or (B, N) bool for the
    spans that take their node advantage slot by slot (credit.unparsed = nodes: unparsed_usable_spans).
    """
    B, N = node_adv.shape
    t = torch.arange(num_tokens, device=spans.device)
    start, end = spans[..., 0:1], spans[..., 1:2]  # (B, N, 1)
    use = parsed[:, None].expand(B, N) if parsed.dim() == 1 else parsed  # (B, N)
    in_span = (t >= start) & (t < end) & (start >= 0) & use[..., None]  # (B, N, T)
    count = in_span.sum(1)  # (B, T)
    if (count > 1).any():
        i, tt = (count > 1).nonzero()[0].tolist()
        raise ValueError(f"rollout {i}: token {tt} lies in {count[i, tt].item()} node spans; spans must not overlap")
    from_nodes = (in_span.to(node_adv.dtype) * node_adv[..., None]).sum(1)  # (B, T)
    return torch.where(count > 0, from_nodes, outcome_adv.to(node_adv.dtype)[:, None].expand(B, num_tokens))


# -----------------------------------------------------------------------------
# entry point


def graph_node_advantages(batch: CreditBatch, *, evidence: str = "group", gate: str = "rule",
                          scale: str = "group_outcome", eps: float = DEFAULT_EPS, alpha: Tensor | None = None,
                          verifier_weights: Tensor | None = None, value: str = "include_self",
                          shield: str = "none", shield_verdicts: tuple[str, ...] = SHIELD_VERDICTS,
                          shield_label: bool = False, probe_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """(node advantages A (B, N), own evidence a (B, N)) of Graph-GRPO (Eqs. 1a, 1b, 2).

    evidence: 'group' Eq. 1a; 'baseline' c = R - V with no propagation (alpha unused); 'verifier'
    beta * (s - mean s) on every scored node plus the outcome R_i - mean_j R_j at the sinks (the
    outcome must enter somewhere, and where else than at the label: this is the independent
    process-reward baseline when alpha = 0); 'both' Eq. 1a plus the verifier term; 'rollout' Eq. 1c (Monte-Carlo
    node values in batch.values); 'outcome' the outcome at the sinks only (the verifier form without its scores:
    the step evidence is then probe_weight's alone).
    gate: 'rule' uses batch.gate; 'none' sets every gate to 1. value: 'include_self' (DESIGN's V),
    'leave_one_out', or 'others' (leave_one_out for Q too; see group_values). shield: 'verifier' filters what
    each step receives from its children by the verifiers' local verdict (verified_steps, shielded; needs
    batch.scores); 'complete' the same, but a step is called right only where the kinds that judge its content
    (batch.judging) all gave a score (needs batch.judging too); 'none' is Eq. 1b as written. Either shield filters
    only the slots batch.shielded_slots marks (None: every slot), and acts only on the verdicts in shield_verdicts:
    'right' (a step called right receives no negative credit from its children: the blame it is spared) and 'wrong'
    (a step called wrong receives no positive credit: the reward it is denied); a verdict left out passes Eq. 1b's
    credit as an unknown one does (credit.shield_verdicts; ours, issue 14). shield_label (needs a shield and
    batch.judging): the own evidence of a sink the verifiers vouch for whole (vouched_sinks on verified_steps with
    judging, whatever the shield: the label follows the rule from verdicts the comparator judged and called right,
    and the understanding steps are grounded) keeps only its positive part, so that a low reward which
    contradicts every verifier does not blame the label (nor, with verifier evidence and the shield on steps called
    right, any step of that rollout; credit.shield_label; ours, issue 14). probe_weight > 0 adds probe_weight * p to
    the own evidence of every step with a label-probe score p (batch.probes, graph_grpo.step_probes; ours, issue 14),
    before propagation.
    """
    if shield not in SHIELD_FORMS:
        raise ValueError(f"shield={shield!r}, expected one of {SHIELD_FORMS}")
    if shield != "none" and batch.scores is None:
        raise ValueError(f"shield={shield!r} needs batch.scores (the verifiers' local scores)")
    if (shield == "complete" or shield_label) and batch.judging is None:
        raise ValueError(f"shield={shield!r}, shield_label={shield_label} needs batch.judging (the score kinds that "
                         "judge each slot)")
    if shield_label and shield == "none":
        raise ValueError("shield_label needs shield='verifier' or 'complete' (the verifiers' verdicts)")
    if not shield_verdicts or any(v not in SHIELD_VERDICTS for v in shield_verdicts):
        raise ValueError(f"shield_verdicts={shield_verdicts!r}, expected one or both of {SHIELD_VERDICTS}")
    if value not in VALUE_FORMS:
        raise ValueError(f"value={value!r}, expected one of {VALUE_FORMS}")
    loo, q_others = value in ("leave_one_out", "others"), value == "others"
    if evidence not in EVIDENCE_FORMS:
        raise ValueError(f"evidence={evidence!r}, expected one of {EVIDENCE_FORMS}")
    if gate not in GATE_FORMS:
        raise ValueError(f"gate={gate!r}, expected one of {GATE_FORMS}")
    b = batch
    G = b.group_size
    if evidence == "baseline":
        c = baseline_credit(b.rewards, b.keys, b.present, b.parents, G, loo)
        return node_advantages(c, b.rewards, G, scale, eps, b.present), c
    if evidence in ("group", "both"):
        a = group_own_evidence(b.rewards, b.keys, b.present, b.parents, G, loo, q_others)
    elif evidence == "rollout":
        if b.values is None:
            raise ValueError("evidence='rollout' needs batch.values (the Monte-Carlo node values of Eq. 1c)")
        a = rollout_own_evidence(b.values.to(b.rewards.dtype), b.present)
    else:
        r = b.rewards.view(-1, G)
        outcome = (r - r.mean(1, keepdim=True)).reshape(-1)  # (B,)
        sink = sink_slots(b.parents, r.device)[None, :] & b.present  # (B, N)
        a = outcome[:, None] * sink.to(r.dtype)
    if evidence in ("verifier", "both"):
        if b.scores is None or verifier_weights is None:
            raise ValueError(f"evidence={evidence!r} needs batch.scores and verifier_weights")
        a = a + verifier_evidence(b.scores, b.present, G, verifier_weights)
    if probe_weight:
        if b.probes is None:
            raise ValueError("probe_weight > 0 needs batch.probes (the label-probe evidence)")
        p = b.probes.to(a.dtype)  # a difference of two beliefs already: not centred (results/LOG.md, the probe study)
        a = a + probe_weight * torch.where(b.present & ~torch.isnan(p), p, torch.zeros_like(p))
    if alpha is None:
        raise ValueError(f"evidence={evidence!r} propagates credit (Eq. 1b) and needs alpha ({b.num_edge_types},)")
    if alpha.shape != (b.num_edge_types,):
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}, expected ({b.num_edge_types},)")
    g = b.gate if gate == "rule" else torch.ones_like(b.gate)
    verdict = None if shield == "none" else \
        verified_steps(b.scores, b.present, b.judging if shield == "complete" else None)  # (B, N) in {-1, 0, 1}
    if shield_label:  # a vouched label: no negative own evidence (the outcome a noisy label may have turned)
        judged = verdict if shield == "complete" else verified_steps(b.scores, b.present, b.judging)
        a = torch.where(vouched_sinks(judged, b.present, b.parents), a.clamp(min=0), a)
    if verdict is not None and b.shielded_slots is not None:  # unshielded slots: verdict 0, Eq. 1b as written
        verdict = verdict * b.shielded_slots.to(verdict.device)[None]
    if verdict is not None and "right" not in shield_verdicts:  # steps called right: Eq. 1b as written
        verdict = verdict.clamp(max=0)
    if verdict is not None and "wrong" not in shield_verdicts:  # steps called wrong: Eq. 1b as written
        verdict = verdict.clamp(min=0)
    c = propagate_credit(a, alpha, g, b.parents, b.edge_types, b.present, verdict)
    return node_advantages(c, b.rewards, G, scale, eps, b.present), a


def credit_stats(batch: CreditBatch, node_adv: Tensor, own_evidence: Tensor | None) -> dict:
    """Node-advantage statistics for the step's metrics line (JSON-safe floats / lists of floats).

    credit/node_abs_adv: per slot, mean |A_{i,v}| over rollouts that have v (0.0 where none has it);
    credit/zero_evidence_rate: share of present nodes with |a| <= ZERO_EVIDENCE_TOL;
    credit/gate_open_rate: share of schema edges v -> u present at both ends whose rule gate (batch.gate)
        is 1, whatever gate form the step used: how often the rule would mask;
    credit/key_repeat_rate: share of present nodes whose key another rollout of the group shares.
    """
    b = batch
    pres = b.present
    pf = pres.to(node_adv.dtype)
    abs_adv = (node_adv.detach().abs() * pf).sum(0) / pf.sum(0).clamp(min=1)
    stats = {"credit/node_abs_adv": abs_adv.tolist()}
    n_present = max(int(pres.sum()), 1)
    if own_evidence is not None:
        zero = (own_evidence.detach().abs() <= ZERO_EVIDENCE_TOL) & pres
        stats["credit/zero_evidence_rate"] = float(zero.sum()) / n_present
    edge = torch.zeros(b.num_slots, b.num_slots, dtype=torch.bool, device=pres.device)  # edge[v, u]: schema edge v -> u
    for u, ps in enumerate(b.parents):
        for p in ps:
            edge[p, u] = True
    live = edge[None] & pres[:, :, None] & pres[:, None, :]  # (B, N, N)
    stats["credit/gate_open_rate"] = float((b.gate.detach() * live).sum()) / max(int(live.sum()), 1)
    same = _same_content(b.keys, pres, b.group_size)  # (n, G, G, N)
    G = b.group_size
    others = same & ~torch.eye(G, dtype=torch.bool, device=pres.device)[None, :, :, None]
    repeated = others.any(2).reshape(-1, b.num_slots) & pres  # (B, N)
    stats["credit/key_repeat_rate"] = float(repeated.sum()) / n_present
    return stats


def node_applied_advantages(token_adv: Tensor, spans: Tensor, present: Tensor) -> Tensor:
    """(B, N) the advantage node v's tokens get in rollout i (read at its first token); NaN where v is absent."""
    T = token_adv.shape[1]
    at = token_adv.gather(1, spans[..., 0].clamp(0, T - 1))  # (B, N)
    return torch.where(present & (spans[..., 0] >= 0) & (spans[..., 0] < T), at, torch.full_like(at, float("nan")))


CREDIT_ACCURACY = ("right", "right_negative", "wrong", "wrong_positive", "failed_mass", "failed_wrong_mass")


def credit_accuracy_sums(node_adv: Tensor, correct: Tensor, outcome_adv: Tensor) -> dict[str, Tensor]:
    """Sums per slot, (N,) each, from which DESIGN 4.2's credit accuracy is read (sums add over ranks and steps).

    node_adv (B, N): the advantage each step's tokens got (node_applied_advantages; NaN where absent); correct (B, N):
    1 where the step matches the gold annotation, 0 where it does not, NaN where there is no gold; outcome_adv (B,).
    Counted only in rollouts with a nonzero outcome advantage:
      right / right_negative        correct steps / those given A < 0    -> P(A < 0 | correct step)
      wrong / wrong_positive        wrong steps / those given A > 0      -> P(A > 0 | wrong step)
      failed_mass / failed_wrong_mass   sum |A| over the steps of failed rollouts (outcome advantage < 0) / over
                                    their wrong steps                    -> share of |A| on the wrong steps
    Outcome GRPO gives every step of a rollout its outcome advantage: it misassigns every correct step of a failed
    rollout by construction. The method's claim is that node credit does much less.
    """
    live = ~torch.isnan(node_adv) & ~torch.isnan(correct) & (outcome_adv != 0)[:, None]
    right, wrong = live & (correct == 1), live & (correct == 0)
    failed = live & (outcome_adv < 0)[:, None]
    mass = torch.where(failed, node_adv.abs(), torch.zeros_like(node_adv))
    f64 = torch.float64
    return {"right": right.sum(0).to(f64), "right_negative": (right & (node_adv < 0)).sum(0).to(f64),
            "wrong": wrong.sum(0).to(f64), "wrong_positive": (wrong & (node_adv > 0)).sum(0).to(f64),
            "failed_mass": mass.sum(0).to(f64), "failed_wrong_mass": (mass * wrong).sum(0).to(f64)}


def unparsed_usable_spans(present: Tensor, parsed: Tensor, clean: Tensor) -> Tensor:
    """(B, N) bool: the spans whose tokens take their node advantage under credit.unparsed = nodes (ours, issue 14):
    every present slot of an answer that parses, and in one that does not, the slots that are well-formed and that no
    parse problem names (clean); every other token of such an answer keeps the outcome advantage (the format penalty),
    so the format is blamed where it fails and not on the steps that parsed. present, clean (B, N); parsed (B,)."""
    return present & (parsed[:, None] | clean)


def compute_advantages(batch: CreditBatch, *, num_tokens: int, mode: str = "graph", evidence: str = "group",
                       gate: str = "rule", scale: str = "group_outcome", outcome_scale: str = "group",
                       eps: float = DEFAULT_EPS, alpha: Tensor | None = None,
                       verifier_weights: Tensor | None = None, value: str = "include_self",
                       batch_std: float | None = None, shield: str = "none",
                       shield_verdicts: tuple[str, ...] = SHIELD_VERDICTS, shield_label: bool = False,
                       probe_weight: float = 0.0, unparsed: str = "outcome") -> tuple[Tensor, dict]:
    """(B, T) token advantages and a stats dict: the one call the trainer makes (DESIGN sections 4, 6).

    mode 'outcome': plain GRPO, outcome_advantages(scale=outcome_scale) on every token.
    mode 'graph': Eqs. 1a/1b/2 with `evidence`, `gate`, node `scale`; tokens outside every node span
    and unparsed rollouts get outcome_advantages(scale=outcome_scale). Keep outcome_scale='group' with
    scale='group_outcome' (the default pair): both then divide by the same group std.
    unparsed: 'outcome' (every token of an answer that does not parse gets the outcome advantage, as GRPO does) or
    'nodes' (its clean steps keep their node advantage: unparsed_usable_spans; needs batch.clean).
    The result stays attached to alpha / verifier_weights: detach it for the policy loss, keep it
    attached for the Eq. 3 surrogate.
    """
    if mode not in MODES:
        raise ValueError(f"credit mode={mode!r}, expected one of {MODES}")
    if unparsed not in UNPARSED_FORMS:
        raise ValueError(f"unparsed={unparsed!r}, expected one of {UNPARSED_FORMS}")
    b = batch
    b.validate()
    outcome = outcome_advantages(b.rewards, b.group_size, outcome_scale, eps, batch_std)  # (B,)
    if mode == "outcome":
        token_adv = outcome[:, None].expand(-1, num_tokens).clone()
        return token_adv, {"credit/outcome_abs_adv": float(outcome.abs().mean())}
    node_adv, own = graph_node_advantages(b, evidence=evidence, gate=gate, scale=scale, eps=eps, alpha=alpha,
                                          verifier_weights=verifier_weights, value=value, shield=shield,
                                          shield_verdicts=shield_verdicts, shield_label=shield_label,
                                          probe_weight=probe_weight)
    if unparsed == "nodes" and b.clean is None:
        raise ValueError("unparsed='nodes' needs batch.clean (the slots no parse problem names)")
    use = b.parsed if unparsed == "outcome" else unparsed_usable_spans(b.present, b.parsed, b.clean)
    token_adv = token_advantages(node_adv, b.spans, use, outcome, num_tokens)
    stats = credit_stats(b, node_adv, own if evidence != "baseline" else None)
    stats["credit/outcome_abs_adv"] = float(outcome.abs().mean())
    return token_adv, stats


# -----------------------------------------------------------------------------
# Eq. 3: main-loss-driven controller


def output_layer_grad(hidden_main: Tensor, dlogits_main: Tensor) -> Tensor:
    """(V, H) G_W = sum_t g_t h_t^T: the output-layer (lm_head weight) gradient of L_main.

    hidden_main (B, T, H): the final hidden states fed to the output layer; dlogits_main (B, T, V):
    dL_main/dlogits from autograd on the logits alone (no backward through the network). Counting only
    the output path also gives the right G_W when the output weight is tied to the input embedding:
    Eq. 3's closed form differentiates log pi through the output layer only.
    """
    return torch.einsum("btv,bth->vh", dlogits_main, hidden_main)


def output_layer_token_dots(hidden: Tensor, logits: Tensor, tokens: Tensor, grad_W: Tensor,
                            temperature: float = 1.0) -> Tensor:
    """(B, T) d_t = < G_W, grad_W log pi(o_t) > = (onehot(o_t) - p_t)^T G_W h_t / temperature (Eq. 3).

    p_t = softmax(logits / temperature). Restricting d_t to the output layer is an approximation of
    the full-parameter d_t = < grad_theta L_main, grad_theta log pi(o_t) > (exact when the output
    layer is the only parameter). Memory: p_t is the one (B, T, V) tensor made; the onehot term is a
    row gather of G_W and the p_t term goes through (B, T, H).
    """
    h = hidden.to(grad_W.dtype)
    picked = (grad_W[tokens] * h).sum(-1)  # (B, T): (G_W h_t)[o_t]
    p = torch.softmax(logits.to(grad_W.dtype) / temperature, dim=-1)  # (B, T, V)
    expected = ((p @ grad_W) * h).sum(-1)  # (B, T): p_t^T G_W h_t
    return (picked - expected) / temperature


def alignment_token_dots(hidden: Tensor, logits: Tensor, tokens: Tensor, grad_W: Tensor, update_W: Tensor,
                         temperature: float = 1.0) -> Tensor:
    """(B, T) d~_t of the alignment objective (controller.objective: alignment; our Eq. 3a, not in DESIGN).

    J(alpha) = <G_W, Delta_W(alpha)> / ||Delta_W(alpha)||: the change of L_main per unit length of the graph update
    Delta_W = sum_t w_t A_t(alpha) grad_W log pi(o_t) on the output layer (update_W, (V, H), over all ranks). Its
    gradient is sum_t w_t dA_t/dalpha d~_t with d~_t = <Q, grad_W log pi(o_t)>, Q = G_W / |Delta| - <G_W, Delta>
    Delta / |Delta|^3: output_layer_token_dots with Q in place of G_W, so lookahead_alpha_surrogate(A, d~, w, 1) is
    the surrogate. Why: Eq. 3 scores a plain SGD step theta - eta grad L_graph, whose first-order gain grows with
    the step's length, so it prefers whatever alpha lengthens the update (alpha_max, whenever the propagated credit
    leans the right way); the optimizer (AdamW) normalises the length away. J is invariant to the scale of the
    advantages: it can only reward an alpha that points the update where the main loss falls.
    Measured limit (results/LOG.md, the moves study): L_main is the outcome loss on training rollouts, so J finds an
    alpha only where the training reward prefers it; on the testbed the long tail's better alpha (about 1) is not better
    for the training reward, and at alpha 0 this gradient is noise (median t 0.09 over 200 steps).
    """
    n = update_W.norm()
    Q = grad_W / n - (grad_W * update_W).sum() / n ** 3 * update_W
    return output_layer_token_dots(hidden, logits, tokens, Q, temperature)


def lookahead_alpha_surrogate(token_adv: Tensor, d: Tensor, weights: Tensor, lr: float) -> Tensor:
    """Scalar eta * sum_t w_t A_t d_t whose gradient w.r.t. alpha (and verifier weights) is Eq. 3.

    token_adv (B, T) attached to alpha; d (B, T) from output_layer_token_dots (treated as a constant);
    weights (B, T): w_t, the weight the policy loss's aggregation gives token t (1/N under token_mean, Eq. 3's
    eta/N; 1/(N_seq |o_i|) under seq_mean_token_mean; 0 on padding and dropped groups); lr = eta, the policy's
    learning rate. Its value is the first-order predicted change of L_main after the graph step (negative: the
    step helps), for the on-policy surrogate L_graph = -sum_t w_t A_t ratio_t (clipping inactive at ratio 1).
    """
    return lr * (token_adv * d.detach() * weights.to(token_adv.dtype)).sum()


class EdgeController:
    """Per-edge-type alpha (and optional verifier trust weights) moved by Eq. 3 behind a signal-to-noise gate.

    Parameterisation: phi holds alpha itself, projected onto [alpha_min, alpha_max] after every step
    (likewise psi holds the trust weights, projected onto [0, weight_max]). DESIGN section 5 writes
    alpha = alpha_max * sigmoid(phi); with a normalised (sign) step only the step geometry depends on
    the parameterisation, and a sigmoid cannot hold the default init alpha = 1 = alpha_max (phi = +inf)
    and makes steps vanish near the bounds, so the projected form is the one that can leave the init.
    The gradient w.r.t. phi is then the gradient w.r.t. alpha. phi and psi live on the CPU in float64
    (compute_advantages moves them to the batch's device); reduce_fn receives CPU float64 tensors, so
    under nccl it must move them to the GPU and back.

    Update rule (mode 'meta'): reduce_fn(grad) (DDP mean over ranks, identity by default) is stored each
    step. rule 'window' (DESIGN 5's gate): after `window` = K steps, per coordinate, the gate opens if
    |mean| > z * std / sqrt(K) (unbiased std over the K steps, a t-test), then phi -= step_size * sign(mean)
    and the K steps are dropped whether it opened or not. rule 'sequential' (ours): per coordinate, the
    gradients since that coordinate's last move are kept, and from the K-th on the same t-test runs after
    every step over all of them; when it passes, the sign step is taken and that coordinate starts afresh.
    Why: on the testbed the alignment gradient's mean is about a quarter of its per-step spread, so an
    8-step window rarely passes (10% of windows) and what failed windows held is thrown away; alpha moved at
    most 0.25 in 200 steps. The sequential test keeps the evidence; its false-move rate under pure noise is
    set by z (tested). Either step is independent of the gradient's scale (1e-8 .. 1e-14 on a tiny model).
    Mode 'fixed' never moves.
    """

    def __init__(self, num_edge_types: int, alpha_init: float | list[float] = 1.0, *, alpha_min: float = 0.0,
                 alpha_max: float = 1.0, mode: str = "meta", window: int = 8, z: float = 2.0, step_size: float = 0.05,
                 rule: str = "window",
                 num_score_kinds: int = 0, weight_init: float | list[float] = 1.0, weight_max: float = 2.0,
                 learn_weights: bool = False, reduce_fn: Callable[[Tensor], Tensor] | None = None):
        if mode not in ("meta", "fixed"):
            raise ValueError(f"controller mode={mode!r}, expected 'meta' or 'fixed'")
        if window < 2:
            raise ValueError(f"controller window={window} must be >= 2 (the gate needs a spread)")
        if rule not in GATE_RULES:
            raise ValueError(f"controller rule={rule!r}, expected one of {GATE_RULES}")
        if not alpha_min <= alpha_max:
            raise ValueError(f"controller alpha_min={alpha_min} > alpha_max={alpha_max}")
        self.mode, self.window, self.z, self.step_size, self.rule = mode, window, z, step_size, rule
        self.alpha_min, self.alpha_max, self.weight_max = alpha_min, alpha_max, weight_max
        self.learn_weights = learn_weights and mode == "meta"
        self.reduce_fn = reduce_fn if reduce_fn is not None else (lambda x: x)
        a0 = torch.as_tensor(alpha_init, dtype=torch.float64).expand(num_edge_types).clone()
        if ((a0 < alpha_min) | (a0 > alpha_max)).any():
            raise ValueError(f"controller alpha_init={alpha_init} outside [{alpha_min}, {alpha_max}]")
        self.phi = a0.requires_grad_(mode == "meta")
        self.psi = None
        if num_score_kinds:
            w0 = torch.as_tensor(weight_init, dtype=torch.float64).expand(num_score_kinds).clone()
            if ((w0 < 0) | (w0 > weight_max)).any():
                raise ValueError(f"controller weight_init={weight_init} outside [0, {weight_max}]")
            self.psi = w0.requires_grad_(self.learn_weights)
        self._buf_phi: list[Tensor] = []
        self._buf_psi: list[Tensor] = []
        self._start_phi = [0] * num_edge_types  # rule 'sequential': per coordinate, its first buffered step
        self._start_psi = [0] * (num_score_kinds if self.psi is not None else 0)
        self.n_windows = 0   # gate tests run: windows (rule 'window'), steps with a coordinate tested ('sequential')
        self.n_open = 0      # coordinates whose gate opened, summed over tests
        self.n_coords = 0    # coordinates tested, summed over tests
        self.last_open: list[bool] = []
        self.last_grad: list[float] = []

    def alpha(self) -> Tensor:
        """(E,) alpha per edge type; requires grad in mode 'meta' (it is the leaf phi)."""
        return self.phi

    def verifier_weights(self) -> Tensor | None:
        """(S,) trust weight per verifier score kind, or None without score kinds."""
        return self.psi

    def trainable(self) -> list[Tensor]:
        out = [self.phi] if self.mode == "meta" else []
        return out + ([self.psi] if self.learn_weights else [])

    def gradients(self, surrogate: Tensor) -> tuple[Tensor, Tensor | None]:
        """(d surrogate / d phi, d surrogate / d psi or None) by autograd; zeros for an unused parameter."""
        params = self.trainable()
        if not params:
            return torch.zeros_like(self.phi), None
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self.mode == "meta":
            return grads[0], (grads[1] if self.learn_weights else None)
        return torch.zeros_like(self.phi), None

    def accumulate(self, grad_phi: Tensor, grad_psi: Tensor | None = None) -> dict:
        """Store one step's alpha (and weight) gradient; run the gate of `rule` and its sign step. Returns logs."""
        if self.mode == "fixed":
            return self.log()
        self._buf_phi.append(self.reduce_fn(grad_phi.detach().to(torch.float64)))
        self.last_grad = self._buf_phi[-1].tolist()  # diagnostics: the step's (rank-averaged) Eq. 3 gradient
        if self.learn_weights:
            if grad_psi is None:
                raise ValueError("EdgeController(learn_weights=True).accumulate needs grad_psi")
            self._buf_psi.append(self.reduce_fn(grad_psi.detach().to(torch.float64)))
        if self.rule == "sequential":
            tested, opened = self._sequential_step(self.phi, self._buf_phi, self._start_phi, self.alpha_min,
                                                   self.alpha_max)
            if self.learn_weights:
                t2, o2 = self._sequential_step(self.psi, self._buf_psi, self._start_psi, 0.0, self.weight_max)
                tested, opened = torch.cat([tested, t2]), torch.cat([opened, o2])
            if tested.any():
                self._count(opened[tested])
        elif len(self._buf_phi) >= self.window:
            opened = [self._gated_step(self.phi, self._buf_phi, self.alpha_min, self.alpha_max)]
            if self.learn_weights:
                opened.append(self._gated_step(self.psi, self._buf_psi, 0.0, self.weight_max))
            self._count(torch.cat(opened))
            self._buf_phi, self._buf_psi = [], []
        return self.log()

    def _count(self, opened: Tensor) -> None:
        self.n_windows += 1
        self.n_open += int(opened.sum())
        self.n_coords += opened.numel()
        self.last_open = opened.tolist()

    def _gated_step(self, param: Tensor, buf: list[Tensor], lo: float, hi: float) -> Tensor:
        g = torch.stack(buf)  # (K, E)
        mean, std = g.mean(0), g.std(0)
        open_ = mean.abs() > self.z * std / math.sqrt(g.shape[0])
        with torch.no_grad():
            param -= self.step_size * torch.sign(mean) * open_
            param.clamp_(lo, hi)
        return open_

    def _sequential_step(self, param: Tensor, buf: list[Tensor], start: list[int], lo: float,
                         hi: float) -> tuple[Tensor, Tensor]:
        """rule 'sequential': coordinate e is tested on buf[start[e]:] once it holds >= window steps; a coordinate
        that passes takes the sign step and starts afresh. Trims the steps no coordinate still uses. Returns the
        (E,) masks (tested, opened)."""
        n = len(buf)
        tested = torch.zeros(len(start), dtype=torch.bool)
        opened = torch.zeros(len(start), dtype=torch.bool)
        for e, s0 in enumerate(start):
            if n - s0 < self.window:
                continue
            g = torch.stack([b[e] for b in buf[s0:]])  # (n - s0,) gradients since e's last move
            mean, std = g.mean(), g.std()
            tested[e] = True
            if mean.abs() > self.z * std / math.sqrt(g.shape[0]):
                opened[e] = True
                start[e] = n
                with torch.no_grad():
                    param[e] = (param[e] - self.step_size * torch.sign(mean)).clamp(lo, hi)
        drop = min(start)
        if drop:
            del buf[:drop]
            start[:] = [s0 - drop for s0 in start]
        return tested, opened

    def log(self) -> dict:
        out = {"controller/alpha": self.phi.detach().tolist(),
               "controller/gate_open_rate": self.n_open / max(self.n_coords, 1),
               "controller/windows": self.n_windows}
        if self.psi is not None:
            out["controller/verifier_weight"] = self.psi.detach().tolist()
        return out

    def state_dict(self) -> dict:
        return {"phi": self.phi.detach().clone(), "psi": None if self.psi is None else self.psi.detach().clone(),
                "buf_phi": [g.clone() for g in self._buf_phi], "buf_psi": [g.clone() for g in self._buf_psi],
                "start_phi": list(self._start_phi), "start_psi": list(self._start_psi),
                "n_windows": self.n_windows, "n_open": self.n_open, "n_coords": self.n_coords,
                "last_open": list(self.last_open)}

    def load_state_dict(self, state: dict) -> None:
        if state["phi"].shape != self.phi.shape:
            raise ValueError(f"controller state phi has shape {tuple(state['phi'].shape)}, expected {tuple(self.phi.shape)}")
        with torch.no_grad():
            self.phi.copy_(state["phi"])
            if self.psi is not None and state["psi"] is not None:
                self.psi.copy_(state["psi"])
        self._buf_phi = [g.clone() for g in state["buf_phi"]]
        self._buf_psi = [g.clone() for g in state["buf_psi"]]
        # absent in states saved before rule 'sequential' existed
        self._start_phi = list(state.get("start_phi", [0] * len(self._start_phi)))
        self._start_psi = list(state.get("start_psi", [0] * len(self._start_psi)))
        self.n_windows, self.n_open, self.n_coords = state["n_windows"], state["n_open"], state["n_coords"]
        self.last_open = list(state["last_open"])
