"""Graph-node multi-head distillation (DESIGN.md §10): the generative teacher -> a one-forward encoder student.

    python distill.py configs/base.yaml                         # teacher: runs/base/checkpoint, else .../sft/checkpoint
    python distill.py configs/base.yaml --distill.teacher=PATH  # any teacher checkpoint
    python distill.py configs/base.yaml --distill.heads=label_only --distill.student_dir=runs/base/student_label_only
    python distill.py score PAIRS.jsonl > OUT.jsonl             # serve: label every pair (section 6)

Read in this order:
  1. heads      one classification head per graph node type, from the schema: one per verdict node (match /
                partial / mismatch / absent) and one for the label (len(label_names) classes)
  2. loss       per head tau^2 * KL(teacher || student) at temperature tau, weighted, + label cross-entropy
  3. teacher    its probabilities over each node's verdict words, read by teacher forcing on its own greedy CoT,
                cached on disk per split
  4. student    a BERT-style encoder over [CLS] [node tokens] query [SEP] product [SEP]; by default (the graph-shaped
                student) each verdict head reads its own node token and the label head reads the verdict heads'
                probabilities (F -> Y); distill.node_tokens=false, label_from=pooled is the paper's student, every
                head on the pooled [CLS] vector. Save / load (Hugging Face format + the heads), score_pairs
  5. training (optionally with a validation curve on held-out RL-pool prompts) and the student-vs-teacher report
  6. serving    `score`: JSONL pairs in, one JSON line per pair out, pairs/s on stderr

Writes <run.out_dir>/student/ (or distill.student_dir): the encoder (config.json, model.safetensors; the config's
`graph_heads` lists every head with its classes, in order), the heads (graph_heads.pt), the tokenizer, config.yaml,
metrics.jsonl and eval.json ({'teacher': {split: metrics}, 'student': {split: metrics}}). The teacher signals are
cached in <run.out_dir>/student/teacher_signals_<split>.pt whatever distill.student_dir says, so a second student
(label_only, another seed) reuses them.

    from distill import load_student, score_pairs
    model, tokenizer = load_student("runs/base/student")
    score_pairs(model, tokenizer, [("nike red sneakers", "nike sneakers color red size us_9")])
    # [{'label': 3, 'label_name': 'excellent', 'relevance': 2.99, 'label_probs': {...}, 'facets': {...}}]
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, BertConfig

import data
import eval as evaluation
import policy
import testbed
from checkpoint import check_model_dir, load_error, make_run_dir, save_atomically, verify_manifest
from config import cli, parse_args, save_config
from sft_mask import lr_at

FACET_CLASSES = data.VERDICTS + ("absent",)  # a facet head's classes; 'absent': the query does not ask for it
CLS_TOKEN, SEP_TOKEN = "[CLS]", "[SEP]"
HEADS_FILE = "graph_heads.pt"


class DistillError(ValueError):
    """Bad distillation input (config value, teacher tokenizer); the message is one line naming it."""


# ----------------------------------------------------------------------------------------------------------
# 1. Heads from the graph schema (DESIGN §10)

def head_classes(schema: data.GraphSchema, heads: str = "all") -> dict[str, list[str]]:
    """{head name: class names}: one head per verdict node of the schema ('f:brand' ..., or the paper's 'ms',
    'ma'; FACET_CLASSES: its verdict, or absent when the query mentions none of its facets), then the label node
    (the label names, lowest first). Evidence nodes (what the query or product says) get no head. heads='label_only'
    keeps the label head only. The order is the head order everywhere."""
    if heads not in ("all", "label_only"):
        raise DistillError(f"distill.heads: expected 'all' or 'label_only', got {heads!r}")
    out = {} if heads == "label_only" else {n: list(FACET_CLASSES) for n in verdict_heads(schema)}
    out[schema.label_slot] = list(schema.label_names)
    return out


def verdict_heads(schema: data.GraphSchema) -> list[str]:
    return [n for n, s in schema.slot_info.items() if s.type.role == "verdict"]


def build_heads(schema: data.GraphSchema, heads: str = "all") -> dict[str, int]:
    """{head name: number of classes}: one head per graph node type that makes a decision (F_k, Y)."""
    return {name: len(classes) for name, classes in head_classes(schema, heads).items()}


def resolve_head_weights(head_weights, schema: data.GraphSchema, heads: str = "all") -> dict[str, float]:
    """distill.head_weights -> {head: weight} over the heads in use.

    A mapping: keys are head names ('f:brand', 'y') or node types ('f' = every facet head); a head name wins
    over its type; heads not named weigh 1. A list: one weight per head of build_heads(schema, 'all'), in order.
    """
    every = list(build_heads(schema, "all"))
    kind = {h: schema.slot_info[h].type.name for h in every}
    if isinstance(head_weights, (list, tuple)):
        if len(head_weights) != len(every):
            raise DistillError(f"distill.head_weights: {len(head_weights)} weights for {len(every)} heads {every}")
        full = dict(zip(every, map(float, head_weights)))
    else:
        bad = [k for k in head_weights if k not in every and k not in kind.values()]
        if bad:
            raise DistillError(f"distill.head_weights: unknown head {bad[0]!r} (heads: {every}, "
                               f"types: {sorted(set(kind.values()))})")
        full = {h: float(head_weights.get(h, head_weights.get(kind[h], 1.0))) for h in every}
    return {h: full[h] for h in build_heads(schema, heads)}


# ----------------------------------------------------------------------------------------------------------
# 2. Loss (DESIGN §10)

def soften(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """Teacher probabilities at temperature 1 -> at temperature tau: p^(1/tau) / Z, which equals softmax(z / tau)
    of the teacher's (restricted) logits z. A row of zeros (no teacher signal) stays zeros."""
    q = probs.clamp_min(0.0) ** (1.0 / tau)
    return q / q.sum(-1, keepdim=True).clamp_min(1e-30)


def distill_loss(student_logits: dict[str, torch.Tensor], teacher_probs: dict[str, torch.Tensor],
                 gold: torch.Tensor, weights: dict[str, float], tau: float, ce_weight: float):
    """sum_h w_h tau^2 KL(p_T^tau || p_S^tau)_h + ce_weight * CE(student label logits, gold)  (DESIGN §10).

    student_logits {head: (B, C)}; teacher_probs {head: (B, C)} at temperature 1 (softened here, see `soften`),
    a zero row where the teacher gives no signal for that item (it then adds 0 to the batch mean); gold (B,)
    label indices; weights {head: w} (a head missing from it weighs 1; weight 0 skips the head). The KL is a
    mean over the B rows; tau^2 keeps its gradient on the scale of the CE as tau grows (Hinton et al.); the CE
    is at temperature 1 on head 'y'. Returns (loss, parts) with parts {'kl/<head>': float, 'ce/y': float}.
    """
    if tau <= 0:
        raise DistillError(f"distill.tau: must be > 0, got {tau}")
    loss = student_logits["y"].new_zeros(())
    parts = {}
    for head, logits in student_logits.items():
        w = weights.get(head, 1.0)
        if w == 0 or head not in teacher_probs:
            continue
        q = soften(teacher_probs[head].to(logits.dtype), tau)  # (B, C)
        log_ps = F.log_softmax(logits / tau, dim=-1)  # (B, C)
        kl = (torch.xlogy(q, q) - q * log_ps).sum(-1).mean()  # 0 log 0 = 0
        parts[f"kl/{head}"] = kl.item()
        loss = loss + w * tau ** 2 * kl
    if ce_weight:
        ce = F.cross_entropy(student_logits["y"], gold)
        parts["ce/y"] = ce.item()
        loss = loss + ce_weight * ce
    return loss, parts


# ----------------------------------------------------------------------------------------------------------
# 3. Teacher signals: probabilities over each node's verdict words on the teacher's own greedy CoT

def single_token_ids(tokenizer, words) -> list[int]:
    """The one token id of each word as it follows other words (with its leading space: a byte-level BPE keeps
    'Ġmismatch' whole but splits a bare 'mismatch'); a word the tokenizer splits or does not know is a one-line
    error."""
    out = []
    for w in words:
        ids = policy.encode(tokenizer, " " + w, strict=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise DistillError(f"distill: the teacher's tokenizer has no single token for the word {w!r} (got {ids}); "
                             f"node signals are read at one token per verdict/label word")
        out.append(ids[0])
    return out


def node_word_positions(completion: list[int], vocab: data.TagVocab, schema: data.GraphSchema) -> dict[str, int | None]:
    """{node: completion index of its decision word} for the verdict and label nodes of one completion (DESIGN §1
    format: `<f:k> value_q value_p verdict </f:k>`, `<y> label </y>`, a pooled verdict last: the word right before
    the closing tag). A node the CoT does not contain is not in the dict; a broken one maps to None."""
    parsed = data.parse_completion(completion, vocab, schema)
    out = {}
    for name, span in parsed.nodes.items():
        if schema.slot_info[name].type.role in ("verdict", "label"):
            out[name] = None if span.broken else span.end - 2
    return out


def node_targets(completion: list[int], logits: torch.Tensor, vocab: data.TagVocab, schema: data.GraphSchema,
                 verdict_ids: list[int], label_ids: list[int]) -> dict[str, torch.Tensor]:
    """One completion's teacher targets {head: (C,) probabilities} from its logits (len(completion), V), row j
    predicting completion[j]. F head: softmax over the three verdict words' logits at the verdict position,
    'absent' 0; a facet without an F node: 'absent' with probability 1. Y head: softmax over the label words at
    the label position. A broken node, or a position that does not hold one of those words: zeros (no signal)."""
    pos = node_word_positions(completion, vocab, schema)
    out, y = {}, schema.label_slot
    for name, words in (*((n, verdict_ids) for n in verdict_heads(schema)), (y, label_ids)):
        size = len(FACET_CLASSES) if name != y else len(label_ids)
        target = torch.zeros(size)
        j = pos.get(name, "missing")
        if j == "missing" and name != y:
            target[-1] = 1.0
        elif isinstance(j, int) and completion[j] in words:
            target[:len(words)] = torch.softmax(logits[j, words].float(), -1)
        out[name] = target
    return out


@torch.no_grad()
def teacher_signals(model, tokenizer, schema: data.GraphSchema, examples, batch_size: int, max_new_tokens: int,
                    strict: bool, show_progress: bool = True, desc: str = "teacher") -> dict:
    """{'completions': greedy CoT ids per example, 'probs': {head: (N, C)}} (DESIGN §10).

    The CoT is eval.generate_greedy's; the probabilities come from one teacher-forced forward over prompt + that
    CoT (policy.token_logprobs, temperature 1: the teacher's own distribution), restricted to the node's decision
    words and renormalised (node_targets)."""
    vocab = data.TagVocab.from_tokenizer(tokenizer, schema)
    verdict_ids = single_token_ids(tokenizer, data.VERDICTS)
    label_ids = single_token_ids(tokenizer, schema.label_names)
    model.eval()
    completions, rows = [], []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not show_progress):
        batch = examples[i:i + batch_size]
        comps = evaluation.generate_greedy(model, tokenizer, batch, batch_size, max_new_tokens, strict)
        prompts = [policy.encode(tokenizer, data.format_prompt(ex.query, ex.product), strict) for ex in batch]
        ids, attn, comp_mask = policy.build_sequences(prompts, comps, tokenizer.pad_token_id, model.device)
        logits = policy.token_logprobs(model, ids, attn, comp_mask, 1.0, return_hidden=True).logits  # (B, L, V)
        start = ids.shape[1] - max(len(c) for c in comps)  # completion j of every row sits at column start + j
        for b, c in enumerate(comps):
            rows.append(node_targets(c, logits[b, start:start + len(c)].cpu(), vocab, schema, verdict_ids, label_ids))
        completions += comps
    heads = list(rows[0]) if rows else list(build_heads(schema))
    return {"completions": completions, "probs": {h: torch.stack([r[h] for r in rows]) for h in heads}}


def _teacher_fingerprint(path: str) -> list:
    """(file, size, mtime) of the teacher's weights and config: a checkpoint rewritten in place is a new teacher."""
    files = sorted(f for f in os.listdir(path) if f.endswith((".json", ".safetensors", ".bin")))
    return [(f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f))) for f in files]


def signal_cache_key(teacher: str, examples, max_new_tokens: int) -> dict:
    """What the cached signals depend on: the teacher (path + fingerprint), the split's size and content."""
    h = hashlib.sha1()
    for ex in examples:
        h.update(f"{ex.query}\t{ex.product}\n".encode())
    return {"teacher": os.path.abspath(teacher), "fingerprint": _teacher_fingerprint(teacher), "n": len(examples),
            "examples_sha1": h.hexdigest(), "max_new_tokens": max_new_tokens}


def cached_signals(path: str, key: dict, compute) -> dict:
    """torch.load(path) when its key equals `key`, else compute() written there (atomically) with the key."""
    key = json.loads(json.dumps(key))  # tuples -> lists: the stored key compares equal to a fresh one
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            return cached
    out = {**compute(), "key": key}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


# ----------------------------------------------------------------------------------------------------------
# 4. Student: encoder, a head per node type (on its node token or the pooled [CLS] vector), the label head on F -> Y

LABEL_FROM = ("pooled", "verdicts", "both")


class GraphNodeStudent(nn.Module):
    """A Hugging Face encoder (AutoModel) and one head per graph node type (DESIGN §10).

    Every verdict head is linear on the pooled vector: the pooler output (BERT's tanh layer over [CLS]) where the
    encoder has one, else the [CLS] vector. With `node_tokens`, each verdict node has a token of its own, '[<node>]',
    right after [CLS] (node_token); its head reads that token's last hidden state, so each node gathers its own
    facets' words by attention instead of sharing one vector with every other node. The label head reads, by
    `label_from`:
      pooled    the pooled vector, linear (the paper's student: every head on one vector);
      verdicts  the verdict heads' probabilities, concatenated in head order (the graph's F -> Y edges: the label
                node reads the facet nodes' decisions, as the teacher's label reads its own verdicts);
      both      those probabilities and the pooled vector.
    The graph-shaped label head is a two-layer MLP (width hidden_size, GELU): the business rule is a minimum over
    the facets' severity levels, which one linear layer over probabilities only approximates. The label loss
    reaches the encoder through the verdict heads' probabilities too."""

    def __init__(self, encoder, classes: dict[str, list[str]], max_length: int, label_from: str = "pooled",
                 node_token_ids: list[int] | None = None):
        super().__init__()
        self.encoder, self.classes, self.max_length = encoder, dict(classes), max_length
        if label_from not in LABEL_FROM:
            raise DistillError(f"distill.label_from: expected one of {list(LABEL_FROM)}, got {label_from!r}")
        self.label, self.verdicts = list(self.classes)[-1], list(self.classes)[:-1]  # head_classes: the label last
        if label_from != "pooled" and not self.verdicts:
            raise DistillError(f"distill.label_from={label_from}: the label head reads the verdict heads, and this "
                               f"student has none (distill.heads=label_only); use label_from=pooled")
        self.label_from = label_from
        self.node_token_ids = list(node_token_ids or [])  # one per verdict head, in head order; [] = none
        if self.node_token_ids and len(self.node_token_ids) != len(self.verdicts):
            raise DistillError(f"node tokens: {len(self.node_token_ids)} ids for {len(self.verdicts)} verdict heads")
        width = encoder.config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(c)) for name, c in self.classes.items()})
        if label_from != "pooled":
            reads = sum(len(self.classes[v]) for v in self.verdicts) + (width if label_from == "both" else 0)
            self.heads[self.label] = nn.Sequential(nn.Linear(reads, width), nn.GELU(),
                                                   nn.Linear(width, len(self.classes[self.label])))
        self.uses_token_types = getattr(encoder.config, "type_vocab_size", 0) > 1

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> dict[str, torch.Tensor]:
        extra = {"token_type_ids": token_type_ids} if self.uses_token_types and token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        pooled = getattr(out, "pooler_output", None)
        h = pooled if pooled is not None else out.last_hidden_state[:, 0]  # (B, H)
        if self.node_token_ids:  # verdict head i reads position 1 + i (encode_pair puts its token there)
            logits = {name: self.heads[name](out.last_hidden_state[:, 1 + i]) for i, name in enumerate(self.verdicts)}
        else:
            logits = {name: self.heads[name](h) for name in self.verdicts}  # {head: (B, C)}
        if self.label_from == "pooled":
            logits[self.label] = self.heads[self.label](h)
        else:
            reads = [torch.softmax(logits[v], -1) for v in self.verdicts] + ([h] if self.label_from == "both" else [])
            logits[self.label] = self.heads[self.label](torch.cat(reads, -1))  # (B, C_y)
        return logits


def node_token(head: str) -> str:
    """The input token of a verdict node when the student has node tokens: '[f:brand]', '[ms]'."""
    return f"[{head}]"


def build_student_tokenizer(words, extra=()):
    """The policy's word-level tokenizer (policy.build_word_tokenizer) over `words` plus two words [CLS] and
    [SEP], registered as its cls/sep tokens, and the `extra` words (node tokens); pad, unk and mask are the
    policy's."""
    tokenizer = policy.build_word_tokenizer(list(words) + [CLS_TOKEN, SEP_TOKEN, *extra])
    tokenizer.add_special_tokens({"cls_token": CLS_TOKEN, "sep_token": SEP_TOKEN})  # already words: no new ids
    return tokenizer


def build_student(distill_cfg, classes: dict[str, list[str]], words, seed: int = 0):
    """(GraphNodeStudent, tokenizer): from distill.student_init (any local encoder checkpoint with its tokenizer;
    [CLS]/[SEP]/pad added where it lacks them), else a fresh BertModel over the word-level vocabulary of `words`.
    distill.node_tokens adds one token per verdict head (node_token) to the vocabulary; distill.label_from says what
    the label head reads (a label-only student has nothing but the pooled vector to read)."""
    nodes = [node_token(h) for h in list(classes)[:-1]] if getattr(distill_cfg, "node_tokens", False) else []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if distill_cfg.student_init:
            if not os.path.isdir(distill_cfg.student_init):
                raise FileNotFoundError(f"distill.student_init: directory not found: {distill_cfg.student_init}")
            tokenizer = policy._load_tokenizer(distill_cfg.student_init)
            encoder = AutoModel.from_pretrained(distill_cfg.student_init, local_files_only=True)
            missing = {k: v for k, v in (("cls_token", CLS_TOKEN), ("sep_token", SEP_TOKEN))
                       if getattr(tokenizer, k) is None}
            if missing:
                tokenizer.add_special_tokens(missing)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.sep_token
            if nodes:
                tokenizer.add_special_tokens({"additional_special_tokens": nodes})
            if len(tokenizer) > encoder.get_input_embeddings().weight.shape[0]:
                encoder.resize_token_embeddings(len(tokenizer))
        else:
            tokenizer = build_student_tokenizer(words, nodes)
            h = distill_cfg.hidden_size
            config = BertConfig(vocab_size=len(tokenizer), hidden_size=h, num_hidden_layers=distill_cfg.num_layers,
                                num_attention_heads=distill_cfg.num_heads, intermediate_size=4 * h,
                                max_position_embeddings=distill_cfg.max_length, type_vocab_size=2,
                                hidden_dropout_prob=distill_cfg.dropout,
                                attention_probs_dropout_prob=distill_cfg.dropout,
                                pad_token_id=tokenizer.pad_token_id)
            encoder = AutoModel.from_config(config)
        max_length = min(distill_cfg.max_length,
                         getattr(encoder.config, "max_position_embeddings", distill_cfg.max_length))
        label_from = getattr(distill_cfg, "label_from", "pooled") if len(classes) > 1 else "pooled"  # label_only
        model = GraphNodeStudent(encoder, classes, max_length, label_from, tokenizer.convert_tokens_to_ids(nodes))
    return model, tokenizer


def encode_pair(tokenizer, query: str, product: str, max_length: int, strict: bool = False, nodes=()):
    """[CLS] nodes query [SEP] product [SEP] -> (ids, token types 0/1); `nodes`: the node token ids of a student
    with node tokens (GraphNodeStudent.node_token_ids), else none. Too long: the product is cut, then the query."""
    q = policy.encode(tokenizer, query, strict)
    p = policy.encode(tokenizer, product, strict)
    room = max(0, max_length - 3 - len(nodes))
    p = p[:max(0, room - len(q))]
    q = q[:room - len(p)]
    ids = [tokenizer.cls_token_id, *nodes] + q + [tokenizer.sep_token_id] + p + [tokenizer.sep_token_id]
    return ids, [0] * (len(nodes) + len(q) + 2) + [1] * (len(p) + 1)


def collate(encoded, pad_id: int, device=None):
    """[(ids, types)] -> input_ids, attention_mask, token_type_ids, each (B, T), right-padded."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, t) in enumerate(encoded):
        ids[i, :len(x)], types[i, :len(t)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(t), 1
    return ids.to(device), mask.to(device), types.to(device)


def save_student(model: GraphNodeStudent, tokenizer, out_dir: str) -> None:
    """Hugging Face format: the encoder (save_pretrained; its config.json carries `graph_heads`, [[head, [class
    names]], ...] in head order (a list: config.json sorts mapping keys), `graph_max_length`,
    `graph_label_from` and `graph_node_tokens`), the tokenizer, and the heads' weights in graph_heads.pt."""
    os.makedirs(out_dir, exist_ok=True)
    model.encoder.config.graph_heads = [[name, list(c)] for name, c in model.classes.items()]
    model.encoder.config.graph_max_length = model.max_length
    model.encoder.config.graph_label_from = model.label_from
    model.encoder.config.graph_node_tokens = bool(model.node_token_ids)
    model.encoder.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    torch.save(model.heads.state_dict(), os.path.join(out_dir, HEADS_FILE))


def load_student(path: str, device="cpu"):
    """(GraphNodeStudent in eval mode, tokenizer) from a save_student directory, or a student run directory
    holding one as checkpoint/ (what distill.py writes). Its manifest is verified (checkpoint.verify_manifest); a
    directory that cannot be read is a PathError naming it."""
    if not os.path.isfile(os.path.join(path, HEADS_FILE)) and os.path.isfile(os.path.join(path, "checkpoint", HEADS_FILE)):
        path = os.path.join(path, "checkpoint")
    if not os.path.isfile(os.path.join(path, HEADS_FILE)):
        raise FileNotFoundError(f"load_student: {path} has no {HEADS_FILE} (not a distill.py student)")
    verify_manifest(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = policy._load_tokenizer(path)
        heads = {name: c for name, c in config.graph_heads}
        nodes = [node_token(h) for h in list(heads)[:-1]] if getattr(config, "graph_node_tokens", False) else []
        model = GraphNodeStudent(encoder, heads, config.graph_max_length, getattr(config, "graph_label_from", "pooled"),
                                 tokenizer.convert_tokens_to_ids(nodes))
        model.heads.load_state_dict(torch.load(os.path.join(path, HEADS_FILE), weights_only=True))
    except Exception as err:  # noqa: BLE001 (transformers, safetensors and torch.load each raise their own)
        raise load_error(path, "student", err) from None
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def student_probs(model: GraphNodeStudent, tokenizer, pairs, batch_size: int = 256, strict: bool = False):
    """{head: (N, C) probabilities} for (query, product) pairs, batched, one forward per batch."""
    model.eval()
    device = next(model.parameters()).device
    chunks = {name: [] for name in model.classes}
    for i in range(0, len(pairs), batch_size):
        enc = [encode_pair(tokenizer, q, p, model.max_length, strict, model.node_token_ids)
               for q, p in pairs[i:i + batch_size]]
        logits = model(*collate(enc, tokenizer.pad_token_id, device))
        for name, x in logits.items():
            chunks[name].append(torch.softmax(x.float(), -1).cpu())
    return {name: torch.cat(c) if c else torch.zeros(0, len(model.classes[name])) for name, c in chunks.items()}


def score_pairs(model: GraphNodeStudent, tokenizer, pairs, batch_size: int = 256) -> list[dict]:
    """Per (query, product) pair: the label distribution, its argmax, the expected graded relevance
    sum_k k * p(k) (levels 0..K-1, lowest first) and each facet head's distribution. No generation."""
    probs = student_probs(model, tokenizer, list(pairs), batch_size)
    y = list(model.classes)[-1]  # the label head comes last (head_classes)
    names = model.classes[y]
    levels = torch.arange(len(names), dtype=torch.float32)
    out = []
    for i in range(len(probs[y])):
        py = probs[y][i]
        out.append({"label": int(py.argmax()), "label_name": names[int(py.argmax())],
                    "relevance": float((py * levels).sum()),
                    "label_probs": dict(zip(names, py.tolist())),
                    "facets": {h.split(":")[-1]: dict(zip(model.classes[h], probs[h][i].tolist()))
                               for h in model.classes if h != y}})
    return out


# ----------------------------------------------------------------------------------------------------------
# 5. Training and the student-vs-teacher report

def student_metrics(examples, probs: dict[str, torch.Tensor], schema: data.GraphSchema, teacher: dict | None = None,
                    vocab: data.TagVocab | None = None) -> dict:
    """Label metrics (eval.summarize_predictions), per-node accuracy against gold (facets the query asks for,
    as eval.score_completions counts the teacher's), long-tail facet accuracy and accuracy per long-tail kind,
    and with `teacher` signals: agreement with the teacher's label (its parsed CoT label) and facet classes."""
    y = schema.label_slot
    gold = [ex.label for ex in examples]
    pred = probs[y].argmax(-1).tolist()
    out = evaluation.summarize_predictions(gold, pred, len(schema.label_names), list(schema.label_names))
    cls = {h: probs[h].argmax(-1).tolist() for h in probs if h != y}
    hits: dict[str, list[int]] = {}
    lt_hits, by_kind = [], {}
    for i, ex in enumerate(examples):
        for h in cls:
            g = data.gold_node(h, ex, schema)
            if g is not None:
                hits.setdefault(h, []).append(int(FACET_CLASSES[cls[h][i]] == g))
        hits.setdefault(y, []).append(int(pred[i] == ex.label))
        kind = ex.meta.get("longtail")
        if kind:
            h = next((h for h in cls if ex.meta["longtail_facet"] in schema.slot_info[h].facets), None)
            if h is not None:
                lt_hits.append(int(FACET_CLASSES[cls[h][i]] == data.gold_node(h, ex, schema)))
            by_kind.setdefault(kind, []).append(int(pred[i] == ex.label))
    out["node_accuracy"] = {k: sum(v) / len(v) for k, v in hits.items()}
    if lt_hits:
        out["longtail_facet_accuracy"] = sum(lt_hits) / len(lt_hits)
    if by_kind:
        out["accuracy_by_longtail_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    if teacher is not None:
        t_labels = [data.parse_completion(c, vocab, schema) for c in teacher["completions"]]
        t_labels = [p.label if p.valid else None for p in t_labels]
        out["agreement/label"] = sum(t is not None and t == y for t, y in zip(t_labels, pred)) / max(1, len(pred))
        agree = []
        for h, c in cls.items():
            t = teacher["probs"][h]
            has = t.sum(-1) > 0  # rows with a teacher signal
            agree += (t.argmax(-1)[has] == torch.tensor(c)[has]).int().tolist()
        if agree:
            out["agreement/facets"] = sum(agree) / len(agree)
    return out


def report_table(teacher: dict, student: dict, heads: list[str]) -> str:
    """Markdown: per test split, a teacher row and a student row, with the node accuracy of the verdict `heads`."""
    rows = []
    for split in student:
        for who, m in (("teacher", teacher[split]), ("student", student[split])):
            row = {"split": split, "model": who, "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
            row.update({f"node/{k}": v for k, v in m["node_accuracy"].items() if k in heads})
            row["longtail_facet_acc"] = m.get("longtail_facet_accuracy")
            row["agree_label"] = m.get("agreement/label")
            row["agree_facets"] = m.get("agreement/facets")
            rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return evaluation.format_table(rows, cols)


def resolve_teacher(cfg) -> str:
    """distill.teacher, else <run.out_dir>/checkpoint (the RL policy), else <run.out_dir>/sft/checkpoint; checked
    (checkpoint.check_model_dir: its manifest verifies) even when its signals are cached and it is not loaded."""
    if cfg.distill.teacher:
        check_model_dir(cfg.distill.teacher, "distill.teacher")
        return cfg.distill.teacher
    for path in (os.path.join(cfg.run.out_dir, "checkpoint"), os.path.join(cfg.run.out_dir, "sft", "checkpoint")):
        if os.path.isdir(path):
            check_model_dir(path, "teacher")
            return path
    raise FileNotFoundError(f"distill: no teacher: neither {cfg.run.out_dir}/checkpoint nor "
                            f"{cfg.run.out_dir}/sft/checkpoint exists (run graph_grpo.py or sft_mask.py first, "
                            f"or set --distill.teacher=PATH)")


def run_distill(cfg, show_progress: bool = True, print_table: bool = True) -> dict:
    """Teacher signals (cached) -> student training -> save -> student vs teacher on every test split.
    Returns {'teacher': {split: metrics}, 'student': {split: metrics}} (also written to eval.json)."""
    torch.manual_seed(cfg.run.seed)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    device = policy.resolve_device(cfg.run.device)
    dc = cfg.distill
    teacher_path = resolve_teacher(cfg)
    cache_dir = os.path.join(cfg.run.out_dir, "student")
    out_dir = dc.student_dir or cache_dir
    task = testbed.load_task(cfg)
    schema, splits, strict = task.schema, task.splits, task.strict
    classes = head_classes(schema, dc.heads)
    weights = resolve_head_weights(dc.head_weights, schema, dc.heads)
    make_run_dir(out_dir, "distill.student_dir" if dc.student_dir else "run.out_dir")
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    for key in ("val_items", "eval_every"):
        if getattr(dc, key) < 0:
            raise DistillError(f"distill.{key}: must be >= 0, got {getattr(dc, key)}")
    pool = splits["rl"]
    if dc.val_items >= len(pool):
        raise DistillError(f"distill.val_items: {dc.val_items} held out of an RL pool of {len(pool)} prompts "
                           f"leaves none to train on")
    val = pool[len(pool) - dc.val_items:] if dc.val_items else []  # never trained on
    pool = pool[:len(pool) - dc.val_items]
    train = pool[:dc.max_train] if dc.max_train else pool
    tests = {s: v[:cfg.eval.max_items] if cfg.eval.max_items else v for s, v in task.tests.items()}

    # teacher signals: loaded lazily, only for the splits whose cache is missing or stale
    teacher_state = {}

    def signals(split, examples):
        def compute():
            if "model" not in teacher_state:
                teacher_state["model"], teacher_state["tok"] = policy.load_policy(
                    teacher_path, schema.words(), dtype=cfg.run.dtype, device=device, key="teacher")
            with policy.autocast(cfg.run.dtype, device):
                return teacher_signals(teacher_state["model"], teacher_state["tok"], schema, examples,
                                       cfg.eval.batch_size, cfg.eval.max_new_tokens, strict, show_progress,
                                       desc=f"teacher signals {split}")
        key = signal_cache_key(teacher_path, examples, cfg.eval.max_new_tokens)
        return cached_signals(os.path.join(cache_dir, f"teacher_signals_{split}.pt"), key, compute)

    train_sig = signals("rl", train)
    test_sig = {s: signals(s, exs) for s, exs in tests.items()}
    vocab = data.TagVocab.from_tokenizer(teacher_state["tok"], schema) if "tok" in teacher_state else \
        data.TagVocab.from_tokenizer(policy._load_tokenizer(teacher_path), schema)
    teacher_state.clear()

    # student
    model, tokenizer = build_student(dc, classes, task.vocabulary(), seed=cfg.run.seed)
    model.to(device).train()
    s_strict = strict and not dc.student_init
    encoded = [encode_pair(tokenizer, ex.query, ex.product, model.max_length, s_strict, model.node_token_ids)
               for ex in train]
    targets = {h: train_sig["probs"][h] for h in classes}
    gold = torch.tensor([ex.label for ex in train])
    opt = policy.adamw(model.parameters(), dc.lr)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    log = open(os.path.join(out_dir, "metrics.jsonl"), "w")
    bar = tqdm(range(dc.steps), desc=f"distill ({dc.heads})", disable=not show_progress)
    val_pairs = [(ex.query, ex.product) for ex in val]

    def validate():  # label and node metrics against gold on the held-out prompts
        m = student_metrics(val, student_probs(model, tokenizer, val_pairs, 256, s_strict), schema)
        model.train()
        return {"val/accuracy": m["accuracy"], "val/macro_f1": m["macro_f1"],
                **{f"val/node/{k}": v for k, v in m["node_accuracy"].items()}}

    t0 = time.time()
    for step in bar:
        idx = torch.randint(len(encoded), (dc.batch_size,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, dc.steps, dc.warmup, dc.lr)
        logits = model(*collate([encoded[i] for i in idx.tolist()], tokenizer.pad_token_id, device))
        loss, parts = distill_loss(logits, {h: t[idx].to(device) for h, t in targets.items()}, gold[idx].to(device),
                                   weights, dc.tau, dc.label_ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = step == dc.steps - 1
        if step % cfg.run.log_every == 0 or last or (val and dc.eval_every and (step + 1) % dc.eval_every == 0):
            row = {"step": step, "loss": loss.item(), **parts, "lr": opt.param_groups[0]["lr"], "time": time.time() - t0}
            if val and (last or (dc.eval_every and (step + 1) % dc.eval_every == 0)):
                row.update(validate())
                bar.set_postfix(loss=f"{loss.item():.3f}", val_f1=f"{row['val/macro_f1']:.3f}")
            else:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            log.write(json.dumps(row) + "\n")
            log.flush()
    log.close()
    model.eval()
    save_atomically(os.path.join(out_dir, "checkpoint"), lambda d: save_student(model, tokenizer, d))

    # report: the teacher's metrics are eval.score_completions on the same greedy CoTs eval.evaluate_policy makes
    comparator = task.comparator
    results = {"teacher": {}, "student": {}}
    for s, exs in tests.items():
        results["teacher"][s] = evaluation.score_completions(exs, test_sig[s]["completions"], vocab, schema, comparator)
        probs = student_probs(model, tokenizer, [(ex.query, ex.product) for ex in exs], 256, s_strict)
        results["student"][s] = student_metrics(exs, probs, schema, test_sig[s], vocab)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    if print_table:
        print(f"teacher {teacher_path}; student ({dc.heads}) saved to {out_dir}")
        print(report_table(results["teacher"], results["student"], verdict_heads(schema)))
    return results


# ----------------------------------------------------------------------------------------------------------
# 6. Serving: python distill.py score PAIRS.jsonl > OUT.jsonl

DEFAULT_STUDENT = "configs/base.yaml"


def read_pairs(path: str) -> list[dict]:
    """Every (query, product) pair of a JSONL file (path, or '-' for stdin), validated before any is scored: one
    JSON object per non-blank line with non-empty strings `query` and `product` and, optionally, an `id` (string
    or integer) that the output repeats; other fields (a test split's `label`, `cot`, ...) are ignored. The first
    bad line raises data.DataError naming file:line and the field, as data.load_jsonl does."""
    name = "<stdin>" if path == "-" else path
    if path != "-" and not os.path.exists(path):
        raise data.DataError(f"{path}: no such file")
    out = []
    f = sys.stdin.buffer if path == "-" else open(path, "rb")
    try:
        for n, raw in enumerate(f, 1):
            where = f"{name}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise data.DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise data.DataError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise data.DataError(f"{where}: expected a JSON object with 'query' and 'product', "
                                     f"got {type(obj).__name__}")
            for key in ("query", "product"):
                if key not in obj:
                    raise data.DataError(f"{where}: missing field '{key}'")
                if not isinstance(obj[key], str):
                    raise data.DataError(f"{where}: field '{key}' must be str, got {obj[key]!r:.40}")
                if not obj[key].strip():
                    raise data.DataError(f"{where}: field '{key}' is empty")
            if "id" in obj and (not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool)):
                raise data.DataError(f"{where}: field 'id' must be a string or an integer, got {obj['id']!r:.40}")
            out.append({k: obj[k] for k in ("id", "query", "product") if k in obj})
    finally:
        if path != "-":
            f.close()
    if not out:
        raise data.DataError(f"{name}: empty file (no pairs)")
    return out


def resolve_student(spec: str) -> str:
    """--student: a student directory (what distill.py writes, or a save_student directory), or a config file
    (*.yaml): that config's student, distill.student_dir or else <run.out_dir>/student."""
    if spec.endswith((".yaml", ".yml")):
        from config import load_config
        cfg = load_config(spec)
        path = cfg.distill.student_dir or os.path.join(cfg.run.out_dir, "student")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--student {spec}: its student {path} does not exist "
                                    f"(train it: python distill.py {spec})")
        return path
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--student: directory not found: {spec}")
    return spec


def score_file(pairs_path: str, student: str = DEFAULT_STUDENT, batch_size: int = 256, device: str = "cpu",
               out=None, err=None) -> dict:
    """Score every pair of `pairs_path` with the student (resolve_student), batched; one JSON line per pair, in
    input order, to `out` (stdout): {'id' (when the input has one), 'label', 'label_name', 'relevance',
    'label_probs', 'facets'} as score_pairs gives them. Prints the rate to `err` (stderr) and returns
    {'pairs', 'seconds', 'pairs_per_s', 'student'}; the time is the scoring alone (tokenising, forward, writing),
    not the loading."""
    out, err = out or sys.stdout, err or sys.stderr
    if batch_size < 1:
        raise DistillError(f"--batch-size: must be >= 1, got {batch_size}")
    rows = read_pairs(pairs_path)
    path = resolve_student(student)
    try:
        dev = policy.resolve_device(device)
    except ValueError as e:
        raise DistillError(f"--device {device}: {e}") from None
    model, tokenizer = load_student(path, dev)
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        scored = score_pairs(model, tokenizer, [(r["query"], r["product"]) for r in batch], batch_size)
        for r, s in zip(batch, scored):
            out.write(json.dumps({"id": r["id"], **s} if "id" in r else s) + "\n")
    out.flush()
    dt = time.perf_counter() - t0
    rate = len(rows) / max(dt, 1e-9)
    print(f"scored {len(rows)} pairs in {dt:.2f} s: {rate:.0f} pairs/s (student {path}, batch {batch_size}, "
          f"device {next(model.parameters()).device}, {torch.get_num_threads()} threads)", file=err, flush=True)
    return {"pairs": len(rows), "seconds": dt, "pairs_per_s": rate, "student": path}


def score_main(argv: list[str]) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="distill.py score", description="Label (query, product) pairs with a "
                                 "distilled student: one JSON line per pair on stdout, the rate on stderr.")
    ap.add_argument("pairs", help="JSONL, one {'query': ..., 'product': ...} per line (optional 'id'); '-': stdin")
    ap.add_argument("--student", default=DEFAULT_STUDENT,
                    help="student directory, or a config file whose student to use (default: %(default)s, "
                         "i.e. runs/base/student)")
    ap.add_argument("--batch-size", type=int, default=256, help="pairs per forward (default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cli(lambda: score_file(args.pairs, args.student, args.batch_size, args.device), DistillError)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    cfg, _ = parse_args(argv)
    cli(lambda: run_distill(cfg), DistillError)


if __name__ == "__main__":
    main()
