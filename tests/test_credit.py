"""Tests for credit.py: hand-worked numbers for Eqs. 1a/1b/2, reductions to GRPO and to the process
baseline, invariances on random DAGs, Eq. 3 against autograd and finite differences, the controller's
gate, and graph bandits. Everything in float64 unless a test says otherwise.
"""
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from credit import (CreditBatch, EdgeController, alignment_token_dots, baseline_credit, compute_advantages, credit_stats,  # noqa: E402
                    graph_node_advantages, group_own_evidence, lookahead_alpha_surrogate, node_advantages,
                    outcome_advantages, output_layer_grad, output_layer_token_dots, propagate_credit,
                    token_advantages, topological_order, unparsed_usable_spans, verified_steps, verifier_evidence,
                    vouched_sinks, zero_std_groups)
from graph_grpo import aggregate_loss, aggregation_weights  # noqa: E402  (the trainer's loss aggregation)

f64 = torch.float64
EPS = 1e-4


def t(x, dtype=f64):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-12, rtol=0.0):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=rtol)


def make_batch(rewards, keys, parents, edge_types, G, *, num_edge_types=None, present=None, gate=None,
               spans=None, parsed=None, scores=None):
    """CreditBatch with defaults: every node present, every gate 1, slot v spans token v, all parsed."""
    rewards = torch.as_tensor(rewards, dtype=f64)
    keys = torch.as_tensor(keys, dtype=torch.long)
    B, N = keys.shape
    present = torch.ones(B, N, dtype=torch.bool) if present is None else torch.as_tensor(present, dtype=torch.bool)
    gate = torch.ones(B, N, N, dtype=f64) if gate is None else gate
    if spans is None:
        spans = torch.stack([torch.arange(N), torch.arange(N) + 1], -1).expand(B, N, 2).clone()
        spans[~present] = -1
    parsed = torch.ones(B, dtype=torch.bool) if parsed is None else parsed
    E = num_edge_types if num_edge_types is not None else 1 + max([e for es in edge_types for e in es], default=-1)
    return CreditBatch(rewards, G, present, keys, parents, edge_types, E, gate, spans, parsed, scores)


# -----------------------------------------------------------------------------
# outcome advantage (GRPO)


def test_outcome_advantages_group_scale():
    # group 1: R = [1, 0, 0, 0], mean 1/4, unbiased var = (9/16 + 3/16) / 3 = 1/4, std 1/2
    # group 2: all 0.5 -> zero std -> 0
    r = t([1, 0, 0, 0, .5, .5, .5, .5])
    close(outcome_advantages(r, 4, "group", EPS), [.75 / (.5 + EPS)] + [-.25 / (.5 + EPS)] * 3 + [0.] * 4)


def test_outcome_advantages_batch_scale():
    # centred per group as in 'group'; divided by the std of all 8 rewards:
    # mean 3/8, squared deviations 25/64 + 3 * 9/64 + 4 * 1/64 = 56/64, / 7 = 1/8, std = sqrt(1/8)
    r = t([1, 0, 0, 0, .5, .5, .5, .5])
    s = math.sqrt(1 / 8)
    close(outcome_advantages(r, 4, "batch", EPS), [.75 / (s + EPS)] + [-.25 / (s + EPS)] * 3 + [0.] * 4)


def test_outcome_advantages_no_scale():
    r = t([1, 0, 0, 0, .5, .5, .5, .5])
    close(outcome_advantages(r, 4, "none", EPS), [.75, -.25, -.25, -.25, 0, 0, 0, 0])


def test_outcome_advantages_size_one_group_is_zero():
    # TRL: a group of one has no baseline but itself; the advantage is 0 (not NaN from the n-1 std)
    for scale in ("group", "batch", "none"):
        close(outcome_advantages(t([1., 0., .3]), 1, scale, EPS), [0., 0., 0.])


def test_outcome_advantages_zero_std_group_is_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not come from a mean
    r = t([.1, .1, .1, 1., 0., 0.])
    a = outcome_advantages(r, 3, "group", EPS)
    assert (a[:3] == 0).all()
    assert (a[3:] != 0).all()


def test_zero_std_groups():
    assert zero_std_groups(t([1, 1, 0, 1, .5, .5]), 2).tolist() == [True, False, True]
    assert zero_std_groups(t([1., 0.]), 1).tolist() == [True, True]


# -----------------------------------------------------------------------------
# Eqs. 1a / 1b / 2 by hand


# chain X -> Z -> Y (edge types 0: X->Z, 1: Z->Y), G = 4
#   i  X  Z  Y  R
#   0  a  p  m  1
#   1  a  p  n  0
#   2  a  q  n  0
#   3  b  p  m  1
CHAIN_KEYS = [[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 0, 0]]
CHAIN_R = [1., 0., 0., 1.]
CHAIN_PARENTS, CHAIN_TYPES = [[], [0], [1]], [[], [0], [1]]


def test_chain_own_evidence_by_hand():
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4)
    a = group_own_evidence(b.rewards, b.keys, b.present, b.parents, 4)
    # X (root): V = mean R = 1/2; Q(a) = mean(1, 0, 0) = 1/3, Q(b) = 1
    close(a[:, 0], [-1 / 6, -1 / 6, -1 / 6, 1 / 2])
    # Z: V = Q_X(x_i) = [1/3, 1/3, 1/3, 1]; Q over same (X, Z): (a,p) {0,1} 1/2, (a,q) {2} 0, (b,p) {3} 1
    close(a[:, 1], [1 / 6, 1 / 6, -1 / 3, 0])
    # Y (sink): a = R - V, V over same Z: p {0,1,3} 2/3, q {2} 0
    close(a[:, 2], [1 / 3, -2 / 3, 0, 1 / 3])


def test_chain_propagation_and_scale_by_hand():
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4)
    alpha = t([.5, .25])
    node_adv, a = graph_node_advantages(b, evidence="group", gate="rule", scale="none", alpha=alpha)
    # c_Y = a_Y;  c_Z = a_Z + 0.25 c_Y = [1/4, 0, -1/3, 1/12];  c_X = a_X + 0.5 c_Z = [-1/24, -1/6, -1/3, 13/24]
    c = torch.stack([t([-1 / 24, -1 / 6, -1 / 3, 13 / 24]), t([1 / 4, 0, -1 / 3, 1 / 12]), t([1 / 3, -2 / 3, 0, 1 / 3])], 1)
    close(node_adv, c)
    # Eq. 2: one scale per group, the outcome std: R = [1, 0, 0, 1], std = sqrt(1/3)
    scaled, _ = graph_node_advantages(b, evidence="group", gate="rule", scale="group_outcome", alpha=alpha)
    close(scaled, c / (math.sqrt(1 / 3) + EPS))


# diamond with P: Q -> F1, Q -> F2, P -> F1, P -> F2, F1 -> Y, F2 -> Y; slots Q0 P1 F1=2 F2=3 Y4;
# edge types 0: Q->F, 1: P->F, 2: F->Y. G = 4.
#   i  Q  P  F1 F2  Y  R
#   0  a  x  m  m   3  1
#   1  a  x  m  n   1  0
#   2  a  y  n  m   1  0
#   3  b  x  m  m   2  0
DIAMOND_KEYS = [[0, 0, 0, 0, 3], [0, 0, 0, 1, 1], [0, 1, 1, 0, 1], [1, 0, 0, 0, 2]]
DIAMOND_R = [1., 0., 0., 0.]
DIAMOND_PARENTS = [[], [], [0, 1], [0, 1], [2, 3]]
DIAMOND_TYPES = [[], [], [0, 1], [0, 1], [2, 2]]


def diamond_batch():
    gate = torch.ones(4, 5, 5, dtype=f64)
    gate[3, 2, 4] = 0.  # rollout 3: the rule says F1's verdict cannot change its label (masked facet)
    return make_batch(DIAMOND_R, DIAMOND_KEYS, DIAMOND_PARENTS, DIAMOND_TYPES, 4, gate=gate)


def test_diamond_by_hand():
    b = diamond_batch()
    a = group_own_evidence(b.rewards, b.keys, b.present, b.parents, 4)
    # R mean 1/4.  Q: Q(a) = 1/3, Q(b) = 0.   P: P(x) = mean(1, 0, 0) = 1/3, P(y) = 0
    close(a[:, 0], [1 / 12, 1 / 12, 1 / 12, -1 / 4])
    close(a[:, 1], [1 / 12, 1 / 12, -1 / 4, 1 / 12])
    # F1: parents (Q,P) sets {0,1} {2} {3}; adding F1 splits none of them -> 0
    close(a[:, 2], [0, 0, 0, 0])
    # F2: V = [1/2, 1/2, 0, 0]; F2 splits {0,1} into {0} (R 1) and {1} (R 0)
    close(a[:, 3], [.5, -.5, 0, 0])
    # Y (sink): V over (F1, F2): (m,m) {0,3} 1/2, (m,n) {1} 0, (n,m) {2} 0;  a = R - V
    close(a[:, 4], [.5, 0, 0, -.5])
    alpha = t([.5, .25, 1.])
    c, _ = graph_node_advantages(b, evidence="group", gate="rule", scale="none", alpha=alpha)
    close(c[:, 4], [.5, 0, 0, -.5])
    close(c[:, 2], [.5, 0, 0, 0])            # a_F1 + g * c_Y, gate closed for rollout 3
    close(c[:, 3], [1, -.5, 0, -.5])         # a_F2 + c_Y
    close(c[:, 0], [5 / 6, -1 / 6, 1 / 12, -1 / 2])     # a_Q + 0.5 (c_F1 + c_F2)
    close(c[:, 1], [11 / 24, -1 / 24, -1 / 4, -1 / 24])  # a_P + 0.25 (c_F1 + c_F2)
    A, _ = graph_node_advantages(b, evidence="group", gate="rule", scale="group_outcome", alpha=alpha)
    close(A, c / (.5 + EPS))  # std of [1, 0, 0, 0] = 1/2


def test_diamond_stats_by_hand():
    b = diamond_batch()
    A, a = graph_node_advantages(b, evidence="group", gate="rule", scale="none", alpha=t([.5, .25, 1.]))
    s = credit_stats(b, A, a)
    # keys repeated within the group: Q 3, P 3, F1 3, F2 3, Y 2 (the two '1' labels) of 20 nodes
    assert s["credit/key_repeat_rate"] == pytest.approx(14 / 20)
    # 6 schema edges x 4 rollouts, one closed
    assert s["credit/gate_open_rate"] == pytest.approx(23 / 24)
    # zero own evidence: F1 4, F2 2, Y 2
    assert s["credit/zero_evidence_rate"] == pytest.approx(8 / 20)
    assert s["credit/node_abs_adv"][4] == pytest.approx(.25)


def test_absent_parent_is_its_own_key():
    # chain X -> Z (sink), G = 3; X absent in rollouts 1 and 2
    b = make_batch([1., 0., 1.], [[0, 0], [9, 0], [7, 0]], [[], [0]], [[], [0]], 3,
                   present=[[True, True], [False, True], [False, True]])
    a = group_own_evidence(b.rewards, b.keys, b.present, b.parents, 3)
    # Z: V over same X content: {0} (X = a) -> 1;  {1, 2} (X absent, keys 9 / 7 ignored) -> 1/2
    close(a[:, 1], [0, -.5, .5])
    # X: 0 where absent; rollout 0: Q(a) = 1, V = 2/3
    close(a[:, 0], [1 / 3, 0, 0])


# -----------------------------------------------------------------------------
# random DAGs: invariances


def random_dag_batch(seed, N=6, G=4, n_groups=3, E=3, n_keys=2, p_present=0.8, S=2):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    parents = [sorted(rng.sample(range(v), rng.randint(0, min(v, 3)))) for v in range(N)]
    edge_types = [[rng.randrange(E) for _ in ps] for ps in parents]
    B = G * n_groups
    keys = torch.randint(0, n_keys, (B, N), generator=g)
    present = torch.rand(B, N, generator=g) < p_present
    gate = (torch.rand(B, N, N, generator=g) < 0.8).to(f64)
    rewards = torch.randint(0, 3, (B,), generator=g).to(f64) / 2
    scores = torch.rand(B, N, S, generator=g, dtype=f64)
    scores[torch.rand(B, N, S, generator=g) < 0.3] = float("nan")
    b = make_batch(rewards, keys, parents, edge_types, G, num_edge_types=E, present=present, gate=gate, scores=scores)
    alpha = torch.rand(E, generator=g, dtype=f64)
    return b, alpha


def permute_slots(b, perm):
    """New slot k holds old slot perm[k]."""
    inv = {old: new for new, old in enumerate(perm)}
    parents = [[inv[p] for p in b.parents[old]] for old in perm]
    edge_types = [list(b.edge_types[old]) for old in perm]
    idx = torch.tensor(perm)
    return CreditBatch(b.rewards, b.group_size, b.present[:, idx], b.keys[:, idx], parents, edge_types,
                       b.num_edge_types, b.gate[:, idx][:, :, idx], b.spans[:, idx], b.parsed,
                       None if b.scores is None else b.scores[:, idx])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("evidence", ["group", "both", "baseline"])
def test_credit_does_not_depend_on_slot_order(seed, evidence):
    b, alpha = random_dag_batch(seed)
    w = t([.7, 1.3])
    A, _ = graph_node_advantages(b, evidence=evidence, alpha=alpha, verifier_weights=w)
    rng = random.Random(100 + seed)
    # one permutation that keeps a topological order, one arbitrary (propagation sorts the slots itself)
    topo = topological_order(b.parents)
    levels = {}
    for v in topo:
        levels[v] = 1 + max((levels[p] for p in b.parents[v]), default=-1)
    topo_perm = sorted(range(b.num_slots), key=lambda v: (levels[v], rng.random()))
    any_perm = rng.sample(range(b.num_slots), b.num_slots)
    for perm in (topo_perm, any_perm):
        A2, _ = graph_node_advantages(permute_slots(b, perm), evidence=evidence, alpha=alpha, verifier_weights=w)
        close(A2, A[:, perm])


@pytest.mark.parametrize("seed", range(5))
def test_slot_absent_everywhere_equals_slot_removed(seed):
    """A slot that no rollout has gives every other slot the credit it gets in the schema without that slot.

    Precisely: slot v is absent in every rollout of the batch, and no parent of v has v as its only child
    (deleting v would turn that parent into a sink, whose own evidence is R - V rather than Q - V)."""
    b, alpha = random_dag_batch(seed)
    children = {p: [u for u in range(b.num_slots) if p in b.parents[u]] for p in range(b.num_slots)}
    v = next(u for u in range(b.num_slots) if all(len(children[p]) > 1 for p in b.parents[u]))
    b.present[:, v] = False
    b.spans[:, v] = -1
    A, _ = graph_node_advantages(b, evidence="both", alpha=alpha, verifier_weights=t([.7, 1.3]))
    keep = [k for k in range(b.num_slots) if k != v]
    new = {old: new for new, old in enumerate(keep)}
    parents = [[new[p] for p in b.parents[k] if p != v] for k in keep]
    types = [[e for p, e in zip(b.parents[k], b.edge_types[k]) if p != v] for k in keep]
    idx = torch.tensor(keep)
    reduced = CreditBatch(b.rewards, b.group_size, b.present[:, idx], b.keys[:, idx], parents, types,
                          b.num_edge_types, b.gate[:, idx][:, :, idx], b.spans[:, idx], b.parsed, b.scores[:, idx])
    A2, _ = graph_node_advantages(reduced, evidence="both", alpha=alpha, verifier_weights=t([.7, 1.3]))
    close(A2, A[:, keep])
    assert (A[:, v] == 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_missing_child_contributes_nothing(seed):
    """Whatever own evidence an absent node carries, it never reaches its parents, and its credit is 0."""
    b, alpha = random_dag_batch(seed)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b.rewards.shape[0], b.num_slots, generator=g, dtype=f64)  # nonzero at absent nodes too
    c = propagate_credit(a, alpha, b.gate, b.parents, b.edge_types, b.present)
    assert (c[~b.present] == 0).all()
    cut = b.gate * b.present[:, None, :].to(f64)  # close every edge into an absent child
    c_cut = propagate_credit(a, alpha, cut, b.parents, b.edge_types, b.present)
    close(c, c_cut)


@pytest.mark.parametrize("seed", range(3))
def test_groups_are_independent(seed):
    b, alpha = random_dag_batch(seed)
    A, _ = graph_node_advantages(b, evidence="both", alpha=alpha, verifier_weights=t([.7, 1.3]))
    g = torch.Generator().manual_seed(50 + seed)
    b.rewards[4:] = torch.rand(b.rewards.shape[0] - 4, generator=g, dtype=f64)
    b.keys[4:] = torch.randint(0, 5, b.keys[4:].shape, generator=g)
    A2, _ = graph_node_advantages(b, evidence="both", alpha=alpha, verifier_weights=t([.7, 1.3]))
    close(A2[:4], A[:4])


# -----------------------------------------------------------------------------
# reductions


def test_single_node_graph_is_grpo():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 4, (12,), generator=g).to(f64) / 3
    b = make_batch(r, torch.randint(0, 3, (12, 1), generator=g), [[]], [[]], 4, num_edge_types=1,
                   spans=torch.tensor([[[1, 4]]]).expand(12, 1, 2))
    tok_graph, _ = compute_advantages(b, num_tokens=6, mode="graph", evidence="group", alpha=t([.3]))
    tok_out, _ = compute_advantages(b, num_tokens=6, mode="outcome")
    close(tok_graph, tok_out)
    close(tok_out[:, 0], outcome_advantages(r, 4, "group", EPS))


def agreeing_chain_batch(seed, L=4, G=4, n_groups=3, tree=False):
    """Chain 0 -> 1 -> ... -> L-1. Upstream slots 0..L-2 agree within each group (or, with tree=True,
    each key encodes its whole prefix so it determines every upstream key); the sink varies."""
    g = torch.Generator().manual_seed(seed)
    B = G * n_groups
    if tree:
        choices = torch.randint(0, 2, (B, L), generator=g)
        keys = torch.stack([(choices[:, :k + 1] * (2 ** torch.arange(k + 1))).sum(1) for k in range(L)], 1)
    else:
        keys = torch.randint(0, 3, (n_groups, 1, L), generator=g).expand(n_groups, G, L).reshape(B, L).clone()
        keys[:, -1] = torch.randint(0, 3, (B,), generator=g)
    r = torch.randint(0, 3, (B,), generator=g).to(f64) / 2
    parents = [[]] + [[k - 1] for k in range(1, L)]
    types = [[]] + [[k % 2] for k in range(1, L)]
    return make_batch(r, keys, parents, types, G, num_edge_types=2)


def test_alpha_one_on_agreeing_chain_is_grpo():
    for seed in range(3):
        b = agreeing_chain_batch(seed)
        tok, _ = compute_advantages(b, num_tokens=b.num_slots + 2, evidence="group", alpha=t([1., 1.]))
        out, _ = compute_advantages(b, num_tokens=b.num_slots + 2, mode="outcome")
        close(tok, out)


def test_alpha_one_on_prefix_determined_chain_is_the_baseline_form():
    """When each key determines every upstream key (Q_{v} = V_{child of v}), alpha = 1 telescopes to
    c_v = R - V_v on every node (the baseline form), which is GRPO at the root only."""
    for seed in range(3):
        b = agreeing_chain_batch(seed, tree=True)
        c, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=t([1., 1.]))
        close(c, baseline_credit(b.rewards, b.keys, b.present, b.parents, 4))
        r = b.rewards.view(-1, 4)
        close(c[:, 0], (r - r.mean(1, keepdim=True)).reshape(-1))


def test_baseline_form_equals_alpha_one_on_agreeing_chain():
    b = agreeing_chain_batch(0)
    c_base = baseline_credit(b.rewards, b.keys, b.present, b.parents, 4)
    c_alpha1, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=t([1., 1.]))
    close(c_alpha1, c_base)
    r = b.rewards.view(-1, 4)
    close(c_base, (r - r.mean(1, keepdim=True)).reshape(-1, 1).expand_as(c_base))


def test_verifier_alpha_zero_is_independent_process_baseline():
    # chain X -> Y, G = 4, two score kinds: 0 grounding (weight 0.5), 1 comparator (weight 2)
    nan = float("nan")
    scores = t([[[1, 1], [nan, 1]],
                [[0, 1], [nan, 0]],
                [[1, 0], [nan, nan]],
                [[nan, 0], [nan, nan]]])
    b = make_batch([1., 0., 0., 1.], [[0, 0]] * 4, [[], [0]], [[], [0]], 4, scores=scores)
    A, _ = graph_node_advantages(b, evidence="verifier", scale="none", alpha=t([0.]), verifier_weights=t([.5, 2.]))
    # X, kind 0: mean over rows 0-2 = 2/3 -> 0.5 * [1/3, -2/3, 1/3, 0]; kind 1: mean 1/2 -> 2 * [.5, .5, -.5, -.5]
    close(A[:, 0], [1 / 6 + 1, -1 / 3 + 1, 1 / 6 - 1, -1])
    # Y (sink): the outcome R - mean R plus kind 1 over rows 0, 1: 2 * [.5, -.5, 0, 0]
    close(A[:, 1], [.5 + 1, -.5 - 1, -.5, .5])
    # the pure function, and alpha = 0 really is no propagation
    v = verifier_evidence(scores, b.present, 4, t([.5, 2.]))
    close(v[:, 0], A[:, 0])
    A1, _ = graph_node_advantages(b, evidence="verifier", scale="none", alpha=t([1.]), verifier_weights=t([.5, 2.]))
    close(A1[:, 0], A[:, 0] + A[:, 1])


def test_label_probe_evidence_by_hand():
    """credit.probe_weight on the chain X -> Y, G = 4: evidence 'outcome' gives the outcome R - mean R at the sink
    only, the probe adds probe_weight * p where a step has a probe score (NaN: nothing), before propagation; added to
    group evidence it adds the same, uncentred."""
    nan = float("nan")
    b = make_batch([1., 0., 0., 1.], [[0, 0]] * 4, [[], [0]], [[], [0]], 4)
    b.probes = t([[.25, nan], [-.5, nan], [nan, nan], [0., nan]])
    A, a = graph_node_advantages(b, evidence="outcome", scale="none", alpha=t([0.]), probe_weight=2.)
    close(a[:, 0], [.5, -1., 0., 0.])                  # 2 * p, 0 where NaN
    close(A[:, 1], [.5, -.5, -.5, .5])                 # Y: R - mean R
    A1, _ = graph_node_advantages(b, evidence="outcome", scale="none", alpha=t([1.]), probe_weight=2.)
    close(A1[:, 0], [1., -1.5, -.5, .5])               # X also receives Y's credit
    _, a0 = graph_node_advantages(b, evidence="outcome", scale="none", alpha=t([0.]))
    close(a0[:, 0], [0., 0., 0., 0.])                  # without the probe the outcome form has no step evidence
    _, ag = graph_node_advantages(b, evidence="group", scale="none", alpha=t([0.]))
    _, agp = graph_node_advantages(b, evidence="group", scale="none", alpha=t([0.]), probe_weight=2.)
    close(agp - ag, torch.stack([t([.5, -1., 0., 0.]), t([0., 0., 0., 0.])], 1))
    with pytest.raises(ValueError, match="needs batch.probes"):
        graph_node_advantages(make_batch([1., 0., 0., 1.], [[0, 0]] * 4, [[], [0]], [[], [0]], 4), evidence="outcome",
                              alpha=t([0.]), probe_weight=1.)


@pytest.mark.parametrize("seed", range(4))
def test_identical_key_in_group_has_zero_own_evidence(seed):
    b, _ = random_dag_batch(seed, p_present=1.0, n_keys=3)
    sinks = {v for v in range(b.num_slots)} - {p for ps in b.parents for p in ps}
    v = min(set(range(b.num_slots)) - sinks)  # the sink's evidence is R - V, which is the outcome
    b.keys[:, v] = 5
    a = group_own_evidence(b.rewards, b.keys, b.present, b.parents, b.group_size)
    assert (a[:, v] == 0).all()


def test_closed_gate_stops_propagation():
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4)
    b.gate[1, 1, 2] = 0.  # rollout 1: Z -> Y closed
    alpha = t([.5, .25]).requires_grad_()
    c, a = graph_node_advantages(b, evidence="group", scale="none", alpha=alpha)
    close(c[1, 1].detach(), a[1, 1])  # c_Z = a_Z for rollout 1
    grad = torch.autograd.grad(c[1, 1], alpha, retain_graph=True)[0]
    close(grad, [0., 0.])
    grad_open = torch.autograd.grad(c[0, 1], alpha)[0]  # rollout 0 still gets c_Y through the Z -> Y edge
    close(grad_open, [0., 1 / 3])
    _, stats = compute_advantages(b, num_tokens=3, evidence="group", gate="none", alpha=t([.5, .25]))
    assert stats["credit/gate_open_rate"] == pytest.approx(7 / 8)  # the stat reads the batch's gates


def test_gate_none_opens_every_edge():
    b = diamond_batch()
    c_none, _ = graph_node_advantages(b, evidence="group", gate="none", scale="none", alpha=t([.5, .25, 1.]))
    close(c_none[3, 2], -.5)  # without the gate F1 of rollout 3 gets c_Y = -1/2


def test_propagation_gradient_in_alpha_by_hand():
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4)
    alpha = t([.5, .25]).requires_grad_()
    c, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=alpha)
    # c_X = a_X + a0 (a_Z + a1 c_Y): dc_X/da0 = c_Z = 1/4, dc_X/da1 = a0 c_Y = 1/6 for rollout 0
    close(torch.autograd.grad(c[0, 0], alpha)[0], [1 / 4, 1 / 6])


def chain_scores():
    """Verifier scores on the chain: X wrong in rollout 0 (grounding 0.5), right in 2; Z wrong in 0 (comparator 0),
    right in 1 (both scores 1); everything else has no score."""
    nan = float("nan")
    s = torch.full((4, 3, 2), nan, dtype=f64)
    s[0, 0, 0], s[2, 0, 0] = .5, 1.
    s[0, 1, 1], s[1, 1] = 0., 1.
    return s


def test_verifier_shield_by_hand():
    """credit.shield = verifier on the chain, alpha (.5, .25): a step the verifiers call right keeps only positive
    propagated credit, one they call wrong only negative; unknown steps get Eq. 1b's."""
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4, scores=chain_scores())
    assert verified_steps(b.scores, b.present).tolist() == [[-1, -1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]]
    alpha = t([.5, .25]).requires_grad_()
    c, a = graph_node_advantages(b, evidence="group", scale="none", alpha=alpha, shield="verifier")
    # a as in test_chain_own_evidence_by_hand: a_X = [-1/6, -1/6, -1/6, 1/2], a_Z = [1/6, 1/6, -1/3, 0], c_Y = a_Y
    # Z gets .25 c_Y = [1/12, -1/6, 0, 1/12]: rollout 0 (wrong) drops the +1/12, rollout 1 (right) the -1/6
    # -> c_Z = [1/6, 1/6, -1/3, 1/12]; X gets .5 c_Z = [1/12, 1/12, -1/6, 1/24]: rollout 0 (wrong) drops +1/12,
    # rollout 2 (right) drops -1/6 -> c_X = [-1/6, -1/12, -1/6, 13/24]
    close(c.detach(), torch.stack([t([-1 / 6, -1 / 12, -1 / 6, 13 / 24]), t([1 / 6, 1 / 6, -1 / 3, 1 / 12]),
                                   t([1 / 3, -2 / 3, 0, 1 / 3])], 1))
    # a dropped part carries no gradient; rollout 1's X still depends on alpha_0 through c_Z = 1/6
    close(torch.autograd.grad(c[0, 0], alpha, retain_graph=True)[0], [0., 0.])
    close(torch.autograd.grad(c[1, 0], alpha)[0], [1 / 6, 0.])
    # shield none is Eq. 1b as written (test_chain_propagation_and_scale_by_hand's numbers)
    plain, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=t([.5, .25]), shield="none")
    close(plain[:, 0], [-1 / 24, -1 / 6, -1 / 3, 13 / 24])
    with pytest.raises(ValueError, match="needs batch.scores"):
        graph_node_advantages(make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4), evidence="group",
                              alpha=t([.5, .25]), shield="verifier")
    with pytest.raises(ValueError, match="shield="):
        graph_node_advantages(b, evidence="group", alpha=t([.5, .25]), shield="gold")


def test_complete_shield_by_hand():
    """credit.shield = complete: as the verifier shield, but a step with no score in a kind that judges it (judging)
    is not called right. X in rollout 2 has grounding 1 and no comparator score: with the comparator judging X it is
    unknown, so it gets Eq. 1b's full .5 c_Z = -1/6 (the verifier shield drops it); every other step as before."""
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4, scores=chain_scores())
    judging = torch.tensor([[False, True], [False, False], [False, False]])  # (N, S): the comparator judges X
    assert verified_steps(b.scores, b.present, judging).tolist() == [[-1, -1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
    # a known low score still calls a step wrong: X of rollout 0 has grounding 0.5 and no comparator score
    b.judging = judging
    alpha = t([.5, .25])
    c, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=alpha, shield="complete")
    close(c[:, 0], [-1 / 6, -1 / 12, -1 / 3, 13 / 24])     # the verifier shield's X, but rollout 2: -1/6 - 1/6
    verifier, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=alpha, shield="verifier")
    close(c[:, 1:], verifier[:, 1:])
    # nothing judged by a kind that can be missing: complete is the verifier shield
    b.judging = torch.zeros(3, 2, dtype=torch.bool)
    close(graph_node_advantages(b, evidence="group", scale="none", alpha=alpha, shield="complete")[0], verifier)
    b.judging = None
    with pytest.raises(ValueError, match="needs batch.judging"):
        graph_node_advantages(b, evidence="group", alpha=alpha, shield="complete")


def test_shield_filters_only_the_shielded_slots_by_hand():
    """credit.shield_roles: with X unshielded (shielded_slots False) X receives Eq. 1b's full .5 c_Z, where c_Z is
    still the shielded one: c_X = a_X + .5 [1/6, 1/6, -1/3, 1/12] = [-1/12, -1/12, -1/3, 13/24]; Z and Y as under the
    verifier shield; no slot shielded is Eq. 1b as written."""
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4, scores=chain_scores())
    alpha = t([.5, .25])
    everywhere, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=alpha, shield="verifier")
    b.shielded_slots = torch.tensor([False, True, True])
    c, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=alpha, shield="verifier")
    close(c[:, 0], [-1 / 12, -1 / 12, -1 / 3, 13 / 24])
    close(c[:, 1:], everywhere[:, 1:])
    b.shielded_slots = torch.zeros(3, dtype=torch.bool)
    plain, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=alpha, shield="none")
    close(graph_node_advantages(b, evidence="group", scale="none", alpha=alpha, shield="verifier")[0], plain)
    b.shielded_slots = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="shielded_slots"):
        b.validate()


def test_shield_acts_only_on_the_chosen_verdicts_by_hand():
    """credit.shield_verdicts on the chain (verdicts X: wrong, -, right, -; Z: wrong, right, -, -). Only 'wrong':
    rollout 1's Z (called right) gets .25 c_Y's -1/6 -> c_Z = [1/6, 0, -1/3, 1/12], and rollout 2's X (right) gets
    .5 c_Z's -1/6 -> c_X = [-1/6, -1/6, -1/3, 13/24]. Only 'right': rollout 0's Z and X (called wrong) get their
    positive parts, +1/12 and .5 (1/6 + 1/12) = 1/8 -> c_Z = [1/4, 1/6, -1/3, 1/12], c_X = [-1/24, -1/12, -1/6,
    13/24]. Both: the verifier shield (test_verifier_shield_by_hand)."""
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4, scores=chain_scores())
    alpha = t([.5, .25])
    kw = dict(evidence="group", scale="none", alpha=alpha, shield="verifier")
    wrong, _ = graph_node_advantages(b, shield_verdicts=("wrong",), **kw)
    close(wrong[:, 0], [-1 / 6, -1 / 6, -1 / 3, 13 / 24])
    close(wrong[:, 1], [1 / 6, 0, -1 / 3, 1 / 12])
    right, _ = graph_node_advantages(b, shield_verdicts=("right",), **kw)
    close(right[:, 0], [-1 / 24, -1 / 12, -1 / 6, 13 / 24])
    close(right[:, 1], [1 / 4, 1 / 6, -1 / 3, 1 / 12])
    close(graph_node_advantages(b, shield_verdicts=("wrong", "right"), **kw)[0], graph_node_advantages(b, **kw)[0])
    for bad in ((), ("blame",)):
        with pytest.raises(ValueError, match="shield_verdicts"):
            graph_node_advantages(b, shield_verdicts=bad, **kw)


def test_vouched_label_keeps_only_positive_own_evidence_by_hand():
    """credit.shield_label on the chain X -> Z -> Y. Added to chain_scores: X right in rollout 1, Y (the label) right
    in rollouts 0, 1 and 3. Vouched: rollout 1 only (X, Z and Y all called right); rollout 0 has X and Z wrong,
    rollout 3 X and Z unknown, rollout 2 Y unknown. Rollout 1's a_Y = -2/3 (test_verifier_shield_by_hand's c_Y)
    becomes 0; everything else is the verifier shield's. An absent ancestor is not judged; a sink without a present
    parent is not vouched."""
    s = chain_scores()
    s[1, 0, 0], s[[0, 1, 3], 2, 1] = 1., 1.
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4, scores=s)
    b.judging = torch.zeros(3, 2, dtype=torch.bool)  # no kind must be known: every known score judges
    verdict = verified_steps(b.scores, b.present)
    assert verdict.tolist() == [[-1, -1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 1]]
    assert vouched_sinks(verdict, b.present, CHAIN_PARENTS).tolist() == [[False, False, False], [False, False, True],
                                                                           [False, False, False], [False, False, False]]
    alpha = t([.5, .25])
    kw = dict(evidence="group", scale="none", alpha=alpha, shield="verifier")
    plain, _ = graph_node_advantages(b, **kw)
    c, a = graph_node_advantages(b, shield_label=True, **kw)
    close(plain[:, 2], [1 / 3, -2 / 3, 0, 1 / 3])
    close(c[:, 2], [1 / 3, 0, 0, 1 / 3])
    close(a[:, 2], [1 / 3, 0, 0, 1 / 3])
    close(c[:, :2], plain[:, :2])  # rollout 1's Z, called right, already dropped the -1/6 from Y
    # vouching needs judged verdicts whatever the shield: with the comparator judging X, rollout 1's X (grounding 1,
    # no comparator score) is not called right, and nothing is vouched for
    b.judging = torch.tensor([[False, True], [False, False], [False, False]])
    close(graph_node_advantages(b, shield_label=True, **kw)[0], plain)
    b.judging = None
    with pytest.raises(ValueError, match="needs batch.judging"):
        graph_node_advantages(b, shield_label=True, **kw)
    b.judging = torch.zeros(3, 2, dtype=torch.bool)
    # on the wrong side only, rollout 1's Z (called right) took Y's blame: .25 (-2/3) = -1/6; vouched, none
    wrong_side, _ = graph_node_advantages(b, shield_verdicts=("wrong",), **kw)
    vouched_wrong_side, _ = graph_node_advantages(b, shield_verdicts=("wrong",), shield_label=True, **kw)
    close(wrong_side[1, 1] - vouched_wrong_side[1, 1], -1 / 6)
    # an absent ancestor is not judged: rollout 3 with Z right and X absent is vouched, with X present and unknown
    # not; with Z absent, Y has no present parent and is not vouched whatever X says
    v2 = verdict.clone()
    v2[3, 1] = 1
    present = torch.ones(4, 3, dtype=torch.bool)
    assert not vouched_sinks(v2, present, CHAIN_PARENTS)[3, 2]
    present[3, 0] = False
    assert vouched_sinks(v2, present, CHAIN_PARENTS)[3].tolist() == [False, False, True]
    present[3] = torch.tensor([True, False, True])
    v2[3, 0] = 1
    assert not vouched_sinks(v2, present, CHAIN_PARENTS)[3, 2]
    with pytest.raises(ValueError, match="shield_label"):
        graph_node_advantages(b, evidence="group", alpha=alpha, shield_label=True)


# -----------------------------------------------------------------------------
# Eq. 2 options and token advantages


def test_node_scale_none_and_node():
    c = t([[1., 2.], [3., 2.], [0., 2.], [5., 9.]])
    r = t([1., 0., 1., 1.])
    close(node_advantages(c, r, 2, "none"), c)
    # 'node': per group and slot, a z-score over present rows; group 0 slot 0: mean 2, std(1, 3) = sqrt(2);
    # slot 1 is constant in group 0 -> 0; group 1: rewards are equal, but 'node' ignores rewards: mean 2.5, std
    # sqrt(12.5)
    present = torch.ones(4, 2, dtype=torch.bool)
    present[3, 1] = False  # group 1 slot 1 has one value -> 0 (and 0 where absent)
    out = node_advantages(c, r, 2, "node", EPS, present)
    s2, s12 = math.sqrt(2), math.sqrt(12.5)
    close(out, [[-1 / (s2 + EPS), 0.], [1 / (s2 + EPS), 0.], [-2.5 / (s12 + EPS), 0.], [2.5 / (s12 + EPS), 0.]])


def test_node_scale_group_outcome_zero_std_group_divides_by_one():
    c = t([[.3], [-.3], [1.], [-1.]])
    r = t([1., 1., 1., 0.])
    close(node_advantages(c, r, 2, "group_outcome", EPS), [[.3], [-.3], [1 / (math.sqrt(.5) + EPS)], [-1 / (math.sqrt(.5) + EPS)]])


def test_token_advantages_layout_by_hand():
    node_adv = t([[1., 2.], [3., 4.], [5., 6.]])
    spans = torch.tensor([[[0, 2], [3, 5]], [[0, 2], [3, 5]], [[-1, -1], [1, 3]]])
    parsed = torch.tensor([True, False, True])
    outcome = t([10., 20., 30.])
    tok = token_advantages(node_adv, spans, parsed, outcome, 6)
    close(tok, [[1, 1, 10, 2, 2, 10],
                [20, 20, 20, 20, 20, 20],   # unparsed: the outcome advantage everywhere
                [30, 6, 6, 30, 30, 30]])    # absent node: its tokens (none) take nothing


def test_unparsed_nodes_keep_their_node_advantage_by_hand():
    """credit.unparsed = nodes: in rollout 1 (does not parse) slot 0 is clean and keeps its node advantage 3, slot 1
    (named by a parse problem) and the tokens between take the outcome 20; answers that parse are as before."""
    node_adv = t([[1., 2.], [3., 4.], [5., 6.]])
    spans = torch.tensor([[[0, 2], [3, 5]], [[0, 2], [3, 5]], [[-1, -1], [1, 3]]])
    parsed = torch.tensor([True, False, True])
    present = torch.tensor([[True, True], [True, True], [False, True]])
    clean = torch.tensor([[True, False], [True, False], [False, False]])
    use = unparsed_usable_spans(present, parsed, clean)
    assert use.tolist() == [[True, True], [True, False], [False, True]]
    close(token_advantages(node_adv, spans, use, t([10., 20., 30.]), 6), [[1, 1, 10, 2, 2, 10],
                                                                            [3, 3, 20, 20, 20, 20],
                                                                            [30, 6, 6, 30, 30, 30]])
    # through compute_advantages: outcome mode gives the unparsed rollout the outcome everywhere, nodes mode not
    b = make_batch(CHAIN_R, CHAIN_KEYS, CHAIN_PARENTS, CHAIN_TYPES, 4, parsed=torch.tensor([True, False, True, True]))
    b.clean = torch.tensor([[True] * 3, [True, False, True], [True] * 3, [True] * 3])
    kw = dict(num_tokens=3, evidence="group", scale="none", outcome_scale="none", alpha=t([.5, .25]))
    plain, _ = compute_advantages(b, **kw)
    nodes, _ = compute_advantages(b, unparsed="nodes", **kw)
    outcome = CHAIN_R[1] - sum(CHAIN_R) / 4
    close(plain[1], [outcome] * 3)
    node_adv, _ = graph_node_advantages(b, evidence="group", scale="none", alpha=t([.5, .25]))
    close(nodes[1], [node_adv[1, 0], outcome, node_adv[1, 2]])  # slot v spans token v (make_batch)
    close(nodes[[0, 2, 3]], plain[[0, 2, 3]])
    b.clean = None
    with pytest.raises(ValueError, match="needs batch.clean"):
        compute_advantages(b, unparsed="nodes", **kw)
    with pytest.raises(ValueError, match="unparsed="):
        compute_advantages(b, unparsed="garbage", **kw)


def test_token_advantages_differentiable_and_overlap_is_error():
    node_adv = t([[1., 2.]]).requires_grad_()
    tok = token_advantages(node_adv, torch.tensor([[[0, 2], [2, 3]]]), torch.tensor([True]), t([0.]), 4)
    tok.sum().backward()
    close(node_adv.grad, [[2., 1.]])
    with pytest.raises(ValueError, match="token 1"):
        token_advantages(node_adv.detach(), torch.tensor([[[0, 2], [1, 3]]]), torch.tensor([True]), t([0.]), 4)


def test_compute_advantages_rejects_bad_options():
    b = diamond_batch()
    with pytest.raises(ValueError, match="evidence"):
        compute_advantages(b, num_tokens=5, evidence="magic", alpha=t([1., 1., 1.]))
    with pytest.raises(ValueError, match="alpha"):
        compute_advantages(b, num_tokens=5, evidence="group")
    with pytest.raises(ValueError, match="alpha has shape"):
        compute_advantages(b, num_tokens=5, evidence="group", alpha=t([1., 1.]))
    with pytest.raises(ValueError, match="scores"):
        compute_advantages(b, num_tokens=5, evidence="verifier", alpha=t([1., 1., 1.]))
    b.parents[0], b.edge_types[0] = [4], [2]
    with pytest.raises(ValueError, match="cycle"):
        compute_advantages(b, num_tokens=5, evidence="group", alpha=t([1., 1., 1.]))


# -----------------------------------------------------------------------------
# Eq. 3


def log_pi(logits, tokens, temperature):
    return torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None])[..., 0]


def test_output_layer_token_dots_matches_autograd_on_mlp():
    g = torch.Generator().manual_seed(0)
    B, T, D, H, V, temp = 2, 3, 4, 5, 7, 0.7
    x = torch.randn(B, T, D, generator=g, dtype=f64)
    W1 = torch.randn(H, D, generator=g, dtype=f64)
    W2 = torch.randn(V, H, generator=g, dtype=f64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    G_W = torch.randn(V, H, generator=g, dtype=f64)
    h = torch.tanh(x @ W1.T)
    logits = h @ W2.T
    d = output_layer_token_dots(h, logits.detach(), tokens, G_W, temp)
    for b in range(B):
        for k in range(T):
            gw = torch.autograd.grad(log_pi(logits[b, k], tokens[b, k], temp), W2, retain_graph=True)[0]
            assert d[b, k].item() == pytest.approx((gw * G_W).sum().item(), abs=1e-12)


def test_output_layer_grad_matches_autograd():
    g = torch.Generator().manual_seed(1)
    B, T, H, V, temp = 2, 4, 3, 6, 1.3
    h = torch.randn(B, T, H, generator=g, dtype=f64)
    W = torch.randn(V, H, generator=g, dtype=f64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    A = torch.randn(B, T, generator=g, dtype=f64)
    logits = h @ W.T
    lp = log_pi(logits, tokens, temp)
    loss = -(A * torch.exp(lp - lp.detach())).mean()
    dlogits, gW = torch.autograd.grad(loss, [logits, W])
    close(output_layer_grad(h, dlogits), gW)


def eq3_toy(seed=0):
    """Toy policy whose only parameters are the output layer W (V, H): logits = h W^T, fixed features h."""
    g = torch.Generator().manual_seed(seed)
    V, H, G, T, Tm, temp = 5, 4, 4, 7, 5, 0.8
    B = 2 * G
    W = torch.randn(V, H, generator=g, dtype=f64)
    # graph batch: X0, X1 roots, Y sink; spans X0 [0,2) X1 [2,4) Y [5,6); tokens 4 and 6 are separators
    keys = torch.randint(0, 2, (B, 3), generator=g)
    rewards = t([1, 0, 0, 1, 1, 1, 0, 0.5])
    gate = torch.ones(B, 3, 3, dtype=f64)
    gate[2, 0, 2] = gate[5, 1, 2] = 0.
    spans = torch.tensor([[0, 2], [2, 4], [5, 6]]).expand(B, 3, 2).clone()
    parsed = torch.ones(B, dtype=torch.bool)
    parsed[7] = False
    b = make_batch(rewards, keys, [[], [], [0, 1]], [[], [], [0, 1]], G, gate=gate, spans=spans, parsed=parsed)
    h = torch.randn(B, T, H, generator=g, dtype=f64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=f64)
    mask[3, 6] = 0.  # padded positions: rows of different lengths (seq_mean aggregations weigh them differently)
    mask[0, 4:] = mask[5, 2:] = 0.
    # held-out main batch with outcome advantages
    hm = torch.randn(B, Tm, H, generator=g, dtype=f64)
    tokm = torch.randint(0, V, (B, Tm), generator=g)
    Am = outcome_advantages(t([1, 0, 1, 1, 0, 0, 1, 0]), G)[:, None].expand(B, Tm)
    return dict(W=W, b=b, h=h, tokens=tokens, mask=mask, hm=hm, tokm=tokm, Am=Am, temp=temp, T=T)


def eq3_graph_adv(toy, alpha):
    return compute_advantages(toy["b"], num_tokens=toy["T"], evidence="group", alpha=alpha)[0]


def eq3_main_loss_after_step(toy, alpha, eta, aggregation="token_mean"):
    """L_main(theta') with theta' = theta - eta grad L_graph(theta; alpha), L_graph aggregated as the trainer's loss
    (graph_grpo.aggregate_loss); ratios against the sampling W."""
    W, temp, mask = toy["W"], toy["temp"], toy["mask"]
    A = eq3_graph_adv(toy, alpha).detach()
    Wv = W.clone().requires_grad_()
    lp = log_pi(toy["h"] @ Wv.T, toy["tokens"], temp)
    old = log_pi(toy["h"] @ W.T, toy["tokens"], temp)
    L_graph = aggregate_loss(-A * torch.exp(lp - old), mask, aggregation, float(mask.sum()), float(mask.shape[0]),
                             toy["T"])
    W_new = W - eta * torch.autograd.grad(L_graph, Wv)[0]
    lp_m = log_pi(toy["hm"] @ W_new.T, toy["tokm"], temp)
    old_m = log_pi(toy["hm"] @ W.T, toy["tokm"], temp)  # the sampling policy theta, not theta'
    return -(toy["Am"] * torch.exp(lp_m - old_m)).mean()


def eq3_analytic(toy, alpha, eta, weights):
    W, temp = toy["W"], toy["temp"]
    logits_m = (toy["hm"] @ W.T).requires_grad_()
    lp = log_pi(logits_m, toy["tokm"], temp)
    L_main = -(toy["Am"] * torch.exp(lp - lp.detach())).mean()
    G_W = output_layer_grad(toy["hm"], torch.autograd.grad(L_main, logits_m)[0])
    d = output_layer_token_dots(toy["h"], toy["h"] @ W.T, toy["tokens"], G_W, temp)
    a = alpha.clone().requires_grad_()
    s = lookahead_alpha_surrogate(eq3_graph_adv(toy, a), d, weights, eta)
    return torch.autograd.grad(s, a)[0]


def eq3_relative_errors(toy, alpha, aggregation, weights, etas=(1e-2, 1e-3), h=1e-3):
    errors = {}
    for eta in etas:
        fd = torch.stack([(eq3_main_loss_after_step(toy, alpha + h * e, eta, aggregation) -
                           eq3_main_loss_after_step(toy, alpha - h * e, eta, aggregation)) / (2 * h)
                          for e in torch.eye(len(alpha), dtype=f64)])
        an = eq3_analytic(toy, alpha, eta, weights)
        assert (an.abs() > 1e-6 * eta).all()  # the toy has signal on both edge types
        errors[eta] = ((an - fd).abs() / fd.abs()).max().item()
    return errors


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_eq3_matches_finite_difference_of_main_loss_after_graph_step(aggregation):
    """Eq. 3 (d_t weighted by each token's aggregation weight) vs a central difference of L_main(theta'(alpha))
    under every aggregation of the policy loss; the gap is the O(eta^2) look-ahead error."""
    toy = eq3_toy()
    mask, alpha = toy["mask"], t([.6, .3])
    weights = aggregation_weights(mask, aggregation, float(mask.sum()), float(mask.shape[0]), toy["T"])
    errors = eq3_relative_errors(toy, alpha, aggregation, weights)
    assert errors[1e-3] < 1e-3       # three digits, as DESIGN section 5 reports
    assert errors[1e-3] < errors[1e-2] / 5  # and the gap shrinks with eta: first order
    if aggregation == "seq_mean_token_mean":  # uniform 1/N weights (the old surrogate) are wrong here, at any eta
        uniform = eq3_relative_errors(toy, alpha, aggregation, mask / mask.sum(), etas=(1e-3,))
        assert uniform[1e-3] > 0.05


def test_aggregation_weights_give_the_aggregated_loss():
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(5, 6, generator=g, dtype=f64)
    mask = (torch.rand(5, 6, generator=g) < 0.7).to(f64)
    mask[:, 0] = 1.
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        w = aggregation_weights(mask, agg, 40.0, 7.0, 6)
        close((per_token * w).sum(), aggregate_loss(per_token, mask, agg, 40.0, 7.0, 6))


# -----------------------------------------------------------------------------
# verifier errors: group evidence ignores them, the learned trust weight falls


def facet_toy_batch(g, W, examples, G, temp=1.0):
    """Tabular policy over contexts (one-hot features): slots F (verdict 0 match / 1 mismatch), F2 (a facet
    the label rule masks: gate F2 -> Y is 0), Y (label = F's verdict, sampled with a policy that follows it).
    Truth: every F verdict should be 'match'; R = 1 iff the label says match.
    Verifier comparator on F: wrong (prefers 'mismatch') on examples 0..2 (a synonym its table lacks),
    right on example 3; on F2 it scores at random (it does not matter: the facet is masked)."""
    n = len(examples)
    B, H = n * G, 4 * n + 2
    ex = torch.tensor(examples).repeat_interleave(G)
    hid = torch.zeros(B, 3, H, dtype=f64)
    hid[torch.arange(B), 0, ex] = 1.
    hid[torch.arange(B), 1, n + ex] = 1.
    tokens = torch.zeros(B, 3, dtype=torch.long)
    for slot in (0, 1):
        p = torch.softmax(hid[:, slot] @ W.T / temp, -1)
        tokens[:, slot] = torch.multinomial(p, 1, generator=g)[:, 0]
    hid[torch.arange(B), 2, 4 * n + tokens[:, 0]] = 1.  # Y's context is F's verdict
    p = torch.softmax(hid[:, 2] @ W.T / temp, -1)
    tokens[:, 2] = torch.multinomial(p, 1, generator=g)[:, 0]
    R = (tokens[:, 2] == 0).to(f64)
    nan = float("nan")
    wrong = (ex < 3)
    s_f = torch.where(wrong, (tokens[:, 0] == 1).to(f64), (tokens[:, 0] == 0).to(f64))
    s_f2 = torch.rand(B, generator=g, dtype=f64)
    scores = torch.stack([s_f, s_f2, torch.full((B,), nan, dtype=f64)], 1)[..., None]  # (B, 3, 1)
    gate = torch.ones(B, 3, 3, dtype=f64)
    gate[:, 1, 2] = 0.
    spans = torch.tensor([[0, 1], [1, 2], [2, 3]]).expand(B, 3, 2)
    b = make_batch(R, tokens, [[], [], [0, 1]], [[], [], [0, 0]], G, gate=gate, spans=spans, scores=scores)
    return b, hid, tokens


def facet_toy_policy():
    W = torch.zeros(2, 4 * 4 + 2, dtype=f64)
    W[0, 16], W[1, 17] = 2., 2.  # Y follows F's verdict with probability e^2 / (e^2 + 1) = 0.88
    return W


def test_group_evidence_ignores_verifier_scores_that_are_wrong():
    g = torch.Generator().manual_seed(0)
    b, _, _ = facet_toy_batch(g, facet_toy_policy(), [0, 1, 2, 3], 4)
    kw = dict(num_tokens=3, gate="rule", alpha=t([1.]), verifier_weights=t([1.]))
    before, _ = compute_advantages(b, evidence="group", **kw)
    both_before, _ = compute_advantages(b, evidence="both", **kw)
    b.scores = 1. - b.scores  # flip every verifier score
    after, _ = compute_advantages(b, evidence="group", **kw)
    both_after, _ = compute_advantages(b, evidence="both", **kw)
    close(after, before)
    assert (both_after - both_before).abs().max() > 0.1  # 'both' does read them
    # the masked facet F2 receives nothing from the label: its credit is its own evidence only
    A, a = graph_node_advantages(b, evidence="group", gate="rule", scale="none", alpha=t([1.]))
    close(A[:, 1], a[:, 1])


def test_learned_trust_weight_falls_when_the_verifier_is_mostly_wrong():
    """Main loss: outcome GRPO on a fresh held-out batch of the same policy. Raising the trust weight w
    moves the graph step along w * (s - mean s) on F tokens; where the verifier is wrong (3 of 4
    examples) that favours 'mismatch', whose probability the outcome loss wants lowered (d_t > 0), so
    dL_main(theta')/dw > 0 in expectation and the sign step lowers w."""
    g = torch.Generator().manual_seed(0)
    W = facet_toy_policy()
    ctl = EdgeController(1, 1.0, mode="meta", window=4, z=2.0, step_size=0.1,
                         num_score_kinds=1, weight_init=1.0, weight_max=2.0, learn_weights=True)
    examples, G, eta = [0, 1, 2, 3], 8, 0.1
    for _ in range(24):
        b, hid, tok = facet_toy_batch(g, W, examples, G)
        bm, hid_m, tok_m = facet_toy_batch(g, W, examples, G)
        logits_m = (hid_m @ W.T).requires_grad_()
        lp = log_pi(logits_m, tok_m, 1.0)
        Am = outcome_advantages(bm.rewards, G)[:, None].expand_as(lp)
        L_main = -(Am * torch.exp(lp - lp.detach())).mean()
        G_W = output_layer_grad(hid_m, torch.autograd.grad(L_main, logits_m)[0])
        d = output_layer_token_dots(hid, hid @ W.T, tok, G_W, 1.0)
        A, _ = compute_advantages(b, num_tokens=3, evidence="both", gate="rule",
                                  alpha=ctl.alpha(), verifier_weights=ctl.verifier_weights())
        s = lookahead_alpha_surrogate(A, d, torch.ones_like(d) / d.numel(), eta)
        grad_phi, grad_psi = ctl.gradients(s)
        ctl.accumulate(grad_phi, grad_psi)
    assert ctl.n_windows == 6
    assert ctl.verifier_weights().item() <= 1.0 - 3 * 0.1 + 1e-12  # fell in at least 3 of 6 windows


# -----------------------------------------------------------------------------
# controller


def feed(ctl, grads):
    for gr in grads:
        ctl.accumulate(torch.as_tensor(gr, dtype=f64))


def test_controller_gate_stays_closed_on_zero_mean_noise_at_any_scale():
    # scales are powers of two so that every mean and std scales exactly and the gate decisions agree
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(400 * 8, 2, generator=g, dtype=f64)
    noise = (noise.view(400, 8, 2) - noise.view(400, 8, 2).mean(1, keepdim=True)).view(-1, 2)  # zero mean per window
    alphas = []
    for scale in (2.0 ** -45, 1.0, 2.0 ** 20):
        ctl = EdgeController(2, 0.5, window=8, z=2.0, step_size=0.05)
        feed(ctl, noise * scale)
        assert ctl.n_windows == 400 and ctl.n_open == 0
        alphas.append(ctl.alpha().tolist())
    assert alphas == [[0.5, 0.5]] * 3


def test_controller_gate_false_open_rate_on_gaussian_noise_is_small_and_scale_free():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(300 * 8, 3, generator=g, dtype=f64)
    rates = []
    for scale in (2.0 ** -40, 2.0 ** 10):
        ctl = EdgeController(3, 0.5, window=8, z=3.0, step_size=0.01)
        feed(ctl, noise * scale)
        rates.append(ctl.log()["controller/gate_open_rate"])
    assert rates[0] == rates[1]
    assert rates[0] < 0.05  # P(|t_7| > 3) is about 0.02


def test_controller_gate_opens_on_consistent_sign_and_step_is_normalised():
    g = torch.Generator().manual_seed(2)
    for scale in (1e-14, 1.0, 1e6):
        ctl = EdgeController(2, 0.5, window=4, z=2.0, step_size=0.05)
        sig = torch.stack([torch.full((4,), 1.0), torch.full((4,), -1.0)], 1) + 0.3 * torch.randn(4, 2, generator=g, dtype=f64)
        feed(ctl, sig * scale)
        assert ctl.n_open == 2
        close(ctl.alpha().detach(), [0.45, 0.55])  # phi -= step * sign(mean), whatever the scale


def test_controller_alpha_stays_in_bounds():
    ctl = EdgeController(2, [0.9, 0.3], alpha_min=0.2, alpha_max=1.0, window=2, step_size=0.25)
    feed(ctl, [[-1., 1.]] * 20)  # pushes alpha 0 up, alpha 1 down
    close(ctl.alpha().detach(), [1.0, 0.2])
    with pytest.raises(ValueError, match="alpha_init"):
        EdgeController(1, 1.5, alpha_max=1.0)


def test_controller_fixed_mode_never_moves():
    ctl = EdgeController(2, [1.0, 0.5], mode="fixed", window=2)
    feed(ctl, [[5., -5.]] * 10)
    assert ctl.alpha().tolist() == [1.0, 0.5]
    assert not ctl.alpha().requires_grad
    assert ctl.n_windows == 0


def test_controller_state_dict_round_trip():
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(11, 2, generator=g, dtype=f64) + t([1., 0.])
    a = EdgeController(2, 0.5, window=4, num_score_kinds=1, learn_weights=True)
    for gr in grads[:7]:
        a.accumulate(gr, gr[:1])
    b = EdgeController(2, 0.5, window=4, num_score_kinds=1, learn_weights=True)
    b.load_state_dict(a.state_dict())
    for gr in grads[7:]:
        a.accumulate(gr, gr[:1])
        b.accumulate(gr, gr[:1])
    assert a.state_dict()["phi"].tolist() == b.state_dict()["phi"].tolist()
    assert a.log() == b.log()


def test_sequential_gate_keeps_the_evidence_that_windows_throw_away():
    """Gradients 1, 0, 1, 0, ... with K = 4, z = 2 (hand numbers). Every 4-step window is [1, 0, 1, 0]: mean 0.5,
    unbiased std 0.577, t = 0.5 / (0.577 / 2) = 1.73 < 2, so the window rule never moves. The sequential rule tests
    every step over all steps since the last move: at step 4 t = 1.73; at step 5 ([1, 0, 1, 0, 1]: mean 0.6, std
    0.548) t = 2.45 > 2, a step down; afresh from step 6: [0, 1, 0, 1] 1.73, [0, 1, 0, 1, 0] 1.63 (mean 0.4,
    std 0.548), [0, 1, 0, 1, 0, 1] 2.24 > 2 at step 11, a second step down."""
    grads = [[1.0], [0.0]] * 6
    window = EdgeController(1, 0.5, window=4, z=2.0, step_size=0.1, rule="window")
    feed(window, grads)
    assert window.n_open == 0 and window.alpha().item() == 0.5
    seq = EdgeController(1, 0.5, window=4, z=2.0, step_size=0.1, rule="sequential")
    moves = []
    for i, gr in enumerate(grads, 1):
        before = seq.alpha().item()
        seq.accumulate(torch.as_tensor(gr, dtype=f64))
        if seq.alpha().item() != before:
            moves.append(i)
    assert moves == [5, 11]
    close(seq.alpha().detach(), [0.3])
    assert (seq.n_windows, seq.n_open) == (5, 2)  # tests at steps 4, 5 and 9, 10, 11 (step 12 has 1 step since 11)
    assert len(seq._buf_phi) == 1  # only step 12, which the next test still uses, is kept
    with pytest.raises(ValueError, match="rule"):
        EdgeController(1, 0.5, rule="adam")


def test_sequential_gate_moves_each_coordinate_on_its_own_evidence_and_resumes():
    """Coordinate 0 gets a clear signal, coordinate 1 noise: 0 moves every K steps, 1 rarely; a controller rebuilt
    from state_dict mid-run continues exactly (the per-coordinate starts are part of the state)."""
    g = torch.Generator().manual_seed(4)
    grads = torch.stack([torch.full((60,), -1.0), torch.zeros(60)], 1) + 0.2 * torch.randn(60, 2, generator=g, dtype=f64)
    a = EdgeController(2, 0.5, alpha_max=2.0, window=4, z=2.5, step_size=0.05, rule="sequential")
    for gr in grads[:23]:
        a.accumulate(gr)
    b = EdgeController(2, 0.5, alpha_max=2.0, window=4, z=2.5, step_size=0.05, rule="sequential")
    b.load_state_dict(a.state_dict())
    for gr in grads[23:]:
        a.accumulate(gr)
        b.accumulate(gr)
    assert a.state_dict()["phi"].tolist() == b.state_dict()["phi"].tolist() and a.log() == b.log()
    close(a.alpha().detach()[:1], [0.5 + 15 * 0.05])  # a step up at steps 4, 8, ..., 60
    assert abs(a.alpha()[1].item() - 0.5) <= 0.1


def test_sequential_gate_false_moves_on_gaussian_noise_are_rare_and_scale_free():
    """Zero-mean noise, 200 steps per run as in the testbed's RL runs, K = 8, z = 2.5: alpha ends within one step of
    where it started in most runs, and the decisions do not depend on the gradient's scale (powers of two)."""
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(40, 200, 1, generator=g, dtype=f64)
    ends = {}
    for scale in (2.0 ** -40, 2.0 ** 10):
        ends[scale] = []
        for run in noise:
            ctl = EdgeController(1, 1.0, alpha_max=2.0, window=8, z=2.5, step_size=0.25, rule="sequential")
            feed(ctl, run * scale)
            ends[scale].append(ctl.alpha().item())
    assert ends[2.0 ** -40] == ends[2.0 ** 10]
    moved = sum(abs(e - 1.0) > 0.25 + 1e-9 for e in ends[2.0 ** 10])
    assert moved <= 4, ends[2.0 ** 10]  # more than one net step in at most 10% of runs


def test_controller_reduce_fn_is_applied_before_accumulation():
    # a "rank" whose local gradients are noise but whose reduced (all-rank mean) gradient is a clear signal
    ctl = EdgeController(1, 0.5, window=4, step_size=0.1, reduce_fn=lambda x: x * 0 + 1.0)
    feed(ctl, [[-3.], [2.], [-1.], [5.]])
    close(ctl.alpha().detach(), [0.4])


# -----------------------------------------------------------------------------
# graph bandits


def bandit_batch(x1, x2, y, R, G):
    B = x1.shape[0]
    keys = torch.stack([x1, x2, y], 1)
    spans = torch.tensor([[0, 1], [1, 2], [2, 3]]).expand(B, 3, 2)
    return make_batch(R, keys, [[], [], [0, 1]], [[], [], [0, 1]], G, spans=spans)


def test_tabular_root_credit_sums_to_the_grpo_update():
    """Why a tabular bandit cannot show graph credit moving its roots faster: with keys equal to the
    actions, sum_i A_{i,v} onehot(x_{i,v}) over a group equals GRPO's for every root and every alpha
    (Q(x) averages R over exactly the rollouts that share x, and c_Y = R - V(x1, x2) sums to 0 over
    them). Graph credit changes only the sink's baseline."""
    g = torch.Generator().manual_seed(0)
    G, K = 8, 3
    x1, x2, y = (torch.randint(0, K, (4 * G,), generator=g) for _ in range(3))
    R = torch.randint(0, 3, (4 * G,), generator=g).to(f64) / 2
    b = bandit_batch(x1, x2, y, R, G)
    out, _ = compute_advantages(b, num_tokens=3, mode="outcome")
    for alpha in (t([0., 0.]), t([1., .3])):
        A, _ = compute_advantages(b, num_tokens=3, evidence="group", alpha=alpha)
        for slot, x in ((0, x1), (1, x2)):
            oh = F.one_hot(x, K).to(f64).view(4, G, K)
            close(torch.einsum("ng,ngk->nk", A[:, slot].view(4, G), oh),
                  torch.einsum("ng,ngk->nk", out[:, slot].view(4, G), oh))


def train_rule_bandit(mode, seed, G=8, n_groups=4, K=3, lr=0.5, max_steps=200):
    """X1, X2 pick one of K options (option 0 right); Y picks a label among K; the rule says the label
    is (x1 + x2) mod K. R = [label follows the rule] * (1/4 + 3/4 * share of right upstream options).
    Y's logits: a shared rule-following skill (one parameter for all contexts, as a network shares
    weights) plus a per-context table. Plain REINFORCE with the token advantages as node advantages.
    Returns the first step where P(x1 = 0, x2 = 0, label follows the rule) > 0.9."""
    g = torch.Generator().manual_seed(seed)
    th1, th2, thy, skill = torch.zeros(K, dtype=f64), torch.zeros(K, dtype=f64), torch.zeros(K, K, K, dtype=f64), t(0.)
    rule = F.one_hot((torch.arange(K)[:, None] + torch.arange(K)[None, :]) % K, K).to(f64)  # (K, K, K)
    B = G * n_groups
    for step in range(1, max_steps + 1):
        p1, p2 = th1.softmax(0), th2.softmax(0)
        x1 = torch.multinomial(p1, B, True, generator=g)
        x2 = torch.multinomial(p2, B, True, generator=g)
        py = (thy + skill * rule)[x1, x2].softmax(-1)
        y = torch.multinomial(py, 1, generator=g)[:, 0]
        follow = rule[x1, x2, y]
        R = follow * (0.25 + 0.375 * ((x1 == 0).to(f64) + (x2 == 0).to(f64)))
        A, _ = compute_advantages(bandit_batch(x1, x2, y, R, G), num_tokens=3, mode=mode, evidence="group",
                                  alpha=t([1., 1.]))
        dy = F.one_hot(y, K) - py  # grad of log pi(y) w.r.t. Y's logits
        gy = torch.zeros(K, K, K, dtype=f64).index_put_((x1, x2), A[:, 2:3] * dy, accumulate=True)
        th1 += lr * (A[:, 0:1] * (F.one_hot(x1, K) - p1)).mean(0)
        th2 += lr * (A[:, 1:2] * (F.one_hot(x2, K) - p2)).mean(0)
        thy += lr * gy / B
        skill += lr * (A[:, 2] * (dy * rule[x1, x2]).sum(-1)).mean()
        p_opt = th1.softmax(0)[0] * th2.softmax(0)[0] * ((thy + skill * rule)[0, 0].softmax(-1) * rule[0, 0]).sum()
        if p_opt > 0.9:
            return step
    return max_steps


@pytest.mark.xfail(strict=True, reason="measured: outcome credit reaches the optimum first in this fair bandit "
                   "(mean steps over 8 seeds: outcome 35.6, graph 42.0); DESIGN's V_{i,v} includes rollout i, "
                   "which shrinks the sink's advantage by (1 - 1/n), n = rollouts sharing its parents' content")
def test_bandit_graph_credit_reaches_optimum_before_outcome_credit():
    steps = {m: [train_rule_bandit(m, s) for s in range(8)] for m in ("outcome", "graph")}
    assert sum(steps["graph"]) < sum(steps["outcome"])


def test_bandit_both_credits_reach_optimum():
    for mode in ("outcome", "graph"):
        assert max(train_rule_bandit(mode, s) for s in range(2)) < 100


def test_bandit_meta_controller_raises_alpha_where_keys_hide_a_distinction():
    """X1 picks one of 4 tokens: 0 and 1 are synonyms of the right value (one key), 2 and 3 wrong (one key);
    X2 picks 0 (right) or 1 (wrong), keys exact; 16 groups of 8. Y (label) follows the rule with probability 0.9 after
    token 0 but only 0.5 after the rare synonym 1. R = [x1 right and x2 right and Y follows].

    Argument: X1's own evidence a = Q(key) - V gives tokens 0 and 1 the same credit, so only the downstream
    credit alpha_{X1->Y} * c_Y (c_Y = R - V(keys of X1, X2), higher after token 0) can tell them apart;
    the outcome main loss prefers token 0 (d_t < 0 for it), so dL_main/dalpha_{X1->Y} < 0: alpha rises.
    For X2 -> Y the keys are exact and sum_i c_Y onehot(x2) = 0 in every group, so Eq. 3 carries nothing
    (float noise only) and alpha_{X2->Y} may move only by false gate openings."""
    g = torch.Generator().manual_seed(0)
    G, B, eta = 8, 128, 0.5
    # tabular policy as an output layer: contexts 0 (X1), 1 (X2), 2 + x1 (Y after x1); vocabulary 4.
    # Y's behaviour is fixed (an environment step): its advantage does not depend on alpha (it is the sink).
    # The policy already leans to the right values (an SFT start): P(x1 in {0, 1}) = 0.73, P(x2 = 0) = 0.73
    W = torch.zeros(4, 6, dtype=f64)
    W[0:2, 0] = 1.
    W[0, 1] = 1.
    W[2:, 1] = -30.  # X2 only uses tokens 0 and 1
    ctl = EdgeController(2, 0.5, window=4, z=2.0, step_size=0.05)

    def sample():
        hid = torch.zeros(B, 3, 6, dtype=f64)
        hid[:, 0, 0] = hid[:, 1, 1] = 1.
        tok = torch.zeros(B, 3, dtype=torch.long)
        for slot in (0, 1):
            tok[:, slot] = torch.multinomial(torch.softmax(hid[:, slot] @ W.T, -1), 1, generator=g)[:, 0]
        hid[torch.arange(B), 2, 2 + tok[:, 0]] = 1.
        follow_p = torch.where(tok[:, 0] == 1, 0.5, 0.9).to(f64)
        follows = torch.rand(B, generator=g, dtype=f64) < follow_p
        tok[:, 2] = torch.where(follows, 0, 1 + torch.randint(0, 3, (B,), generator=g))
        R = ((tok[:, 0] <= 1) & (tok[:, 1] == 0) & follows).to(f64)
        key1 = torch.where(tok[:, 0] <= 1, 0, 1)
        b = bandit_batch(key1, tok[:, 1], tok[:, 2], R, G)
        return b, hid, tok

    moves = []
    for _ in range(40):
        b, hid, tok = sample()
        bm, hid_m, tok_m = sample()
        logits_m = (hid_m @ W.T).requires_grad_()
        lp = log_pi(logits_m, tok_m, 1.0)
        L_main = -(outcome_advantages(bm.rewards, G)[:, None] * torch.exp(lp - lp.detach())).mean()
        G_W = output_layer_grad(hid_m, torch.autograd.grad(L_main, logits_m)[0])
        d = output_layer_token_dots(hid, hid @ W.T, tok, G_W, 1.0)
        A, _ = compute_advantages(b, num_tokens=3, evidence="group", alpha=ctl.alpha())
        grad_phi, _ = ctl.gradients(lookahead_alpha_surrogate(A, d, torch.ones_like(d) / d.numel(), eta))
        moves.append(grad_phi.detach())
        ctl.accumulate(grad_phi)
    g_all = torch.stack(moves)
    assert (g_all[:, 0] < 0).float().mean() > 0.75    # X1 -> Y: consistently "raise alpha"
    assert g_all[:, 1].abs().max() < 1e-9 * g_all[:, 0].abs().max()  # X2 -> Y: nothing but float noise
    alpha = ctl.alpha().detach()
    assert alpha[0] >= 0.5 + 5 * 0.05 - 1e-12         # rose in at least 5 of the 10 windows
    assert abs(alpha[1] - 0.5) <= 2 * 0.05 + 1e-12     # at most two false openings


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_compute_advantages_on_every_available_device_and_dtype(device, dtype):
    """The trainer may call this on GPU tensors in float32 with alpha from the CPU float64 controller."""
    b, _ = random_dag_batch(0)
    ctl = EdgeController(b.num_edge_types, 0.7, num_score_kinds=2, learn_weights=True)
    kw = dict(num_tokens=b.num_slots + 3, evidence="both", gate="rule", alpha=ctl.alpha(),
              verifier_weights=ctl.verifier_weights())
    ref, ref_stats = compute_advantages(b, **kw)
    moved = CreditBatch(b.rewards.to(device, dtype), b.group_size, b.present.to(device), b.keys.to(device),
                        b.parents, b.edge_types, b.num_edge_types, b.gate.to(device, dtype), b.spans.to(device),
                        b.parsed.to(device), b.scores.to(device, dtype))
    tok, stats = compute_advantages(moved, **kw)
    assert tok.device.type == device and tok.dtype == dtype
    torch.testing.assert_close(tok.double().cpu(), ref.detach(), atol=1e-5, rtol=1e-5)
    assert stats["credit/key_repeat_rate"] == ref_stats["credit/key_repeat_rate"]
    d = torch.randn(tok.shape, generator=torch.Generator().manual_seed(3), dtype=f64)
    w = torch.ones_like(d) / d.numel()
    gp, gw = ctl.gradients(lookahead_alpha_surrogate(tok, d.to(device, dtype), w.to(device, dtype), 1e-3))
    want_p, want_w = ctl.gradients(lookahead_alpha_surrogate(ref, d, w, 1e-3))  # CPU float64 reference
    assert gp.device.type == "cpu" and gp.dtype == f64 and gw.shape == (2,)
    assert want_p.abs().max() > 0 and want_w.abs().max() > 0
    torch.testing.assert_close(gp, want_p, rtol=1e-4 if dtype == torch.float32 else 1e-12, atol=1e-12)
    torch.testing.assert_close(gw, want_w, rtol=1e-4 if dtype == torch.float32 else 1e-12, atol=1e-12)


# -----------------------------------------------------------------------------
# leave-one-out V (credit.value: leave_one_out), the option the bandit above argues for


def test_leave_one_out_value_hand_numbers():
    """Chain Q -> Y, G = 4, R = [1, 0, 1, 1], Q keys [a, a, b, b].
    include_self: root V = 0.75; a_Q = [0.5 - .75, 0.5 - .75, 1 - .75, 1 - .75]; a_Y = R - mean R over i's Q key
      = [1 - .5, 0 - .5, 1 - 1, 1 - 1].
    leave_one_out: root V_i = mean of the other three = [2/3, 1, 2/3, 2/3]; a_Q = Q - V = [.5 - 2/3, .5 - 1,
      1 - 2/3, 1 - 2/3]; a_Y = R_i - R of the other rollout with i's Q key = [1 - 0, 0 - 1, 1 - 1, 1 - 1]."""
    R = t([1., 0., 1., 1.])
    keys = torch.tensor([[0, 9], [0, 9], [1, 9], [1, 9]])
    present = torch.ones(4, 2, dtype=torch.bool)
    parents = [[], [0]]
    a_self = group_own_evidence(R, keys, present, parents, 4)
    close(a_self, [[-.25, .5], [-.25, -.5], [.25, 0.], [.25, 0.]])
    a_loo = group_own_evidence(R, keys, present, parents, 4, leave_one_out=True)
    close(a_loo, [[.5 - 2 / 3, 1.], [-.5, -1.], [1 / 3, 0.], [1 / 3, 0.]])


def test_leave_one_out_gives_content_every_rollout_shares_a_scaled_outcome_advantage():
    """Why graph credit with the leave-one-out V blames correct steps as often as GRPO (results/LOG.md, "Whose verdicts
    to trust"): a root step written identically in all G = 4 rollouts, R = [1, 0, 0, 0]. include_self (DESIGN's V):
    Q = V = 0.25, a = 0 for every rollout. leave_one_out: Q = 0.25, V_i = mean of the other three = [0, 1/3, 1/3,
    1/3], so a = [0.25, -1/12, -1/12, -1/12] = (R_i - mean of the others) / G: the sign of the GRPO advantage."""
    R = t([1., 0., 0., 0.])
    keys = torch.tensor([[0, 1], [0, 2], [0, 2], [0, 2]])  # slot 0 (the root, not a sink: Y is its child) shared
    present = torch.ones(4, 2, dtype=torch.bool)
    close(group_own_evidence(R, keys, present, [[], [0]], 4)[:, 0], [0., 0., 0., 0.])
    close(group_own_evidence(R, keys, present, [[], [0]], 4, leave_one_out=True)[:, 0], [.25, -1 / 12, -1 / 12, -1 / 12])


def test_value_others_takes_q_from_the_other_rollouts_too():
    """credit.value others: Q_{i,v} over the other rollouts with i's content (R_i where none shares it), V as
    leave_one_out. Root slot 0 of a chain 0 -> 1, G = 4, hand numbers:
    shared by all, R = [1, 0, 0, 0]: Q_i = V_i = mean of the other three -> a = 0 (leave_one_out: .25, -1/12, ...);
    unique contents: Q_i = R_i, V_i = mean of the others [0, 1/3, 1/3, 1/3] -> a = [1, -1/3, -1/3, -1/3];
    keys [a, a, b, b], R = [1, 0, 1, 1]: Q_i = R of the other rollout with i's key = [0, 1, 1, 1],
    V_i = [2/3, 1, 2/3, 2/3] -> a = [-2/3, 0, 1/3, 1/3]. The sink keeps R_i - V."""
    parents, present = [[], [0]], torch.ones(4, 2, dtype=torch.bool)
    ev = lambda R, k0: group_own_evidence(t(R), torch.tensor([[k, 7] for k in k0]), present, parents, 4,  # noqa: E731
                                          leave_one_out=True, q_others=True)
    close(ev([1., 0., 0., 0.], [0, 0, 0, 0])[:, 0], [0., 0., 0., 0.])
    close(ev([1., 0., 0., 0.], [0, 1, 2, 3])[:, 0], [1., -1 / 3, -1 / 3, -1 / 3])
    a = ev([1., 0., 1., 1.], [0, 0, 1, 1])
    close(a[:, 0], [-2 / 3, 0., 1 / 3, 1 / 3])
    close(a[:, 1], group_own_evidence(t([1., 0., 1., 1.]), torch.tensor([[0, 7], [0, 7], [1, 7], [1, 7]]), present,
                                      parents, 4, leave_one_out=True)[:, 1])


def test_leave_one_out_falls_back_to_the_other_rollouts_when_parent_content_is_unique():
    """Q keys [a, b, c, c], R = [1, 0, 1, 0]: rollout 0's Q content is unique, so include_self gives its Y
    credit R_0 - R_0 = 0 (the outcome is thrown away); leave_one_out uses the other three: 1 - 1/3."""
    R = t([1., 0., 1., 0.])
    keys = torch.tensor([[0, 9], [1, 9], [2, 9], [2, 9]])
    present = torch.ones(4, 2, dtype=torch.bool)
    assert group_own_evidence(R, keys, present, [[], [0]], 4)[0, 1].item() == 0.0
    assert group_own_evidence(R, keys, present, [[], [0]], 4, leave_one_out=True)[0, 1].item() == pytest.approx(2 / 3)


def test_bandit_graph_credit_with_leave_one_out_value_beats_outcome():
    """The same fair bandit as the xfail above, measured (8 seeds): steps to P(optimum) > 0.9 are outcome
    35.6, outcome at the RLOO scale (lr x 8/7) 31.6, graph with DESIGN's V 42.0, graph with the leave-one-out
    V 23.5, faster on every seed. Asserted: graph-LOO beats outcome at both scales on every seed."""
    import credit as C
    orig = C.compute_advantages

    def loo(batch, **kw):
        return orig(batch, **kw, value="leave_one_out") if kw.get("mode", "graph") == "graph" else orig(batch, **kw)

    g = {}
    for s in range(8):
        globals()["compute_advantages"] = loo
        try:
            g[s] = train_rule_bandit("graph", s)
        finally:
            globals()["compute_advantages"] = orig
        assert g[s] < train_rule_bandit("outcome", s) and g[s] < train_rule_bandit("outcome", s, lr=0.5 * 8 / 7)


# -----------------------------------------------------------------------------
# the alignment objective (controller.objective: alignment): J(alpha) = <G_W, Delta_W> / |Delta_W|


def alignment_toy(seed=0, B=6, T=5, V=7, H=4):
    """Token advantages affine in alpha (two edge types), a tabular-ish output layer: Delta_W(alpha) is
    a + alpha_0 b_0 + alpha_1 b_1, so the alignment optimum is known when G_W = -(a + alpha* . b)."""
    g = torch.Generator().manual_seed(seed)
    A0, A1, A2 = (torch.randn(B, T, generator=g, dtype=f64) for _ in range(3))
    h = torch.randn(B, T, H, generator=g, dtype=f64)
    W = torch.randn(V, H, generator=g, dtype=f64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    w = torch.ones(B, T, dtype=f64) / (B * T)
    return dict(A=lambda a: A0 + a[0] * A1 + a[1] * A2, h=h, logits=h @ W.T, tokens=tokens, w=w, V=V, g=g)


def update_W(toy, alpha, temp=1.0):
    """Delta_W = sum_t w_t A_t grad_W log pi(o_t) (the SGD update direction of L_graph = -sum w A log pi)."""
    p = torch.softmax(toy["logits"] / temp, -1)
    P = F.one_hot(toy["tokens"], toy["V"]).to(f64) - p
    return torch.einsum("btv,bt,bth->vh", P, toy["w"] * toy["A"](alpha), toy["h"]) / temp


def test_alignment_dots_give_the_gradient_of_the_normalised_gain():
    toy = alignment_toy()
    G = torch.randn(toy["V"], 4, generator=toy["g"], dtype=f64)
    alpha, h = t([0.7, 1.3]), 1e-6
    J = lambda a: (G * update_W(toy, a, 0.8)).sum() / update_W(toy, a, 0.8).norm()  # noqa: E731
    fd = torch.stack([(J(alpha + h * e) - J(alpha - h * e)) / (2 * h) for e in torch.eye(2, dtype=f64)])
    a = alpha.clone().requires_grad_()
    d = alignment_token_dots(toy["h"], toy["logits"], toy["tokens"], G, update_W(toy, alpha, 0.8), 0.8)
    got = torch.autograd.grad(lookahead_alpha_surrogate(toy["A"](a), d, toy["w"], 1.0), a)[0]
    close(got, fd, atol=1e-7, rtol=1e-6)
    # scale-free: advantages times 3 leave J and its gradient's direction unchanged
    assert J(alpha).item() == pytest.approx(((G * update_W(toy, alpha, 0.8) * 3).sum() / (3 * update_W(toy, alpha, 0.8)).norm()).item())


@pytest.mark.parametrize("rule", ["window", "sequential"])
def test_alignment_controller_approaches_the_known_best_alpha_where_eq3_runs_to_the_bound(rule):
    """Main-loss gradient G_W = -Delta_W(alpha*) + noise (as large as the signal), alpha* = (0.4, 1.2), fresh noise
    each step: the alignment objective's expected optimum is alpha*. The gated sign controller (window 4, z 2,
    step 0.1) on it ends within a third of its starting distance from alpha* on most of 6 seeds, from either end
    of [0, 2]; Eq. 3's look-ahead, which rewards a longer step, ends at the bounds."""
    star = t([0.4, 1.2])

    def run(objective, start, seed):
        toy = alignment_toy(seed)
        target = -update_W(toy, star)
        ctl = EdgeController(2, start, alpha_min=0.0, alpha_max=2.0, window=4, z=2.0, step_size=0.1, rule=rule)
        g = torch.Generator().manual_seed(100 + seed)
        for _ in range(200):
            G = target + target.norm() * torch.randn(target.shape, generator=g, dtype=f64) / target.numel() ** 0.5
            a = ctl.alpha()
            d = (alignment_token_dots(toy["h"], toy["logits"], toy["tokens"], G, update_W(toy, a.detach()))
                 if objective == "alignment" else output_layer_token_dots(toy["h"], toy["logits"], toy["tokens"], G))
            ctl.accumulate(ctl.gradients(lookahead_alpha_surrogate(toy["A"](a), d, toy["w"], 1.0))[0])
        return ctl.alpha().detach()

    for start in (0.0, 2.0):
        far = (t([start, start]) - star).abs().max()
        ends = [run("alignment", start, seed) for seed in range(6)]
        assert sum(bool((e - star).abs().max() <= far / 3) for e in ends) >= 5, (start, ends)
    ends = [run("lookahead", 0.0, seed) for seed in range(6)]
    assert sum(bool(((e == 0) | (e == 2)).all() and (e == 2).any()) for e in ends) >= 5, ends


def test_per_node_scale_is_a_z_score_over_the_rollouts_that_have_the_node():
    """credit.scale node (DESIGN 0.1): per node, (c - mean) / (std + eps) over the group's rollouts that have it
    (unbiased std), 0 where absent. Hand numbers, G = 4, one group, two nodes:
    node 0: c = 0.30, 0.30, 0.30, 0.28 (a tiny spread around a nonzero mean), all present: mean 0.295, std 0.01
            -> 0.5, 0.5, 0.5, -1.5 (bounded; dividing c by the std alone gave 30, 30, 30, 28);
    node 1: c = 1, 2, 3, 9 with the last absent: mean 2, std 1 -> -1, 0, 1, 0."""
    c = t([[0.30, 1.0], [0.30, 2.0], [0.30, 3.0], [0.28, 9.0]])
    present = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    A = node_advantages(c, t([1., 0., 0., 1.]), 4, "node", 0.0, present)
    torch.testing.assert_close(A, t([[0.5, -1.0], [0.5, 0.0], [0.5, 1.0], [-1.5, 0.0]]), atol=1e-9, rtol=0)
    # a constant node and a node in one rollout only: no spread to normalise by, so 0
    A = node_advantages(t([[0.4, 0.7], [0.4, 0.0]]), t([1., 0.]), 2, "node", 0.0,
                        torch.tensor([[1, 1], [1, 0]], dtype=torch.bool))
    torch.testing.assert_close(A, torch.zeros(2, 2, dtype=torch.float64), atol=0, rtol=0)
