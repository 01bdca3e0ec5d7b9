"""Typed configuration: one dataclass per section, a YAML file, then `--section.key=value` overrides.

    python graph_grpo.py configs/base.yaml
    python graph_grpo.py configs/tiny.yaml --rl.lr=1e-4 --run.out_dir=runs/try1 --no-resume
    python graph_grpo.py --help            # every field, its type, default and docstring

Precedence: dataclass defaults < the YAML file (nested sections, any subset of keys) < overrides
(values parsed as YAML, so 3, 0.1, 1e-4, true, [a, b] are typed; str fields take the text as is).
The string literal under each field is its documentation; `--help` reads it from this source
with `ast`, so it is written once. A field whose values are a closed set is typed
`Literal[...]`, and any other value is refused with the list of valid ones.

Errors are one line and name where the problem is, e.g.
    configs/x.yaml:12: unknown key 'rl.lrr' (did you mean 'rl.lr'?)
    override --rl.steps=abc: rl.steps: expected int, got str 'abc'

To add a knob: a field with a type, a default and a docstring in its section. To add a section:
a dataclass and a field of `Config`. Nothing else needs to know.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import os
import re
import sys
import textwrap
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

import data  # SCORE_KINDS, FACETS and the graph schema's checks (data imports nothing of ours)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """Run identity, device and checkpointing."""

    name: str = ""
    """run name; empty: the config file's stem"""
    out_dir: str = ""
    """run directory (metrics, checkpoints, resolved config); empty: runs/<name>"""
    seed: int = 0
    """global seed (model init, data order); sampling noise also depends on the step and the DDP rank"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """compute dtype; auto: bfloat16 on CUDA, float32 on CPU"""
    resume: bool = True
    """resume when the run directory holds a checkpoint (--resume / --no-resume)"""
    log_every: int = 1
    """RL and distillation: write a metrics line every N steps (RL also at every evaluation and the last step)"""
    save_every: int = 50
    """write a checkpoint every N steps (and at the end)"""
    keep_last: int = 2
    """number of step checkpoints kept in the run directory"""
    num_threads: int = 0
    """torch CPU threads per process; 0: cores // world size"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp (a full model, gradients and AdamW moments per rank) or fsdp (FSDP2: all three sharded over ranks, for models that do not fit one GPU under DDP; README "DDP or FSDP")"""


@dataclass
class DataConfig:
    """Where the examples come from (DESIGN section 2)."""

    source: Literal["synthetic", "jsonl", "wands"] = "synthetic"
    """synthetic: generate the splits into data.dir when missing; jsonl: read them from data.dir; wands: synthetic splits from a WANDS-built catalogue + the real WANDS pairs as test split 'wands'"""
    dir: str = "data/synthetic"
    """directory the synthetic generator writes to, or that holds the jsonl files"""
    seed: int = 1234
    """seed of the synthetic catalogue generator"""
    n_sft: int = 1000
    """CoT-annotated SFT examples generated"""
    n_rl: int = 20000
    """label-only RL pool examples generated"""
    n_test_id: int = 1000
    """in-distribution test examples generated"""
    n_test_longtail: int = 1000
    """long-tail test examples generated"""
    sft_file: str = "sft.jsonl"
    """SFT split, relative to data.dir"""
    rl_file: str = "rl.jsonl"
    """RL pool, relative to data.dir"""
    test_files: list[str] = field(default_factory=lambda: ["test_id.jsonl", "test_longtail.jsonl"])
    """test splits, relative to data.dir; each is evaluated and reported separately"""
    label_names: list[str] = field(default_factory=lambda: ["irrelevant", "mismatch", "related", "excellent"])
    """names of the relevance levels 0..3, lowest first"""
    label_rule: list[int] = field(default_factory=list)
    """label index of each business-rule level 0..3 (data.check_label_rule), e.g. [0, 1, 1, 2] for 3 labels; empty: identity (4 labels)"""
    wands_dir: str = "../shared/data/wands_mini"
    """WANDS files (query.csv, product.csv, label.csv; TAB-separated); a relative path is taken from the repository root"""
    wands_grades: list[str] = field(default_factory=lambda: ["Irrelevant", "Partial", "Exact"])
    """WANDS label strings, lowest first; the position is the label index (as many as data.label_names)"""
    longtail_in_sft: float = 0.03
    """share of long-tail surface forms in the synthetic SFT split"""
    longtail_in_rl: float = 0.5
    """share of long-tail surface forms in the synthetic RL pool"""
    unseen_longtail: bool = False
    """true: keep brand aliases and *_unseen forms out of SFT (the tiny word-level policy can never emit them)"""
    rl_label_noise: float = 0.0
    """share of the generated RL pool whose label is replaced by a wrong one (annotation noise; data.rl_label_noise_kind says which; the gold node annotations and meta.clean_label keep the truth; test splits are never noisy); generated splits only"""
    rl_label_noise_kind: Literal["uniform", "adjacent"] = "uniform"
    """which wrong label data.rl_label_noise gives: "uniform" any other label, "adjacent" a neighbouring grade (one step up or down, as graders mostly err); the same examples are hit either way"""


@dataclass
class GraphConfig:
    """Reasoning-graph schema (DESIGN sections 1 and 0.1): a new graph is config, not code."""

    facets: list[str] = field(default_factory=lambda: ["category", "brand", "color", "size"])
    """product facets a query can mention"""
    nodes: list[str | dict[str, str | bool | list[str]]] = field(default_factory=lambda: [
        {"name": "q", "role": "evidence", "side": "query"}, {"name": "p", "role": "evidence", "side": "product"},
        {"name": "f", "role": "verdict", "per_facet": True}, {"name": "y", "role": "label"}])
    """node types: {name (the CoT tag), role (evidence | verdict | label), side (evidence: query | product), facets (default all), per_facet (one node per facet)}; data.py's docstring has the format"""
    edges: list[list[str]] = field(default_factory=lambda: [["q", "f"], ["p", "f"], ["f", "y"]])
    """edge types [parent, child] between node types; one alpha per edge type (Eq. 1b)"""
    severity: dict[str, list[int]] = field(default_factory=lambda: {"category": [3, 2, 0], "brand": [3, 2, 1],
                                                                     "size": [3, 2, 1]})
    """business rule: per facet, the rule level (0..3) its [match, partial, mismatch] verdict forces; the label is the lowest level over the facets; facets not listed: [3, 2, 2]"""


@dataclass
class ModelConfig:
    """Policy model; the size fields describe the embedded tiny model only."""

    name_or_path: str = ""
    """Hugging Face checkpoint directory or hub id; empty: the embedded tiny model below"""
    hidden_size: int = 128
    """tiny model: width of the residual stream"""
    num_layers: int = 2
    """tiny model: transformer blocks"""
    num_heads: int = 4
    """tiny model: attention heads"""
    num_kv_heads: int = 2
    """tiny model: key/value heads (grouped-query attention)"""
    intermediate_size: int = 512
    """tiny model: width of the MLP"""
    max_positions: int = 512
    """tiny model: longest prompt + completion in tokens"""
    tie_embeddings: bool = False
    """tiny model: share the input embedding and output layer weights"""


@dataclass
class SFTConfig:
    """Supervised fine-tuning on prompt + gold CoT (DESIGN section 9)."""

    steps: int = 600
    """optimizer steps"""
    batch_size: int = 32
    """examples per step (global, over all ranks)"""
    lr: float = 1e-3
    """peak AdamW learning rate"""
    warmup: int = 50
    """linear warm-up steps, then cosine decay to 10% of lr"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0: no clipping"""
    log_every: int = 20
    """write an SFT metrics line every N steps"""


@dataclass
class MaskConfig:
    """CoT random masking during SFT (DESIGN section 9)."""

    enabled: bool = True
    """CoT random masking on (false: plain SFT)"""
    kind: Literal["input", "loss", "both"] = "input"
    """input: masked positions become the mask token in the input, the targets stay (ours); loss: masked positions leave the loss, the label always stays (the paper's label-priority masking); both: independent draws of each"""
    p_node: float = 0.15
    """probability that a whole node's content is masked (the label node's never is; tags never are)"""
    p_tok: float = 0.05
    """probability that a single CoT content token is masked"""


@dataclass
class RLConfig:
    """GRPO / Graph-GRPO training (DESIGN sections 6-7)."""

    steps: int = 150
    """policy-update steps (one batch of rollouts each)"""
    prompts_per_step: int = 16
    """distinct (query, product) prompts per step, global over all ranks"""
    num_generations: int = 8
    """rollouts per prompt: the group size G"""
    temperature: float = 1.0
    """sampling temperature; log-probs are taken at the same temperature"""
    max_new_tokens: int = 64
    """longest completion sampled"""
    lr: float = 1e-4
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0: no clipping"""
    warmup: int = 0
    """linear warm-up steps of the learning rate"""
    beta: float = 0.0
    """coefficient of the k3 KL to the frozen SFT reference (section 6); 0: no reference model"""
    eps_low: float = 0.2
    """lower clip range: the ratio is clipped below at 1 - eps_low"""
    eps_high: float = 0.2
    """upper clip range: the ratio is clipped above at 1 + eps_high"""
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """loss reduction: global token mean | GRPO per-sequence mean | Dr. GRPO sum / max length"""
    num_iterations: int = 1
    """policy updates per batch of rollouts (with more than 1, pi_old is recomputed by a forward before the first update)"""
    micro_batch_size: int = 32
    """rollouts per forward/backward pass (memory only: the loss does not depend on it)"""
    drop_zero_std: bool = False
    """drop groups whose rewards are all equal (they are always counted)"""
    init_from: str = ""
    """SFT checkpoint RL starts from; empty: <run.out_dir>/sft/checkpoint, made by the SFT stage if missing"""
    max_bad_steps: int = 5
    """stop after this many consecutive steps with a non-finite loss or gradient"""
    eval_every: int = 0
    """evaluate on the test splits every N steps (and before step 0); 0: only at the end"""
    eval_items: int = 0
    """items per test split in those evaluations (the first N); 0: eval.max_items"""
    guided_replay: bool = False
    """TaoSR-AGRL adaptive guided replay: in a group at or below replay_threshold accuracy, replace rollouts by the gold CoT"""
    repair_replay: bool = False
    """unique-repair replay (ours, issue 14; graph_grpo.repair_replay): in a group at or below replay_threshold, failed rollouts whose answer one facet-verdict change would give the gold label, and only one, are replaced by that repaired answer (outcome label only, no gold CoT); not with guided_replay"""
    replay_threshold: float = 0.0
    """group mean reward at or below which guided (or repair) replay applies"""
    replay_k: int = 1
    """rollouts of such a group replaced by the gold CoT (guided) or at most this many repaired (repair)"""
    curriculum_stages: int = 3
    """credit.mode stepwise (TaoSR-SHE): stages over the RL pool from easy to hard (rare-word count vs the SFT split)"""
    n_samples_logged: int = 4
    """sample completions, with their node advantages, logged per logged step"""


@dataclass
class RewardConfig:
    """Outcome reward and local node scores (DESIGN section 3)."""

    kind: Literal["exact", "graded"] = "exact"
    """exact: 1 if the label is right, else 0; graded: 1 - |y_hat - y| / 3"""
    format_penalty: float = 0.0
    """reward of a rollout whose label does not parse"""
    require_consistent: bool = True
    """a label counts only when it follows from the rollout's own facet verdicts under the rule"""
    local_scores: Literal["verifier", "gold", "none"] = "verifier"
    """node scores s_{i,v}: heuristic verifiers; gold (node right vs the gold annotation, verifier where none)"""
    comparator_unknown: Literal["mismatch", "abstain"] = "mismatch"
    """comparator verifier on a value form it does not know: mismatch (guess by string equality) | abstain (no score)"""
    shaping_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    """credit.mode rule_shaped (TaoSR-AGRL): weights of rule adherence and mean grounding added to R"""


@dataclass
class CreditConfig:
    """Credit assignment: node advantages (DESIGN sections 4 and 8)."""

    mode: Literal["outcome", "process", "stepwise", "rule_shaped", "graph"] = "outcome"
    """outcome: GRPO; process: verifier evidence, alpha 0; stepwise: TaoSR-SHE; rule_shaped: TaoSR-AGRL; graph: Graph-GRPO"""
    scale: Literal["group", "batch", "node", "none"] = "group"
    """advantage scale (Eq. 2): group: std_j R_j + eps per group; batch: batch std (outcome only); node: per-node z-score over the group, (c - mean) / std (graph only); none: 1"""
    evidence: Literal["baseline", "group", "verifier", "both", "rollout", "outcome"] = "group"
    """own evidence a_{i,v}: baseline R - V; group Eq. 1a; verifier s - mean s; both: group + verifier; rollout: Monte-Carlo node values, Eq. 1c; outcome: R - mean R at the label only (step evidence from probe_weight alone)"""
    rollout_samples: int = 2
    """evidence rollout: continuations K sampled from each distinct prefix at a node boundary (Eq. 1c)"""
    value: Literal["include_self", "leave_one_out", "others"] = "include_self"
    """V_{i,v} of Eq. 1a: include_self (DESIGN), leave_one_out (the other rollouts sharing i's parent content), or others (Q_{i,v} over the other rollouts too; credit.group_values)"""
    gate: Literal["rule", "none"] = "rule"
    """instance gate g in Eq. 1b: rule: counterfactual under the business rule; none: g = 1"""
    shield: Literal["none", "verifier", "complete"] = "none"
    """Eq. 1b variant (ours, issue 14): verifier: a step the verifiers call right receives only the positive part of its children's credit, one they call wrong only the negative part (credit.shielded); complete: the same, but a verdict step whose comparator abstained (a form it does not know) is not called right, and receives all of its children's credit (data.JUDGING_KINDS); none: Eq. 1b as written. Graph mode with propagation only (ignored elsewhere, as evidence is)"""
    shield_roles: list[str] = field(default_factory=lambda: ["evidence", "verdict", "label"])
    """the node roles whose steps the shield filters (credit.shield other than none; data.ROLES); the others receive Eq. 1b's full credit. Ours, issue 14 (results/LOG.md, "Which steps the shield's cost comes from")"""
    shield_verdicts: list[str] = field(default_factory=lambda: ["right", "wrong"])
    """the verifiers' verdicts the shield acts on (credit.SHIELD_VERDICTS): right: a step called right receives no negative credit from its children (spared blame); wrong: a step called wrong receives no positive credit (denied reward); a verdict left out passes Eq. 1b's credit. Ours, issue 14 (results/LOG.md, "Which side of the shield costs")"""
    shield_label: bool = False
    """with credit.shield verifier or complete: the label step's own evidence (the outcome) keeps only its positive part where the verifiers vouch for the whole answer (the label follows the rule from verdicts the comparator judged and called right, and every present step is called right; credit.vouched_sinks), so a low reward that contradicts every verifier does not blame the label (with verifier evidence and the shield on steps called right, no step of that rollout). Ours, issue 14 (results/LOG.md, "Where the blame of correct steps sits, and a shield for the vouched label")"""
    unparsed: Literal["outcome", "nodes"] = "outcome"
    """the tokens of an answer that does not parse (graph-family modes): outcome: every one gets the outcome advantage (the format penalty), as under GRPO; nodes: its steps that are well-formed and that no parse problem names keep their node advantage, the other tokens get the outcome (credit.unparsed_usable_spans). Ours, issue 14 (results/LOG.md, "Where the blame of correct steps sits")"""
    alpha_init: float = 1.0
    """initial alpha of every edge type (Eq. 1b); 1 behaves like the `baseline` form"""
    alpha_min: float = 0.0
    """alpha is clipped to [alpha_min, alpha_max]"""
    alpha_max: float = 2.0
    """alpha is kept in [alpha_min, alpha_max] (credit.EdgeController: projected, not a sigmoid)"""
    eps: float = 1e-4
    """added to the std in Eq. 2 (TRL's value)"""
    verifier_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    """trust weights beta of the grounding and comparator verifier scores (evidence verifier | both)"""
    verifier_weight_max: float = 2.0
    """the learned trust weights are kept in [0, verifier_weight_max]"""
    probe_weight: float = 0.0
    """weight of the label-probe evidence (ours, issue 14): on each verdict step, the expected outcome reward of the policy's label belief after the rollout's CoT minus the same with that step's content masked (P(gold label) under reward.kind exact), read at the label's open tag (graph_grpo.step_probes), added to the own evidence before Eq. 1b; 0: off. Graph mode, any evidence but baseline"""


@dataclass
class ControllerConfig:
    """Main-loss-driven alpha controller (DESIGN section 5, Eq. 3)."""

    mode: Literal["fixed", "meta"] = "fixed"
    """fixed: alpha stays at credit.alpha_init; meta: moved by the main loss (Eq. 3 or the alignment objective)"""
    objective: Literal["lookahead", "alignment"] = "lookahead"
    """lookahead: Eq. 3, dL_main(theta')/dalpha after an SGD step; alignment: the change of L_main per unit length of the output-layer update (credit.alignment_token_dots: scale-free, as the AdamW step is)"""
    main_batch: Literal["previous", "same"] = "previous"
    """batch the main loss L_main is taken on: the previous step's rollouts, or this step's"""
    step_size: float = 0.05
    """normalised step on phi each time the gate opens"""
    accumulate: int = 8
    """steps K of phi gradient accumulated before the signal-to-noise gate is tested (rule sequential: the fewest steps a test uses)"""
    rule: Literal["window", "sequential"] = "window"
    """window: test each block of K steps, then drop it (DESIGN 5); sequential: test every step over all gradients since the coordinate's last move (credit.EdgeController, ours)"""
    snr_z: float = 2.0
    """the gate opens when |mean| exceeds snr_z standard errors of the accumulated gradient"""
    reuse_forward: bool = True
    """main_batch previous: take G_W from the previous step's update forward (pre-update parameters, one step stale) instead of a fresh forward (about 20% of step time measured)"""
    learn_weights: bool = False
    """also move the verifier trust weights by Eq. 3 (evidence verifier | both)"""


@dataclass
class EvalConfig:
    """Generation-based evaluation (DESIGN section 11)."""

    batch_size: int = 128
    """prompts per generation batch"""
    max_new_tokens: int = 64
    """longest completion generated (greedy)"""
    max_items: int = 0
    """evaluate the first N items of each test file; 0: all"""


@dataclass
class DistillConfig:
    """Graph-node multi-head distillation into an encoder (DESIGN section 10)."""

    teacher: str = ""
    """checkpoint of the teacher (the RL policy); empty: <run.out_dir>/checkpoint, else <run.out_dir>/sft/checkpoint"""
    steps: int = 6000
    """optimizer steps"""
    batch_size: int = 64
    """examples per step"""
    lr: float = 1e-3
    """AdamW learning rate"""
    tau: float = 2.0
    """distillation temperature; each head's KL is scaled by tau^2"""
    heads: Literal["all", "label_only"] = "all"
    """all: one head per graph node type; label_only: the label head only"""
    label_ce_weight: float = 1.0
    """weight of the label head's cross-entropy on the gold label"""
    hidden_size: int = 128
    """student encoder width"""
    num_layers: int = 2
    """student encoder blocks"""
    num_heads: int = 4
    """student encoder attention heads (hidden_size must be a multiple)"""
    max_length: int = 128
    """longest student input in tokens, [CLS] query [SEP] product [SEP]; the product is cut first"""
    warmup: int = 50
    """linear warm-up steps, then cosine decay to 10% of lr"""
    head_weights: dict[str, float] | list[float] = field(default_factory=dict)
    """KL weight per head: {head name ('y', 'f:brand') or kind ('f'): w}, name wins, missing 1; or a list in head order"""
    max_train: int = 20000
    """train on the first N prompts of the RL pool (label-only: the teacher gives the node targets); 0: all"""
    dropout: float = 0.0
    """hidden and attention dropout of a fresh student encoder (student_init keeps its own)"""
    student_init: str = ""
    """local encoder checkpoint (AutoModel + tokenizer) to start the student from; empty: a fresh BERT-style encoder"""
    student_dir: str = ""
    """where the student is saved; empty: <run.out_dir>/student (the teacher-signal cache always lives there)"""
    label_from: Literal["pooled", "verdicts", "both"] = "verdicts"
    """the label head reads: the pooled vector; the verdict heads' probabilities (F -> Y); or both (label_only: pooled)"""
    val_items: int = 0
    """hold the last N prompts of the RL pool out of training and log the student's metrics on them (gold labels)"""
    eval_every: int = 0
    """log label macro-F1 and node accuracy on the held-out prompts every N steps (0: only at the end)"""
    node_tokens: bool = True
    """one input token per verdict node ('[f:brand]', after [CLS]); its head reads that token, not the pooled vector"""


@dataclass
class Config:
    """Every setting of a run; each field is a section of the YAML file."""

    run: RunConfig = field(default_factory=RunConfig)
    """run identity, device, checkpointing"""
    data: DataConfig = field(default_factory=DataConfig)
    """data source and synthetic splits (DESIGN 2)"""
    graph: GraphConfig = field(default_factory=GraphConfig)
    """reasoning-graph schema (DESIGN 1)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """policy model"""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """supervised fine-tuning (DESIGN 9)"""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """CoT random masking during SFT (DESIGN 9)"""
    rl: RLConfig = field(default_factory=RLConfig)
    """GRPO / Graph-GRPO training (DESIGN 6-7)"""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """outcome reward and node scores (DESIGN 3)"""
    credit: CreditConfig = field(default_factory=CreditConfig)
    """node advantages (DESIGN 4, 8)"""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """alpha controller (DESIGN 5)"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluation (DESIGN 11)"""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """multi-head distillation (DESIGN 10)"""


# ---------------------------------------------------------------------------------------------
# Machinery: the schema read from the dataclasses, typed values, YAML with line numbers, --help
# ---------------------------------------------------------------------------------------------

class OneLineError(Exception):
    """An ending that a CLI reports as one line on stderr (`prefix` + the message; an empty message prints
    nothing), without a traceback, with exit code `exit_code` (`cli`). The message is kept to one line."""
    exit_code = 2
    prefix = "error: "

    def __init__(self, message: str):
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))


class UserError(OneLineError, ValueError):
    """Something a user can get wrong (config, data file, model directory, checkpoint, run directory); the
    message names the place: file:line, the key, or the path. Exit code 2."""


class ConfigError(UserError):
    """A bad config file, key, value or override. The message is one line that names where."""


def _schema() -> dict[str, tuple[type, dict[str, Any]]]:
    """{section: (dataclass, {key: annotation})}, in declaration order."""
    hints = typing.get_type_hints(Config)
    return {sec.name: (hints[sec.name], {f.name: typing.get_type_hints(hints[sec.name])[f.name]
                                         for f in dataclasses.fields(hints[sec.name])})
            for sec in dataclasses.fields(Config)}


def _all_keys(schema) -> list[str]:
    return [f"{s}.{k}" for s, (_, keys) in schema.items() for k in keys]


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} of a dataclass: the string literal right under each field."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: inspect.cleandoc(b.value.value) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)}


def _did_you_mean(name: str, candidates: list[str]) -> str:
    """' (did you mean ...?)': the same key in other sections, else the closest name by difflib."""
    leaf = name.rpartition(".")[2]
    matches = [c for c in candidates if c.rpartition(".")[2] == leaf and c != name]
    matches = matches or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, matches))}?)" if matches else ""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(map(_type_name, args))}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp`; returns it (an int becomes a float for a float field).
    Raises ConfigError('key: expected ..., got ...'). bool is not an int here."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is Any:
        return value
    if origin is Literal:
        if any(type(value) is type(c) and value == c for c in args):
            return value
        hint = _did_you_mean(value, [c for c in args if isinstance(c, str)]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: invalid choice {value!r} (choose from {', '.join(map(repr, args))}){hint}")
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            with contextlib.suppress(ConfigError):
                return check_value(value, arg, key)
    elif (origin is list or tp is list) and isinstance(value, list):
        return [check_value(v, (args or (Any,))[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif (origin is dict or tp is dict) and isinstance(value, dict):
        k_tp, v_tp = args or (Any, Any)
        return {check_value(k, k_tp, f"{key} key"): check_value(v, v_tp, f"{key}[{k!r}]") for k, v in value.items()}
    elif (tp is float and number) or (tp is int and number and isinstance(value, int)):
        return tp(value)
    elif tp is type(None) and value is None or tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _show(value: Any) -> str:
    """"str 'abc'": the type and a short repr of a value, for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _is_text(tp: Any) -> bool:
    """A field whose override value is taken as typed, not parsed as YAML: str, or a Literal of strings."""
    return tp is str or (typing.get_origin(tp) is Literal and all(isinstance(c, str) for c in typing.get_args(tp)))


# YAML 1.1 reads 1e-4 as a string (its floats need a dot); a config reads it as the float it means.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):  # the dumper must quote what the loader would read as a float
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in _cls.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _read_sections(path: str) -> list[tuple[str, int, list[tuple[str, int, Any]]]]:
    """[(section, line, [(key, line, value), ...]), ...] from a YAML file, with 1-based lines."""
    try:
        loader = _Loader(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {getattr(err, 'strerror', None) or err}") from None
    line = lambda node: node.start_mark.line + 1  # noqa: E731

    def mapping(node, what: str) -> list[tuple[str, int, Any]]:
        """(key, line, node) pairs of a mapping node; duplicate keys are errors."""
        loader.flatten_mapping(node)  # resolve `<<: *anchor` merges
        seen, out = {}, []
        for k, v in node.value:
            key = str(loader.construct_object(k))
            if key in seen:
                raise ConfigError(f"{path}:{line(k)}: duplicate {what.format(key)} (first at line {seen[key]})")
            seen[key] = line(k)
            out.append((key, line(k), v))
        return out
    try:
        root = loader.get_single_node()
        if root is None:  # an empty file, or only comments
            return []
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{path}:{line(root)}: expected sections (run:, rl:, ...) at the top level, got "
                              f"{_show(loader.construct_object(root, deep=True))}")
        sections = []
        for name, at, node in mapping(root, "section {!r}"):
            if isinstance(node, yaml.ScalarNode) and loader.construct_object(node) is None:
                sections.append((name, at, []))  # a section whose keys are all commented out
            elif not isinstance(node, yaml.MappingNode):
                raise ConfigError(f"{path}:{at}: section {name!r} must hold key: value lines, got "
                                  f"{_show(loader.construct_object(node, deep=True))}")
            else:
                sections.append((name, at, [(k, kl, loader.construct_object(v, deep=True))
                                            for k, kl, v in mapping(node, f"key '{name}.{{}}'")]))
        return sections
    except yaml.YAMLError as err:
        mark, ctx = getattr(err, "problem_mark", None), getattr(err, "context", None)
        ctx_mark = getattr(err, "context_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: {getattr(err, 'problem', None) or err}"
                          + (f" ({ctx}" + (f" at line {ctx_mark.line + 1})" if ctx_mark else ")") if ctx else "")) from None
    finally:
        loader.dispose()


def _check_key(schema, section: str, key: str) -> Any:
    """The annotation of section.key; ConfigError (no location) when there is no such key."""
    if section not in schema:
        raise ConfigError(f"unknown section {section!r}{_did_you_mean(section, list(schema))}")
    if key not in schema[section][1]:
        raise ConfigError(f"unknown key '{section}.{key}'{_did_you_mean(f'{section}.{key}', _all_keys(schema))}")
    return schema[section][1][key]


def parse_override(item: str, schema=None) -> tuple[str, str, Any]:
    """'--section.key=value' -> (section, key, value); the value parsed as YAML unless the field is text."""
    schema = schema or _schema()
    usage = f"malformed override {item!r}: expected --section.key=value"
    name, eq, text = item[2:].partition("=")
    section, dot, key = name.partition(".")
    if not item.startswith("--") or not eq:
        raise ConfigError(usage + (" (missing '=')" if item.startswith("--") else ""))
    if not dot or not section or not key or "." in key:
        raise ConfigError(usage + _did_you_mean(name, _all_keys(schema)))
    try:
        tp = _check_key(schema, section, key)
        return section, key, text if _is_text(tp) else yaml.load(text, Loader=_Loader)
    except ConfigError as err:
        raise ConfigError(f"override {item}: {err}") from None
    except yaml.YAMLError:
        raise ConfigError(f"override {item}: cannot parse {text!r} as a YAML value") from None


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from the dataclass defaults, the YAML file at `path`, then `--section.key=value` overrides (later
    ones win), range-checked (check_ranges), with the derived defaults filled in (`resolve`)."""
    schema = _schema()
    values = config_to_dict(Config())
    origin: dict[str, str] = {}  # section.key -> where its value was set, for range errors

    def assign(section: str, key: str, value: Any, where: str) -> None:
        try:
            values[section][key] = check_value(value, _check_key(schema, section, key), f"{section}.{key}")
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        origin[f"{section}.{key}"] = where

    for section, line, keys in _read_sections(path):
        if section not in schema:
            raise ConfigError(f"{path}:{line}: unknown section {section!r}"
                              f"{_did_you_mean(section, list(schema) + _all_keys(schema))}")
        for key, k_line, value in keys:
            assign(section, key, value, f"{path}:{k_line}")
    for item in overrides:
        assign(*parse_override(item, schema), f"override {item}")
    cfg = Config(**{s: cls(**values[s]) for s, (cls, _) in schema.items()})
    check_ranges(cfg, origin)
    return resolve(cfg, path)


# Values that parse but cannot be right, refused when the config is loaded, before anything is written.
POSITIVE = ("run.log_every run.save_every run.keep_last data.n_sft data.n_rl model.hidden_size model.num_layers "
            "model.num_heads model.num_kv_heads model.intermediate_size model.max_positions sft.steps sft.batch_size "
            "sft.lr sft.log_every rl.steps rl.prompts_per_step rl.temperature rl.max_new_tokens rl.lr rl.num_iterations "
            "rl.micro_batch_size rl.max_bad_steps rl.replay_k rl.curriculum_stages credit.eps credit.verifier_weight_max "
            "credit.rollout_samples "
            "controller.step_size eval.batch_size eval.max_new_tokens distill.steps distill.batch_size distill.lr "
            "distill.tau distill.hidden_size distill.num_layers distill.num_heads distill.max_length").split()
NON_NEGATIVE = ("run.num_threads data.n_test_id data.n_test_longtail sft.warmup sft.weight_decay sft.grad_clip "
                "rl.weight_decay rl.grad_clip rl.warmup rl.beta rl.eps_high rl.eval_every rl.eval_items "
                "rl.n_samples_logged credit.alpha_min credit.probe_weight controller.snr_z eval.max_items distill.warmup "
                "distill.max_train distill.label_ce_weight").split()
UNIT = "data.longtail_in_sft data.longtail_in_rl data.rl_label_noise mask.p_node mask.p_tok".split()  # probabilities in [0, 1]
BELOW_ONE = "rl.eps_low distill.dropout".split()                                  # in [0, 1)


def check_ranges(cfg: Config, origin: dict[str, str] | None = None) -> None:
    """ConfigError naming where the value was set (file:line or override) and the key, for a value out of range."""
    def get(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    def fail(key, want):
        where = (origin or {}).get(key, "default")
        raise ConfigError(f"{where}: {key} = {get(key)!r}: {want}")

    for key in POSITIVE:
        if not get(key) > 0:
            fail(key, "must be > 0")
    for key in NON_NEGATIVE:
        if not get(key) >= 0:
            fail(key, "must be >= 0")
    for key in UNIT + BELOW_ONE:
        if not (0 <= get(key) <= 1 and (key not in BELOW_ONE or get(key) < 1)):
            fail(key, "must be in [0, 1" + (")" if key in BELOW_ONE else "]"))
    if cfg.rl.num_generations < 2:
        fail("rl.num_generations", "a group needs >= 2 samples for a baseline")
    if cfg.controller.accumulate < 2:
        fail("controller.accumulate", "the signal-to-noise gate needs >= 2 steps of spread")
    if cfg.rl.replay_k > cfg.rl.num_generations:
        fail("rl.replay_k", f"at most rl.num_generations = {cfg.rl.num_generations}")
    c = cfg.credit
    if not c.alpha_min <= c.alpha_max or not c.alpha_init <= c.alpha_max:
        fail("credit.alpha_max", f"must be >= credit.alpha_min = {c.alpha_min} and >= credit.alpha_init = {c.alpha_init}")
    if cfg.model.num_heads and cfg.model.hidden_size % cfg.model.num_heads:
        fail("model.hidden_size", f"must be a multiple of model.num_heads = {cfg.model.num_heads}")
    if cfg.model.num_heads % cfg.model.num_kv_heads:
        fail("model.num_kv_heads", f"must divide model.num_heads = {cfg.model.num_heads}")
    if cfg.distill.hidden_size % cfg.distill.num_heads:
        fail("distill.hidden_size", f"must be a multiple of distill.num_heads = {cfg.distill.num_heads}")
    check_combinations(cfg, origin or {}, fail)


def check_combinations(cfg: Config, origin: dict[str, str], fail) -> None:
    """Settings that are each valid but not together: refused at load like a range, not by a traceback once
    the run has started."""
    n_scores = len(data.SCORE_KINDS)
    if len(cfg.credit.verifier_weights) != n_scores or not all(
            0 <= w <= cfg.credit.verifier_weight_max for w in cfg.credit.verifier_weights):
        fail("credit.verifier_weights", f"must hold {n_scores} weights {data.SCORE_KINDS} in [0, credit.verifier_weight_max]")
    if not cfg.credit.shield_roles or any(r not in data.ROLES for r in cfg.credit.shield_roles):
        fail("credit.shield_roles", f"must list one or more of {list(data.ROLES)}")
    if not cfg.credit.shield_verdicts or any(v not in ("right", "wrong") for v in cfg.credit.shield_verdicts):
        fail("credit.shield_verdicts", "must list one or both of ['right', 'wrong']")  # credit.SHIELD_VERDICTS
    if cfg.credit.shield_label and cfg.credit.shield == "none":
        fail("credit.shield_label", "needs credit.shield verifier or complete (the verifiers' verdicts)")
    if len(cfg.reward.shaping_weights) != 2:
        fail("reward.shaping_weights", "must hold 2 weights (rule adherence, mean grounding)")
    graph_mode, scale = cfg.credit.mode not in ("outcome", "rule_shaped"), cfg.credit.scale
    if (scale == "node" and not graph_mode) or (scale == "batch" and graph_mode):
        raise ConfigError(f"{origin.get('credit.scale', 'default')}: credit.scale = {scale} needs credit.mode "
                          f"{'graph, process or stepwise' if scale == 'node' else 'outcome or rule_shaped'}, "
                          f"not {cfg.credit.mode!r}")
    if cfg.rl.repair_replay and cfg.rl.guided_replay:
        fail("rl.repair_replay", "replays the rule's repair where rl.guided_replay replays the gold CoT: set one of them")
    if cfg.data.source == "synthetic" and sorted(cfg.graph.facets) != sorted(data.FACETS):
        fail("graph.facets", f"must be the synthetic catalogue's facets {sorted(data.FACETS)}")
    if cfg.data.source == "jsonl" and cfg.data.rl_label_noise > 0:
        fail("data.rl_label_noise", "adds noise to generated splits only; data.source jsonl reads its labels as they are")
    if cfg.data.source == "wands" and len(cfg.data.wands_grades) != len(cfg.data.label_names):
        fail("data.wands_grades", f"must hold one grade per data.label_names entry ({len(cfg.data.label_names)})")


def resolve(cfg: Config, config_path: str | None) -> Config:
    """A copy of `cfg` with the derived defaults: run.name = the config file's stem, and
    run.out_dir = runs/<name>, where they are empty."""
    name = cfg.run.name or (Path(config_path).stem if config_path else "")
    if not name:
        raise ConfigError("run.name is empty and there is no config file to name the run after")
    out_dir = cfg.run.out_dir or os.path.join("runs", name)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, out_dir=out_dir))


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """{section: {key: value}}, plain Python values (a deep copy)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write `cfg` as YAML such that load_config(path) == cfg; atomic (temp file + rename)."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# resolved config (config.save_config); load_config(this file) gives the same run\n" + text,
                   encoding="utf-8")
    os.replace(tmp, path)


def format_help(prog: str = "") -> str:
    """Usage and every field: --section.key=default, its type, and its docstring."""
    lines = [f"usage: {prog or _prog()} CONFIG.yaml [--section.key=value ...] [--resume | --no-resume]", "",
             "Settings: dataclass defaults < CONFIG.yaml < overrides (values read as YAML).",
             "--resume / --no-resume are --run.resume=true / false.", ""]
    defaults = config_to_dict(Config())
    for section, (cls, keys) in _schema().items():
        lines.append(f"{section}: {field_docs(Config).get(section, '')}".rstrip())
        for key, tp in keys.items():
            value = yaml.dump(defaults[section][key], Dumper=_Dumper, default_flow_style=True, width=10**9)
            lines.append(f"  --{section}.{key}={value.strip().removesuffix('...').strip()}  ({_type_name(tp)})")
            lines.extend("      " + doc for doc in field_docs(cls).get(key, "").splitlines())
        lines.append("")
    return "\n".join(lines)


def check_schema(cfg: Config) -> None:
    """ConfigError when the graph section and the label scale make no schema (data.GraphSchema's own checks; the
    message names the key). The CLIs check it with the arguments (parse_args); load_config alone does not, so
    that a config can be read, written and compared whatever its graph."""
    try:
        data.GraphSchema.from_config(cfg.graph, cfg.data.label_names, cfg.data.label_rule)
    except ValueError as err:  # data.SchemaError, or data.check_label_rule's
        raise ConfigError(str(err)) from None


DEBUG_ENV = "GG_DEBUG"
"""set (GG_DEBUG=1) to see the traceback above a CLI's one-line error"""


def cli(body: Callable[[], Any], *more: type[BaseException]) -> Any:
    """Run a CLI's body on the one error path for what a user can get wrong (DESIGN §7): a UserError (config,
    model directory, checkpoint, run directory), a data file error (data.DataError, data.SchemaError; `more`
    adds a CLI's own), or an OSError (a path that cannot be read or written) ends the process with
    `error: <one line>` on stderr and exit code 2; an interrupt with its own line and 128 + the signal. No
    traceback, unless the environment sets GG_DEBUG."""
    try:
        return body()
    except (OneLineError, data.DataError, data.SchemaError, OSError, KeyboardInterrupt, *more) as err:
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        code = getattr(err, "exit_code", 130 if isinstance(err, KeyboardInterrupt) else 2)
        if isinstance(err, KeyboardInterrupt):
            line = "interrupted (SIGINT)"
        elif isinstance(err, OSError) and err.filename and err.strerror:
            line = f"error: {err.filename}: {err.strerror}"
        else:
            line = getattr(err, "prefix", "error: ") + str(err) if str(err) else ""  # "": said by another rank
        if line:
            print(" ".join(line.splitlines()), file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def _prog() -> str:
    return os.path.basename(sys.argv[0]) or "script.py"


def parse_args(argv: list[str] | None = None, prog: str = "") -> tuple[Config, str]:
    """(Config, config path) from `CONFIG.yaml [--section.key=value ...] [--resume|--no-resume]`.
    --help / -h prints every field and exits 0; a bad argument prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(format_help(prog))
        raise SystemExit(0)
    flags = {"--resume": "--run.resume=true", "--no-resume": "--run.resume=false"}
    overrides = [flags.get(a, a) for a in argv if a in flags or a.startswith("-") or "=" in a]
    paths = [a for a in argv if not (a in flags or a.startswith("-") or "=" in a)]
    try:
        if len(paths) != 1:
            raise ConfigError(f"expected one config file, got {len(paths)}: {' '.join(paths) or '(none)'}"
                              f" (usage: {prog or _prog()} CONFIG.yaml [--section.key=value ...])")
        cfg = load_config(paths[0], overrides)
        check_schema(cfg)
        return cfg, paths[0]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # python config.py CONFIG.yaml [overrides]: print the resolved config
    _cfg, _ = parse_args()
    print(yaml.dump(config_to_dict(_cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False), end="")
