"""Graph-GRPO: GRPO with node-level credit over the reasoning graph of a relevance CoT.

    python graph_grpo.py configs/base.yaml                                  # one process (CPU or one GPU)
    python graph_grpo.py configs/base.yaml --credit.mode=graph --controller.mode=meta
    torchrun --nproc_per_node=2 graph_grpo.py configs/base.yaml             # CPU, gloo
    torchrun --nproc_per_node=8 graph_grpo.py configs/base.yaml             # one node, 8 GPUs, nccl

If the SFT checkpoint (rl.init_from, default <out_dir>/sft/checkpoint) does not exist, the SFT stage of
sft_mask.py runs first. A run directory that holds a checkpoint is resumed (--no-resume starts over).

The file reads in the order of the method (DESIGN.md §3, §6, §7):
  1. rollouts     G samples per prompt (policy.sample: shared prompt KV cache, finished rows dropped)
  2. rewards      outcome reward + format penalty + faithfulness (§3); garbage scores the penalty, never raises
  3. credit       credit.compute_advantages -> one (B, T) token-advantage tensor (§4, Eq. 1-2)
  4. loss         clipped-ratio policy loss + k3 KL, three aggregations (§6)
  5. controller   Eq. 3 meta-gradient for the edge coefficients alpha (§5)
  6. train loop   DDP, micro-batching, checkpoints, resume, metrics (§7)
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import credit
import data
import policy
from config import parse_args, save_config

# ----------------------------------------------------------------------------------------------------------
# 1. Rollouts


@dataclass
class Rollouts:
    """B = n_prompts * G sampled completions, group-contiguous, as padded tensors plus parses.

    input_ids / attention_mask: (B, P + T) [left pad][prompt][completion][right pad]; completion columns are
    P..P+T. completion_mask: (B, T). old_logp: (B, T) log pi_old at the sampling temperature (num_iterations > 1
    only). rewards: (B,). adv: (B, T) token advantages. Everything the loss and the controller need.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_len: int
    rewards: torch.Tensor
    adv: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    group_size: int = 1
    """G when the rows are whole groups (rows g*G .. g*G+G-1 share prompt g): each prompt's forward runs once"""

    @property
    def completion_ids(self) -> torch.Tensor:  # (B, T)
        return self.input_ids[:, self.prompt_len:]

    def rows(self, idx: slice | torch.Tensor, group_size: int = 1) -> "Rollouts":
        """A subset of rows; group_size: G when `idx` selects whole groups in order, else 1."""
        cut = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollouts(self.input_ids[idx], self.attention_mask[idx], self.completion_mask[idx], self.prompt_len,
                        self.rewards[idx], self.adv[idx], cut(self.old_logp), cut(self.ref_logp), group_size)

    def trimmed(self) -> "Rollouts":
        """These rows without the columns that are padding in every row: leading prompt columns (left pad) and
        trailing completion columns (right pad); the kept completion columns are the first ones of the (B, T)
        tensors. Padding has no effect on the loss: only work is saved."""
        lead = int((self.attention_mask.long().cumsum(1) == 0).all(0).sum())  # columns all-pad from the left
        lead = min(lead, self.prompt_len - 1)                                 # keep one prompt column
        used = self.completion_mask.any(0).nonzero()
        T = int(used[-1]) + 1 if len(used) else 1
        P = self.prompt_len
        cut = lambda t: None if t is None else t[:, :T]  # noqa: E731
        return Rollouts(self.input_ids[:, lead:P + T], self.attention_mask[:, lead:P + T], self.completion_mask[:, :T],
                        P - lead, self.rewards, self.adv[:, :T], cut(self.old_logp), cut(self.ref_logp), self.group_size)

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("input_ids", "attention_mask", "completion_mask", "prompt_len",
                                               "rewards", "adv", "old_logp", "ref_logp", "group_size")}


# ----------------------------------------------------------------------------------------------------------
# 2. Rewards (DESIGN §3)

def outcome_reward(parsed: data.ParsedCoT, gold: int, num_labels: int, kind: str, format_penalty: float,
                   require_consistent: bool) -> float:
    """R_i: 1 if the parsed label equals the gold label, else 0 ('graded': 1 - |y_hat - y| / (L - 1)).

    A completion that does not parse scores the format penalty. Faithfulness (require_consistent): a label
    that does not follow from the rollout's own facet verdicts under the business rule counts as no label.
    """
    if not parsed.valid or parsed.label is None or (require_consistent and not parsed.consistent):
        return format_penalty
    if kind == "graded":
        return 1.0 - abs(parsed.label - gold) / (num_labels - 1)
    return float(parsed.label == gold)


def credit_batch(parses: list[data.ParsedCoT], rewards: torch.Tensor, G: int, schema: data.GraphSchema,
                 completion_len: int, verifier: list[dict] | None, with_values: bool) -> credit.CreditBatch:
    """Parsed rollouts -> the tensors credit.py consumes: node presence, canonical keys (ids that repeat
    within a group, DESIGN §4), instance gates from the label rule, node spans, verifier scores."""
    slots = schema.slots
    B, N = len(parses), len(slots)
    parents, etypes = schema.parents()
    present = torch.zeros(B, N, dtype=torch.bool)
    keys = torch.zeros(B, N, dtype=torch.long)
    gate = torch.ones(B, N, N)
    spans = torch.full((B, N, 2), -1, dtype=torch.long)
    scores = torch.full((B, N, len(data.SCORE_KINDS)), float("nan")) if verifier is not None else None
    key_ids: dict = {}
    y = slots.index("y")
    for i, p in enumerate(parses):
        k = data.node_keys(p, with_values=with_values)
        dep = data.label_dependence(p.verdicts, schema.label_rule) if p.verdicts else {}
        for v, name in enumerate(slots):
            if name not in k:
                continue
            present[i, v] = True
            keys[i, v] = key_ids.setdefault((name, k[name]), len(key_ids))
            spans[i, v, 0], spans[i, v, 1] = p.nodes[name].start, p.nodes[name].end
            if name.startswith("f:") and not dep.get(name[2:], True):
                gate[i, v, y] = 0.0
            if verifier is not None and name in verifier[i]:
                scores[i, v] = torch.tensor(verifier[i][name])
    spans = spans.clamp(max=completion_len)
    return credit.CreditBatch(rewards=rewards, group_size=G, present=present, keys=keys, parents=parents,
                              edge_types=etypes, num_edge_types=len(schema.edge_kinds), gate=gate, spans=spans,
                              parsed=torch.tensor([p.valid for p in parses]), scores=scores)


# ----------------------------------------------------------------------------------------------------------
# 4. Policy loss (DESIGN §6)

def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0 (unclamped, as TRL)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_policy_term(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float,
                        eps_high: float) -> tuple[torch.Tensor, dict]:
    """-min(w A, clip(w, 1 - eps_low, 1 + eps_high) A) per token, w = exp(logp - old_logp) (DESIGN §6).
    No log-ratio clamp (as TRL; verl/OpenRLHF clamp at +-20). Also the clip indicators TRL logs."""
    w = torch.exp(logp - old_logp)
    term = -torch.min(w * adv, torch.clamp(w, 1 - eps_low, 1 + eps_high) * adv)
    low = (w < 1 - eps_low) & (adv < 0)
    high = (w > 1 + eps_high) & (adv > 0)
    return term, {"low": low, "high": high}


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, n_tokens: float, n_seqs: float,
                   max_len: int) -> torch.Tensor:
    """Sum-form of the three aggregations, divided by GLOBAL counts (the whole step's batch over all ranks and
    micro-batches), so that summing micro-batch losses gives the full-batch loss exactly (DESIGN §6):
      token_mean               sum_t l / N_tokens                     (TRL 'dapo', verl/OpenRLHF default)
      seq_mean_token_mean      sum_i (mean_t l_i) / N_seqs            (original GRPO)
      seq_mean_token_sum_norm  sum_i (sum_t l_i / max_len) / N_seqs   (Dr. GRPO)
    per_token, mask: (B, T)."""
    masked = per_token * mask
    if aggregation == "token_mean":
        return masked.sum() / max(n_tokens, 1.0)
    if aggregation == "seq_mean_token_mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / max(n_seqs, 1.0)
    if aggregation == "seq_mean_token_sum_norm":
        return (masked.sum(1) / max_len).sum() / max(n_seqs, 1.0)
    raise ValueError(f"rl.aggregation: unknown {aggregation!r}")


def grpo_loss(logp, old_logp, adv, mask, rl, n_tokens, n_seqs, ref_logp=None) -> tuple[torch.Tensor, dict]:
    """DESIGN §6: l_t = -min(w A_t, clip(w) A_t) + beta * KL3_t, aggregated. All tensors (B, T)."""
    term, clip = clipped_policy_term(logp, old_logp, adv, rl.eps_low, rl.eps_high)
    kl = kl_k3(logp, ref_logp) if (rl.beta > 0 and ref_logp is not None) else torch.zeros_like(logp)
    per_token = term + rl.beta * kl
    loss = aggregate_loss(per_token, mask, rl.aggregation, n_tokens, n_seqs, rl.max_new_tokens)
    m = mask.float()
    sums = {"kl": (kl.detach() * m).sum(), "clip_ratio/low_mean": (clip["low"] * m).sum(),
            "clip_ratio/high_mean": (clip["high"] * m).sum(),
            "clip_ratio/region_mean": ((clip["low"] | clip["high"]) * m).sum()}
    return loss, sums


# ----------------------------------------------------------------------------------------------------------
# 6. Training loop plumbing: distributed setup, checkpoints


def setup_distributed(device_cfg: str):
    """RANK in the environment means torchrun. Returns (rank, world, local_rank, device)."""
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device = policy.resolve_device(device_cfg, local_rank=local)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=int(os.environ.get("GG_DIST_TIMEOUT", 600))))
        return rank, world, local, device
    return 0, 1, 0, policy.resolve_device(device_cfg)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity without torch.distributed); nccl needs the tensor on the rank's GPU."""
    if dist.is_available() and dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        x = t.to(dev)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)
    return t


def checkpoint_dirs(out_dir: str) -> list[str]:
    """Complete periodic checkpoints, oldest first (a directory is complete once renamed from *.tmp)."""
    return sorted(d for d in glob.glob(os.path.join(out_dir, "checkpoints", "step_*")) if not d.endswith(".tmp"))


def save_checkpoint(out_dir: str, step: int, model, tokenizer, state: dict, keep_last: int) -> str:
    """Atomic: write into step_XXXXXX.tmp, then rename; a killed write leaves no complete-looking directory."""
    final = os.path.join(out_dir, "checkpoints", f"step_{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_policy(model, tokenizer, tmp)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def truncate_log(path: str, start: int) -> None:
    """Keep the JSON lines of steps before `start` (atomically); a torn last line of a killed run goes too."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < start:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])


def credit_scales(credit_cfg) -> tuple[str, str]:
    """credit.scale -> (node scale of Eq. 2, outcome scale). 'group' is Eq. 2's group_outcome: one scale per
    group, the same std for node and outcome advantages."""
    s = credit_cfg.scale
    if credit_cfg.mode in ("outcome", "rule_shaped"):
        if s == "node":
            raise ValueError("credit.scale = node needs credit.mode = graph")
        return "group_outcome", s
    if s == "batch":
        raise ValueError("credit.scale = batch is for credit.mode = outcome (Eq. 2 has one scale per group)")
    return {"group": "group_outcome", "node": "node", "none": "none"}[s], ("none" if s == "none" else "group")


def make_controller(cfg, num_edge_types: int, world: int) -> credit.EdgeController:
    """Eq. 3 controller; 'fixed' outside graph mode. Its phi gradient is averaged over ranks (DESIGN §5)."""
    c = cfg.credit
    step_rewards = c.mode in ("process", "stepwise")   # the independent step-reward baselines: alpha = 0
    uses_scores = step_rewards or (c.mode == "graph" and c.evidence in ("verifier", "both"))
    # alpha only acts through Eq. 1b: outside graph mode, and for the 'baseline' form, there is nothing to learn
    mode = cfg.controller.mode if (c.mode == "graph" and c.evidence != "baseline") else "fixed"
    alpha_init = 0.0 if step_rewards else c.alpha_init
    return credit.EdgeController(num_edge_types, alpha_init, alpha_min=min(c.alpha_min, alpha_init),
                                 alpha_max=c.alpha_max, mode=mode,
                                 window=cfg.controller.accumulate, z=cfg.controller.snr_z,
                                 step_size=cfg.controller.step_size, num_score_kinds=len(data.SCORE_KINDS) if uses_scores else 0,
                                 weight_init=list(c.verifier_weights), weight_max=c.verifier_weight_max,
                                 learn_weights=cfg.controller.learn_weights and uses_scores,
                                 reduce_fn=lambda t: all_reduce_sum(t) / world)


def lr_at(step: int, rl) -> float:
    """Constant learning rate after a linear warm-up; a function of the step alone, so resume needs no state."""
    return rl.lr * min(1.0, (step + 1) / rl.warmup) if rl.warmup > 0 else rl.lr


def step_prompt_indices(step: int, rank: int, world: int, per_rank: int, pool: int, seed: int,
                        allowed: list[int] | None = None) -> list[int]:
    """Prompts of (step, rank): a fresh seeded permutation of the RL pool (or of its `allowed` subset, a
    curriculum stage) per epoch, consumed in order. A pure function of the step, so the data position needs no
    state on resume and every rank owns whole groups."""
    items = list(range(pool)) if allowed is None else allowed
    perms: dict[int, list[int]] = {}  # one shuffle per epoch this step touches (at most two), not one per prompt
    out = []
    for j in range(per_rank):
        g = (step * world + rank) * per_rank + j
        epoch, pos = divmod(g, len(items))
        if epoch not in perms:
            perms[epoch] = random.Random(seed * 7919 + epoch).sample(items, len(items))
        out.append(perms[epoch][pos])
    return out


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """Sampling noise differs per step and rank; init seeds (model, data order) do not depend on the rank."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def validate_rl_config(cfg, world: int) -> None:
    rl = cfg.rl
    if rl.num_generations < 2:
        raise ValueError(f"rl.num_generations = {rl.num_generations}: a group needs >= 2 samples for a baseline")
    if rl.prompts_per_step % world:
        raise ValueError(f"rl.prompts_per_step = {rl.prompts_per_step} is not divisible by the world size {world}")
    if rl.num_iterations < 1:
        raise ValueError(f"rl.num_iterations = {rl.num_iterations}: must be >= 1")


def local_node_scores(parses, golds, schema, catalogue, source: str) -> list[dict]:
    """s_{i,v} per node (DESIGN §3): 'verifier' -> (grounding, comparator) from the heuristic verifiers; 'gold' ->
    gold node correctness in the comparator slot where the example is annotated, the verifiers elsewhere."""
    out = []
    for p, ex in zip(parses, golds):
        s = data.verifier_scores(p, ex.query, ex.product, catalogue.head_compare, schema)
        if source == "gold":
            for name in s:
                right = data.node_is_correct(name, p, ex, schema)
                if right is not None:
                    s[name] = (float("nan"), float(right))
        out.append(s)
    return out


def shaped_rewards(rewards: torch.Tensor, parses, scores: list[dict], weights) -> torch.Tensor:
    """TaoSR-AGRL rule-aware shaping (DESIGN §8): R + w_rule * [label follows the rule from the rollout's own
    verdicts] + w_ground * mean grounding score of its nodes. One sequence-level reward per rollout."""
    w_rule, w_ground = weights
    extra = []
    for p, s in zip(parses, scores):
        ground = [v[0] for v in s.values() if v[0] == v[0]]  # NaN != NaN
        extra.append(w_rule * float(p.consistent) + w_ground * (sum(ground) / len(ground) if ground else 0.0))
    return rewards + torch.tensor(extra)


def guided_replay(completions: list, examples, rewards: torch.Tensor, G: int, threshold: float, k: int,
                  tokenizer, schema, strict: bool) -> int:
    """TaoSR-AGRL adaptive guided replay (DESIGN §8): in each group whose mean reward is at or below `threshold`,
    the last k rollouts are replaced in place by the gold CoT (treated as sampled; with num_iterations = 1 its
    ratio is 1). Examples without a gold CoT are left alone. Returns the number of groups replayed."""
    n = 0
    for g, ex in enumerate(examples):
        if ex.cot is None or rewards[g * G:(g + 1) * G].mean().item() > threshold:
            continue
        gold = policy.encode(tokenizer, data.serialize_cot(ex.cot, schema), strict) + [tokenizer.eos_token_id]
        for i in range((g + 1) * G - k, (g + 1) * G):
            completions[i] = list(gold)
        n += 1
    return n


def make_rollouts(model, tokenizer, vocab, schema, examples, prompt_ids, cfg, seed, catalogue) -> tuple:
    """Sample G completions per prompt, score them and build the credit tensors (sections 1-3)."""
    rl, G = cfg.rl, cfg.rl.num_generations
    strict = cfg.data.source == "synthetic"
    completions = policy.sample(model, prompt_ids, G, rl.max_new_tokens, rl.temperature, tokenizer.eos_token_id,
                                tokenizer.pad_token_id, seed=seed)
    golds = [ex for ex in examples for _ in range(G)]

    def score(completions):
        parses = [data.parse_completion(c, vocab, schema) for c in completions]
        rewards = torch.tensor([outcome_reward(p, ex.label, len(schema.label_names), cfg.reward.kind,
                                               cfg.reward.format_penalty, cfg.reward.require_consistent)
                                for p, ex in zip(parses, golds)])
        return parses, rewards

    parses, rewards = score(completions)
    n_replayed = 0
    if rl.guided_replay:
        n_replayed = guided_replay(completions, examples, rewards, G, rl.replay_threshold, rl.replay_k, tokenizer,
                                   schema, strict)
        if n_replayed:
            parses, rewards = score(completions)
    mode = cfg.credit.mode
    need_scores = mode in ("process", "stepwise", "rule_shaped") or (mode == "graph" and cfg.credit.evidence in ("verifier", "both"))
    source = "gold" if (mode == "stepwise" or cfg.reward.local_scores == "gold") else "verifier"
    scores = local_node_scores(parses, golds, schema, catalogue, source) if need_scores else None
    if mode == "rule_shaped":
        rewards = shaped_rewards(rewards, parses, scores, cfg.reward.shaping_weights)
    input_ids, attn, comp_full = policy.build_sequences(prompt_ids, completions, tokenizer.pad_token_id, model.device)
    T = max(len(c) for c in completions)
    P = input_ids.shape[1] - T
    ro = Rollouts(input_ids, attn, comp_full[:, P:].float(), P, rewards.to(model.device), torch.zeros(len(completions), T),
                  group_size=G)
    return completions, parses, rewards, scores, ro, n_replayed


def credit_kwargs(credit_cfg) -> dict:
    """credit.mode -> the arguments of credit.compute_advantages (DESIGN §8: every baseline is a setting of one
    machinery). outcome / rule_shaped: outcome advantage on every token (rule_shaped changes R itself);
    process / stepwise: verifier (or gold) evidence with alpha = 0, the independent step-reward baseline;
    graph: Graph-GRPO with the configured evidence, gate and scale."""
    node_scale, outcome_scale = credit_scales(credit_cfg)
    kw = dict(scale=node_scale, outcome_scale=outcome_scale, eps=credit_cfg.eps, gate=credit_cfg.gate)
    if credit_cfg.mode in ("outcome", "rule_shaped"):
        return dict(kw, mode="outcome")
    if credit_cfg.mode in ("process", "stepwise"):
        return dict(kw, mode="graph", evidence="verifier")
    return dict(kw, mode="graph", evidence=credit_cfg.evidence, value=credit_cfg.value)


def duplicate_groups(examples) -> torch.Tensor:
    """(n_groups,) bool: the prompt repeats an earlier prompt of the step (TaoSR-SHE diversified filtering; our
    reading: near-duplicate = the same bag of query and product words)."""
    seen, out = set(), []
    for ex in examples:
        key = (frozenset(ex.query.split()), frozenset(ex.product.split()))
        out.append(key in seen)
        seen.add(key)
    return torch.tensor(out)


def curriculum_stage_of(pool, sft_examples, stages: int) -> list[int]:
    """Difficulty stage (0 = easiest) of every RL-pool example for TaoSR-SHE's multi-stage curriculum: the
    number of its words that occur fewer than 3 times in the SFT split (a label-free long-tail measure),
    cut into `stages` quantile bins."""
    from collections import Counter
    counts = Counter(w for ex in sft_examples for w in (ex.query + " " + ex.product).split())
    rare = [sum(counts[w] < 3 for w in (ex.query + " " + ex.product).split()) for ex in pool]
    order = sorted(range(len(pool)), key=lambda i: (rare[i], i))
    stage = [0] * len(pool)
    for rank, i in enumerate(order):
        stage[i] = rank * stages // len(pool)
    return stage


def train(cfg) -> str:
    rank, world, local, device = setup_distributed(cfg.run.device)
    master = rank == 0
    torch.set_num_threads(cfg.run.num_threads or max(1, (os.cpu_count() or 1) // world))
    validate_rl_config(cfg, world)
    out_dir, rl, G = cfg.run.out_dir, cfg.rl, cfg.rl.num_generations
    init_from = cfg.rl.init_from or os.path.join(out_dir, "sft", "checkpoint")
    if not os.path.isdir(init_from):
        if cfg.rl.init_from:
            raise FileNotFoundError(f"rl.init_from: no checkpoint directory at {init_from}")
        if master:
            print(f"no SFT checkpoint at {init_from}: running the SFT stage first (sft_mask.py)")
            import sft_mask
            sft_mask.run_sft(cfg, os.path.join(out_dir, "sft"))
        if world > 1:
            dist.barrier()
    torch.manual_seed(cfg.run.seed)
    schema, splits = data.load_splits(cfg)
    pool = splits["rl"]
    stage_of = curriculum_stage_of(pool, splits["sft"], cfg.rl.curriculum_stages) \
        if cfg.credit.mode == "stepwise" and cfg.rl.curriculum_stages > 1 else None
    strict = cfg.data.source == "synthetic"
    ckpts = checkpoint_dirs(out_dir) if cfg.run.resume else []
    load_dir = ckpts[-1] if ckpts else init_from
    dtype = policy.resolve_dtype(cfg.run.dtype, device)
    model, tokenizer = policy.load_policy(load_dir, data.vocabulary(schema), dtype=dtype, device=device)
    ref_model = None
    if rl.beta > 0:  # frozen copy of the SFT policy (DESIGN §7)
        ref_model, _ = policy.load_policy(init_from, data.vocabulary(schema), dtype=dtype, device=device)
        ref_model.eval().requires_grad_(False)
    vocab = data.TagVocab.from_tokenizer(tokenizer, schema)
    catalogue = data.catalogue_of(cfg.data)
    opt = torch.optim.AdamW(model.parameters(), lr=rl.lr, weight_decay=rl.weight_decay)
    controller = make_controller(cfg, len(schema.edge_kinds), world)
    start, main_batch, next_grad_W, bad_in_row = 0, None, None, 0
    if ckpts:
        state = torch.load(os.path.join(load_dir, "trainer_state.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        controller.load_state_dict(state["controller"])
        start, bad_in_row = state["step"], state["bad_in_row"]
        main_batch = Rollouts(**state["main_batch"]) if state["main_batch"] else None
        next_grad_W = state.get("next_grad_W")
        set_rng_state(state["rng"])
        if master:
            print(f"resuming from {load_dir} at step {start}")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    per_rank = rl.prompts_per_step // world
    prompt_cache: dict[int, list[int]] = {}
    if master:  # a resumed run rewrites the steps after its checkpoint: drop their lines from the killed run
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_log(os.path.join(out_dir, name), start)
    metrics_f = open(os.path.join(out_dir, "metrics.jsonl"), "a") if master else None
    samples_f = open(os.path.join(out_dir, "samples.jsonl"), "a") if master else None
    start_eval = drift_eval(model, tokenizer, schema, splits, cfg, device, master, world) \
        if rl.eval_every and start == 0 else {}
    bar = tqdm(range(start, rl.steps), desc="rl", disable=not master, initial=start, total=rl.steps)
    for step in bar:
        t0 = time.time()
        # ---- 1-3. rollouts, rewards, credit
        allowed = None
        if stage_of is not None:  # TaoSR-SHE curriculum: stage k covers the k+1 easiest difficulty bins
            k = min(step * rl.curriculum_stages // rl.steps, rl.curriculum_stages - 1)
            allowed = [i for i, s in enumerate(stage_of) if s <= k]
        idx = step_prompt_indices(step, rank, world, per_rank, len(pool), cfg.run.seed, allowed)
        exs = [pool[i] for i in idx]
        prompt_ids = [prompt_cache.setdefault(i, policy.encode(tokenizer, data.format_prompt(pool[i].query, pool[i].product), strict))
                      for i in idx]
        with policy.autocast(cfg.run.dtype, device):
            completions, parses, rewards, scores, ro, n_replayed = make_rollouts(
                model, tokenizer, vocab, schema, exs, prompt_ids, cfg, sampling_seed(cfg.run.seed, step, rank), catalogue)
        timing = {"rollout": time.time() - t0}
        tic = time.time()
        cb = credit_batch(parses, rewards, G, schema, ro.completion_mask.shape[1], scores, with_values=False)
        adv_graph, cstats = credit.compute_advantages(cb, num_tokens=ro.completion_mask.shape[1],
                                                      alpha=controller.alpha(),
                                                      verifier_weights=controller.verifier_weights(),
                                                      **credit_kwargs(cfg.credit))
        ro.adv = adv_graph.detach().float().to(device)
        keep = torch.ones(len(completions))
        zero_std = credit.zero_std_groups(rewards, G)
        if rl.drop_zero_std or cfg.credit.mode == "stepwise":  # stepwise: diversified filtering too
            drop = zero_std | (duplicate_groups(exs) if cfg.credit.mode == "stepwise" else torch.zeros_like(zero_std))
            keep = (~drop).repeat_interleave(G).float()
        mask = ro.completion_mask * keep.to(device)[:, None]
        counts = all_reduce_sum(torch.tensor([mask.sum().item(), keep.sum().item()], dtype=torch.float64))
        n_tokens, n_seqs = float(counts[0]), float(counts[1])
        timing["credit"] = time.time() - tic
        tic = time.time()
        with torch.no_grad(), policy.autocast(cfg.run.dtype, device):
            if rl.num_iterations > 1:
                ro.old_logp = logprobs_of(model, ro, rl.temperature).logprobs
            if ref_model is not None:
                ro.ref_logp = logprobs_of(ref_model, ro, rl.temperature).logprobs
        timing["update"] = time.time() - tic
        tic = time.time()
        grad_W, out_adv = None, None
        if controller.mode == "meta":
            out_adv = credit.outcome_advantages(rewards, G, "group", cfg.credit.eps).to(device)[:, None].expand_as(ro.adv)
            if cfg.controller.reuse_forward and cfg.controller.main_batch == "previous" and next_grad_W is not None:
                grad_W = next_grad_W   # from the previous step's update forward, at its pre-update parameters
            else:
                held_out = main_batch if (main_batch is not None and cfg.controller.main_batch == "previous") else ro
                with policy.autocast(cfg.run.dtype, device):
                    grad_W = main_loss_output_grad(model, held_out, cfg)
        timing["controller"] = time.time() - tic
        # ---- 4. update: num_iterations passes over the step's rollouts, micro-batched, DDP-synced on the last
        tic = time.time()
        d_tok = torch.zeros_like(ro.adv) if grad_W is not None else None
        lr = lr_at(step, rl)
        for g in opt.param_groups:
            g["lr"] = lr
        skipped = False
        for it in range(rl.num_iterations):
            opt.zero_grad(set_to_none=True)
            reuse = it == 0 and out_adv is not None and cfg.controller.reuse_forward
            with policy.autocast(cfg.run.dtype, device):
                it_sums, fwd_grad_W = accumulate_policy_gradient(ddp_model, ro, mask, rl, n_tokens, n_seqs, world,
                                                                 grad_W=grad_W if it == 0 else None, d_out=d_tok,
                                                                 main_adv=out_adv if reuse else None)
            if reuse:
                next_grad_W = fwd_grad_W
            if it == 0:
                sums = it_sums
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), rl.grad_clip)
            bad = all_reduce_sum(torch.tensor([float(not torch.isfinite(grad_norm))]))
            if bad.item() > 0:  # every rank skips together: the collectives stay in step
                skipped = True
                opt.zero_grad(set_to_none=True)
                break
            opt.step()
        timing["update"] += time.time() - tic
        bad_in_row = bad_in_row + 1 if skipped else 0
        if bad_in_row >= rl.max_bad_steps:
            raise RuntimeError(f"non-finite loss or gradient in {bad_in_row} steps in a row (step {step}); "
                               f"lower rl.lr or check the data")
        # ---- 5. controller (Eq. 3): d alpha from the look-ahead main loss
        tic = time.time()
        if d_tok is not None:
            surrogate = credit.lookahead_alpha_surrogate(adv_graph, d_tok.to(adv_graph.device), mask.to(adv_graph.device),
                                                         lr, n_tokens)
            controller.accumulate(*controller.gradients(surrogate))
        # the next step's held-out main batch: this step's rollouts with outcome advantages (free, DESIGN §5)
        if controller.mode == "meta" and not cfg.controller.reuse_forward:
            main_batch = Rollouts(ro.input_ids, ro.attention_mask, ro.completion_mask, ro.prompt_len, ro.rewards,
                                  out_adv.clone(), group_size=ro.group_size)
        timing["controller"] += time.time() - tic
        # ---- 6. metrics, samples, checkpoints
        timing["step"] = time.time() - t0
        rec = step_metrics(step, rewards, parses, completions, zero_std, sums, cstats, controller, rl, world,
                           grad_norm, lr, timing, schema)
        rec["skipped_steps_in_row"] = bad_in_row
        rec["guided_replay/groups"] = all_reduce_sum(torch.tensor([float(n_replayed)])).item()
        if step == 0:  # the drift curve's starting point, measured before the first update, logged with step 0
            rec.update({k.replace("eval/", "eval_start/", 1): v for k, v in start_eval.items()})
        if rl.eval_every and (step + 1) % rl.eval_every == 0:  # drift during RL (DESIGN §8: in-distribution retention)
            rec.update(drift_eval(model, tokenizer, schema, splits, cfg, device, master, world))
        if master:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            write_samples(samples_f, step, tokenizer, exs, completions, rewards, ro.adv, cb, schema, rl.n_samples_logged, G)
            bar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl']:.4f}")
        if (step + 1) % cfg.run.save_every == 0 or step + 1 == rl.steps:
            state = {"optimizer": opt.state_dict(), "controller": controller.state_dict(), "step": step + 1,
                     "bad_in_row": bad_in_row, "main_batch": main_batch.state() if main_batch else None,
                     "next_grad_W": next_grad_W,
                     "rng": rng_state()}
            if master:
                save_checkpoint(out_dir, step + 1, model, tokenizer, state, cfg.run.keep_last)
            if world > 1:
                dist.barrier()
    final = os.path.join(out_dir, "checkpoint")
    if master:
        metrics_f.close()
        samples_f.close()
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_policy(model, tokenizer, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if world > 1:
        dist.barrier()
    return final


def drift_eval(model, tokenizer, schema, splits, cfg, device, master: bool, world: int) -> dict:
    """{'eval/<split>/accuracy' | 'eval/<split>/macro_f1': value} on the first rl.eval_items items of each test
    split (rank 0 evaluates, the others wait): in-distribution drift and long-tail progress during RL."""
    rec = {}
    if master:
        import eval as evaluation
        n = cfg.rl.eval_items
        tests = {s: splits[s][:n] if n else splits[s] for s in data.test_split_names(splits)}
        with policy.autocast(cfg.run.dtype, device):
            res = evaluation.evaluate_policy(model, tokenizer, schema, tests, cfg.eval, cfg.data.source == "synthetic")
        for s, m in res.items():
            rec[f"eval/{s}/accuracy"], rec[f"eval/{s}/macro_f1"] = m["accuracy"], m["macro_f1"]
            if "longtail_facet_accuracy" in m:
                rec[f"eval/{s}/longtail_facet_accuracy"] = m["longtail_facet_accuracy"]
    if world > 1:
        dist.barrier()
    return rec


def accumulate_policy_gradient(ddp_model, ro: Rollouts, mask: torch.Tensor, rl, n_tokens: float, n_seqs: float,
                               world: int, grad_W: torch.Tensor | None = None, d_out: torch.Tensor | None = None,
                               main_adv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of the DESIGN §6 loss over all micro-batches of this rank's rollouts into .grad.

    Every micro-batch loss is divided by the GLOBAL counts (aggregate_loss) and multiplied by the world size
    (DDP averages gradients over ranks), so the accumulated gradient equals the full-batch gradient for any
    micro-batch size and world size. Gradients are synchronised on the last micro-batch only (no_sync before).
    With grad_W (the Eq. 3 controller), also writes d_t of every completion token into d_out (B, T). With
    main_adv (B, T), also returns the output-layer gradient of the outcome main loss on these rollouts, from
    the same forward (controller.reuse_forward: the next step's G_W at no extra forward).
    Returns (the step's local sums: loss, kl, clip low/high/region, entropy, tokens, non-finite losses; G_W or None).
    """
    sums = torch.zeros(8, dtype=torch.float64)
    next_grad_W = None
    need_hidden = grad_W is not None or main_adv is not None
    # Groups sorted by their longest completion, micro-batches of whole groups (each prompt's forward then runs
    # once, policy.completion_logprobs_shared_prompt), each trimmed to its own padding: the same sums in another
    # order, with less work (benchmarks/README.md). A micro-batch size that splits groups falls back to rows.
    G = ro.group_size if ro.group_size > 1 and rl.micro_batch_size % ro.group_size == 0 else 1
    longest = ro.completion_mask.sum(1).cpu().view(-1, G).max(1).values
    order = (torch.argsort(longest, stable=True)[:, None] * G + torch.arange(G)[None]).flatten().to(ro.input_ids.device)
    starts = list(range(0, ro.input_ids.shape[0], rl.micro_batch_size))
    for j, s in enumerate(starts):
        idx = order[s:s + rl.micro_batch_size]
        mb = ro.rows(idx, G).trimmed()
        T = mb.completion_mask.shape[1]
        mmask = mask[idx][:, :T]
        last = j == len(starts) - 1
        ctx = ddp_model.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
        with ctx:
            out = logprobs_of(ddp_model, mb, rl.temperature, entropy=True, hidden=need_hidden)
            old = mb.old_logp if mb.old_logp is not None else out.logprobs.detach()
            loss, ls = grpo_loss(out.logprobs, old, mb.adv, mmask, rl, n_tokens, n_seqs, mb.ref_logp)
            (loss * world).backward()
        sums += torch.tensor([loss.item() * world, ls["kl"].item(), ls["clip_ratio/low_mean"].item(),
                              ls["clip_ratio/high_mean"].item(), ls["clip_ratio/region_mean"].item(),
                              (out.entropy.detach() * mmask).sum().item(), mmask.sum().item(),
                              float(not torch.isfinite(loss))], dtype=torch.float64)
        if grad_W is not None:
            # out.logits are z / T already (p_t is right at temperature 1); grad_W log pi carries one more 1 / T
            d_out[idx, :T] = credit.output_layer_token_dots(out.hidden.detach().float(), out.logits.detach(),
                                                            mb.completion_ids, grad_W, 1.0) / rl.temperature
        if main_adv is not None:
            part = output_grad_from_logits(out.hidden, out.logits, mb.completion_ids, main_adv[idx][:, :T],
                                           mb.completion_mask, rl, float(ro.completion_mask.sum()),
                                           float(ro.input_ids.shape[0]))
            next_grad_W = part if next_grad_W is None else next_grad_W + part
    return sums, next_grad_W


def logprobs_of(model, ro: Rollouts, temperature: float, entropy: bool = False, hidden: bool = False):
    """Completion-column log-probs (B, T) (and entropy (B, T), hidden (B, T, H), tempered logits (B, T, V)) of
    rollouts at the sampling temperature; whole groups (ro.group_size > 1) run each prompt's forward once."""
    P, G = ro.prompt_len, ro.group_size
    if G > 1 and ro.input_ids.shape[0] % G == 0:
        return policy.completion_logprobs_shared_prompt(model, ro.input_ids[::G, :P], ro.attention_mask[::G, :P],
                                                        ro.completion_ids, ro.completion_mask, G, temperature,
                                                        return_entropy=entropy, return_hidden=hidden)
    full_mask = torch.cat([torch.zeros_like(ro.input_ids[:, :P]), ro.completion_mask.long()], 1)
    out = policy.token_logprobs(model, ro.input_ids, ro.attention_mask, full_mask, temperature,
                                return_entropy=entropy, return_hidden=hidden)
    cut = lambda t: None if t is None else t[:, P:]  # noqa: E731
    return policy.TokenLogprobs(out.logprobs[:, P:], cut(out.entropy), cut(out.hidden), cut(out.logits))


def main_loss_output_grad(model, main: Rollouts, cfg) -> torch.Tensor:
    """G_W of DESIGN §5: the output-layer gradient of the outcome-GRPO main loss on the held-out batch, from the
    loss's gradient w.r.t. the logits only (no backward through the network)."""
    with torch.no_grad():
        out = logprobs_of(model, main, cfg.rl.temperature, hidden=True)
    return output_grad_from_logits(out.hidden, out.logits, main.completion_ids, main.adv,
                                   main.completion_mask, cfg.rl, float(main.completion_mask.sum()),
                                   float(len(main.rewards)))


def output_grad_from_logits(hidden, logits, tokens, adv, mask, rl, n_tokens, n_seqs) -> torch.Tensor:
    """(V, H) output-layer gradient of the outcome-GRPO loss (on-policy, ratio 1) from a forward's final hidden
    states (B, T, H) and tempered logits z / T (B, T, V): autograd through the softmax only. Micro-batch sums
    add up to the full batch's (the loss is divided by the given global counts)."""
    logits = logits.detach().float().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, rl, n_tokens, n_seqs)
    (dlogits,) = torch.autograd.grad(loss, logits)
    # the logits are z / T, so dL/dz = dL/d(z/T) / T
    return credit.output_layer_grad(hidden.detach().float(), dlogits / rl.temperature)


def step_metrics(step, rewards, parses, completions, zero_std, sums, cstats, controller, rl, world, grad_norm, lr,
                 timing, schema) -> dict:
    """Names as the common GRPO trainers log them (DESIGN §6); global over ranks. time/*: rank 0's seconds per
    phase: rollout (sampling, parsing, rewards), credit (credit tensors + Eq. 1-2), controller (G_W on the
    held-out batch + the Eq. 3 surrogate; the closed-form d_t runs inside the update's forward and is counted
    there), update (reference/old log-probs, forward, backward, optimizer)."""
    G = rl.num_generations
    R = rewards.view(-1, G)
    local = torch.tensor([rewards.sum().item(), R.std(1).sum().item(), zero_std.float().sum().item(), len(rewards),
                          R.shape[0], sum(len(c) for c in completions),
                          sum(len(c) >= rl.max_new_tokens for c in completions),
                          sum(p.valid for p in parses), sum(p.consistent for p in parses)], dtype=torch.float64)
    g = all_reduce_sum(torch.cat([local, sums]))
    n, groups, tok = g[3].item(), g[4].item(), max(g[6 + 9].item(), 1.0)
    rec = {"step": step, "reward": g[0].item() / n, "reward_std": g[1].item() / groups,
           "frac_reward_zero_std": g[2].item() / groups, "loss": g[9].item() / world,
           "kl": g[10].item() / tok, "clip_ratio/low_mean": g[11].item() / tok,
           "clip_ratio/high_mean": g[12].item() / tok, "clip_ratio/region_mean": g[13].item() / tok,
           "entropy": g[14].item() / tok, "completions/mean_length": g[5].item() / n,
           "completions/clipped_ratio": g[6].item() / n, "format_rate": g[7].item() / n,
           "consistency_rate": g[8].item() / n, "nonfinite_loss": g[16].item(), "grad_norm": float(grad_norm),
           "lr": lr, **{f"time/{k}_s": v for k, v in timing.items()}, "tokens_per_s": g[5].item() / timing["step"]}
    for name, a in zip(schema.edge_type_names, controller.alpha().detach().tolist()):
        rec[f"alpha/{name}"] = a
    log = controller.log()
    rec["controller/gate_open_rate"] = log["controller/gate_open_rate"]
    for k, w in zip(data.SCORE_KINDS, log.get("controller/verifier_weight", [])):
        rec[f"controller/verifier_weight/{k}"] = w
    # credit statistics: the same keys on every rank, averaged over ranks
    flat = {}
    for k, v in sorted(cstats.items()):
        if isinstance(v, list):
            flat.update({f"{k}/{s}": x for s, x in zip(schema.slots, v)})
        else:
            flat[k] = v
    vals = all_reduce_sum(torch.tensor(list(flat.values()), dtype=torch.float64)) / world
    rec.update(dict(zip(flat, vals.tolist())))
    return rec


def write_samples(f, step, tokenizer, exs, completions, rewards, adv, cb, schema, n, G) -> None:
    """A few rollouts with their reward and the advantage of every node (read at the node's first token)."""
    for i in range(min(n, len(completions))):
        ex = exs[i // G]
        rec = {"step": step, "query": ex.query, "product": ex.product, "label": ex.label,
               "completion": tokenizer.decode(completions[i]), "reward": float(rewards[i]),
               "node_advantages": {s: round(float(adv[i, cb.spans[i, v, 0]]), 4) for v, s in enumerate(schema.slots)
                                   if cb.present[i, v] and cb.parsed[i]},
               "outcome_advantage": round(float(adv[i, -1]) if not cb.parsed[i] else float("nan"), 4)}
        f.write(json.dumps(rec) + "\n")
    f.flush()


def main(argv=None):
    cfg, path = parse_args(sys.argv[1:] if argv is None else argv)
    final = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        import eval as evaluation
        evaluation.evaluate_run(cfg, final, cfg.run.out_dir, print_table=True)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
