"""Data for Graph-GRPO: the reasoning graph, the CoT format and its parser, the business rule, local
verifiers, the JSONL format, and a seeded synthetic relevance testbed (DESIGN.md §1-3).

Read in this order:
  1. GraphSchema            the node types and edge types, from the config (DESIGN §1)
  2. business rule          label from facet verdicts, and which facets the label depends on (§2, §4 gate)
  3. CoT serialiser/parser  one tagged span per node; the parser never raises (§1)
  4. verifiers              grounding and comparator scores, kept separate (§3)
  5. JSONL                  one example per line, validated with file:line:field errors (§2)
  6. synthetic catalogue    facets with hierarchy / aliases / synonyms / units, splits sft/rl/test (§2)
  7. WANDS                  real relevance pairs -> JSONL (label-only tests), a catalogue built from WANDS (§2)

The CoT of one example, e.g.
  <q> category running_shoes brand nike color red </q> <p> category running_shoes brand adidas color black </p>
  <f:category> running_shoes running_shoes match </f:category> <f:brand> nike adidas mismatch </f:brand>
  <f:color> red black mismatch </f:color> <y> mismatch </y>
Understanding nodes list (facet value) pairs copied from the input; a facet node first copies the two values it
compares, then gives its verdict (copy-then-compare: small models learn it, DESIGN §1).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

VERDICTS = ("match", "partial", "mismatch")
LABEL_NAMES = ("irrelevant", "mismatch", "related", "excellent")  # 0..3, DESIGN §0
FACETS = ("category", "brand", "color", "size")
PROMPT_TAGS = ("<query>", "</query>", "<product>", "</product>")


# ----------------------------------------------------------------------------------------------------------
# 1. Reasoning graph schema (DESIGN §1)

@dataclass(frozen=True)
class GraphSchema:
    """Node types and edge types of the reasoning graph.

    Node kinds: 'q' (query understanding), 'p' (product understanding), 'f' (one node per facet the query
    mentions, named 'f:<facet>'), 'y' (the label, the sink). Edge types are (parent kind, child kind) pairs;
    every instance edge of one type shares one coefficient alpha_e (DESIGN §4). Any DAG over the kinds works.
    """
    facets: tuple[str, ...] = FACETS
    edge_kinds: tuple[tuple[str, str], ...] = (("q", "f"), ("p", "f"), ("f", "y"))
    label_names: tuple[str, ...] = LABEL_NAMES
    label_rule: tuple[int, ...] = (0, 1, 2, 3)  # rule level (label_from_verdicts) -> label index

    @classmethod
    def from_config(cls, graph_cfg, label_names: Sequence[str] = LABEL_NAMES,
                    label_rule: Sequence[int] = ()) -> "GraphSchema":
        kinds = set(getattr(graph_cfg, "nodes", ("q", "p", "f", "y")))
        edges = tuple(tuple(e) for e in graph_cfg.edges)
        for e in edges:
            if len(e) != 2 or e[0] not in kinds or e[1] not in kinds or e[0] == e[1]:
                raise ValueError(f"graph.edges: bad edge {list(e)} (node kinds are {sorted(kinds)})")
        schema = cls(facets=tuple(graph_cfg.facets), edge_kinds=edges, label_names=tuple(label_names),
                     label_rule=check_label_rule(label_rule, len(label_names)))
        schema.kind_order()  # raises on a cycle
        return schema

    @property
    def edge_type_names(self) -> list[str]:
        return [f"{a}->{b}" for a, b in self.edge_kinds]

    @property
    def slots(self) -> list[str]:
        """All node names of the union graph, in a topological order (parents before children)."""
        names = {"q": ["q"], "p": ["p"], "f": [f"f:{k}" for k in self.facets], "y": ["y"]}
        return [n for kind in self.kind_order() for n in names[kind]]

    def kind_order(self) -> list[str]:
        """Topological order of the node kinds under edge_kinds (raises on a cycle)."""
        kinds = ["q", "p", "f", "y"]
        indeg = {k: 0 for k in kinds}
        for a, b in self.edge_kinds:
            indeg[b] += 1
        order, ready = [], [k for k in kinds if indeg[k] == 0]
        while ready:
            k = ready.pop(0)
            order.append(k)
            for a, b in self.edge_kinds:
                if a == k:
                    indeg[b] -= 1
                    if indeg[b] == 0:
                        ready.append(b)
        if len(order) != len(kinds):
            raise ValueError(f"graph.edges: the edge kinds {self.edge_type_names} contain a cycle")
        return order

    def parents(self) -> tuple[list[list[int]], list[list[int]]]:
        """Per slot, its parent slots and the edge-type index of each parent edge (union graph)."""
        slots = self.slots
        kind = [s.split(":")[0] for s in slots]
        parents, etypes = [[] for _ in slots], [[] for _ in slots]
        for e, (a, b) in enumerate(self.edge_kinds):
            for u, ku in enumerate(slots):
                if kind[u] != b:
                    continue
                for v, kv in enumerate(slots):
                    # facet-to-facet edges connect the same facet only
                    if kind[v] == a and not (a == "f" and b == "f" and kv != ku):
                        parents[u].append(v)
                        etypes[u].append(e)
        return parents, etypes

    def tags(self) -> list[str]:
        out = []
        for s in self.slots:
            out += [f"<{s}>", f"</{s}>"]
        return out

    def words(self) -> list[str]:
        """Fixed words of the format (tags, facet names, verdicts, labels): part of every vocabulary."""
        return list(PROMPT_TAGS) + self.tags() + list(self.facets) + list(VERDICTS) + list(self.label_names)


# ----------------------------------------------------------------------------------------------------------
# 2. Business rule (DESIGN §2): the label from the facet verdicts, and the instance gate (DESIGN §4)

PRIMARY_HARD = ("brand", "size")  # a mismatch on these makes the product a "mismatch" (label 1)


def label_from_verdicts(verdicts: dict[str, str], rule: Sequence[int] | None = None) -> int:
    """The fixed business rule. Facets the query does not mention impose nothing (count as match).

    category mismatch -> 0 irrelevant; brand or size mismatch -> 1 mismatch;
    any other mismatch (colour) or any partial -> 2 related; all match -> 3 excellent.
    `rule` (GraphSchema.label_rule) maps these four levels onto a coarser label scale; None: the levels.
    """
    if verdicts.get("category") == "mismatch":
        level = 0
    elif any(verdicts.get(f) == "mismatch" for f in PRIMARY_HARD):
        level = 1
    elif any(v in ("mismatch", "partial") for v in verdicts.values()):
        level = 2
    else:
        level = 3
    return level if rule is None else rule[level]


def check_label_rule(rule: Sequence[int], num_labels: int) -> tuple[int, ...]:
    """data.label_rule checked against the label scale: the rule's 4 levels -> label indices, non-decreasing
    and onto 0..num_labels-1 (every label reachable, order kept). Empty: the identity, for 4 labels only.

    WANDS (3 grades) uses [0, 1, 1, 2]: a product of the wrong kind (category mismatch) is Irrelevant, every
    product of the right kind that misses some facet (brand/size or a secondary facet, or a partial) is
    Partial, and a full match is Exact, as in the WANDS guidelines (a king bed for "queen bed" is Partial).
    """
    rule = tuple(rule) or (tuple(range(4)) if num_labels == 4 else ())
    if len(rule) != 4:
        raise ValueError(f"data.label_rule: {num_labels} label names need a rule of 4 entries (one per business-rule "
                         f"level 0..3), got {list(rule)}")
    if (any(not isinstance(x, int) or isinstance(x, bool) for x in rule) or list(rule) != sorted(rule)
            or set(rule) != set(range(num_labels))):
        raise ValueError(f"data.label_rule: {list(rule)} must be non-decreasing and use every label 0..{num_labels - 1}")
    return rule


def label_dependence(verdicts: dict[str, str], rule: Sequence[int] | None = None) -> dict[str, bool]:
    """Instance gate g for the F_k -> Y edges (DESIGN §4): would changing facet k's verdict, all others fixed,
    change the label under the rule? A category mismatch masks every other facet, for example."""
    base = label_from_verdicts(verdicts, rule)
    out = {}
    for k in verdicts:
        out[k] = any(label_from_verdicts({**verdicts, k: v}, rule) != base for v in VERDICTS if v != verdicts[k])
    return out


# ----------------------------------------------------------------------------------------------------------
# 3. CoT serialiser and parser (DESIGN §1)

def format_prompt(query: str, product: str) -> str:
    return f"<query> {query} </query> <product> {product} </product>"


def serialize_cot(cot: dict[str, str], schema: GraphSchema) -> str:
    """Gold node contents {node name: content text} -> completion text, nodes in schema order."""
    parts = [f"<{s}> {cot[s]} </{s}>" for s in schema.slots if s in cot]
    return " ".join(parts)


def cot_from_parts(q: dict[str, str], p: dict[str, str], verdicts: dict[str, str], label: int,
                   schema: GraphSchema) -> dict[str, str]:
    """Node contents from the facet values the query asks for (q), the product's values (p), the verdicts."""
    order = [k for k in schema.facets if k in q]
    cot = {"q": " ".join(f"{k} {q[k]}" for k in order), "p": " ".join(f"{k} {p[k]}" for k in order)}
    for k in order:
        cot[f"f:{k}"] = f"{q[k]} {p[k]} {verdicts[k]}"
    cot["y"] = schema.label_names[label]
    return cot


@dataclass
class NodeSpan:
    start: int                 # index of the opening tag in the completion tokens
    end: int                   # one past the closing tag
    words: list[str]           # content words between the tags
    content: object = None     # parsed content (see parse_node_content); None when broken
    broken: str = ""           # why the content does not parse ("" when it does)


@dataclass
class ParsedCoT:
    """What the parser found in one completion. Never raised on; garbage gives valid=False."""
    nodes: dict[str, NodeSpan] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    valid: bool = False
    label: int | None = None               # parsed label index, None if the y node is missing/broken
    verdicts: dict[str, str] = field(default_factory=dict)   # facet -> verdict of the well-formed F nodes
    label_rule: tuple[int, ...] | None = None                 # the schema's label scale (None: 4 levels)

    @property
    def consistent(self) -> bool:
        """The label follows from the rollout's own facet verdicts under the rule (faithfulness, DESIGN §3)."""
        return self.valid and self.label == label_from_verdicts(self.verdicts, self.label_rule)


class TagVocab:
    """Maps token ids to tags and decodes content ids; built once from a tokenizer."""

    def __init__(self, id_to_tag: dict[int, str], decode: Callable[[list[int]], str], eos_id: int | None):
        self.id_to_tag, self.decode, self.eos_id = id_to_tag, decode, eos_id

    @classmethod
    def from_tokenizer(cls, tokenizer, schema: GraphSchema) -> "TagVocab":
        id_to_tag = {}
        for t in schema.tags():
            i = tokenizer.convert_tokens_to_ids(t)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no single token for tag {t!r}; use policy.add_graph_tokens")
            id_to_tag[i] = t
        return cls(id_to_tag, lambda ids: tokenizer.decode(ids), tokenizer.eos_token_id)


def parse_node_content(name: str, words: list[str], schema: GraphSchema):
    """Content of one node from its words -> (content, problem). Content per kind:
    q/p: dict facet -> value; f:k: (value_q, value_p, verdict); y: label index."""
    kind = name.split(":")[0]
    if kind in ("q", "p"):
        out, key = {}, None
        for w in words:
            if w in schema.facets:
                if w in out:
                    return None, f"{name}: facet {w!r} twice"
                key, out[w] = w, ""
            elif key is None:
                return None, f"{name}: value {w!r} before any facet name"
            else:
                out[key] = (out[key] + " " + w).strip()
        if not out or any(v == "" for v in out.values()):
            return None, f"{name}: empty or missing value"
        return out, ""
    if kind == "f":
        if len(words) < 3 or words[-1] not in VERDICTS:
            return None, f"{name}: expected 'value value verdict'"
        vals = words[:-1]
        half = len(vals) // 2
        return (" ".join(vals[:half]), " ".join(vals[half:]), words[-1]), ""
    if kind == "y":
        if len(words) != 1 or words[0] not in schema.label_names:
            return None, f"{name}: expected one label word"
        return schema.label_names.index(words[0]), ""
    return None, f"{name}: unknown node kind"


def parse_completion(ids: Sequence[int], vocab: TagVocab, schema: GraphSchema) -> ParsedCoT:
    """Token ids of a completion -> node spans (token index ranges) and contents (DESIGN §1).

    Never raises. Spans are [start, end) over `ids` and include both tags. Problems (missing, duplicated,
    unclosed or nested nodes, content that does not parse) are listed; `valid` means q, p and y parse, every
    F node parses, and the F nodes are exactly the facets of the rollout's own q node.
    """
    out = ParsedCoT(label_rule=schema.label_rule)
    ids = list(ids)
    if vocab.eos_id is not None and vocab.eos_id in ids:
        ids = ids[: ids.index(vocab.eos_id)]
    slots = set(schema.slots)
    open_name, open_at = None, -1
    for t, i in enumerate(ids):
        tag = vocab.id_to_tag.get(int(i))
        if tag is None:
            continue
        closing = tag.startswith("</")
        name = tag[2:-1] if closing else tag[1:-1]
        if name not in slots:
            continue
        if not closing:
            if open_name is not None:
                out.problems.append(f"{open_name}: not closed before <{name}>")
            open_name, open_at = name, t
            continue
        if open_name != name:
            out.problems.append(f"{name}: closed without being opened")
            open_name = None
            continue
        open_name = None
        if name in out.nodes:
            out.problems.append(f"{name}: appears twice")
            out.nodes[name].broken = "duplicated"
            continue
        words = vocab.decode(ids[open_at + 1: t]).split()
        content, problem = parse_node_content(name, words, schema)
        out.nodes[name] = NodeSpan(open_at, t + 1, words, content, problem)
        if problem:
            out.problems.append(problem)
    if open_name is not None:
        out.problems.append(f"{open_name}: not closed")
    for name in ("q", "p", "y"):
        if name not in out.nodes:
            out.problems.append(f"{name}: missing")
    ok = lambda n: n in out.nodes and not out.nodes[n].broken  # noqa: E731
    for name, span in out.nodes.items():
        if name.startswith("f:") and not span.broken:
            out.verdicts[name[2:]] = span.content[2]
    if ok("y"):
        out.label = out.nodes["y"].content
    asked = set(out.nodes["q"].content) if ok("q") else None
    have = {n[2:] for n in out.nodes if n.startswith("f:")}
    if asked is not None and have != asked:
        out.problems.append(f"facet nodes {sorted(have)} != facets of q {sorted(asked)}")
    out.valid = (not out.problems) and ok("q") and ok("p") and ok("y")
    return out


def node_keys(parsed: ParsedCoT, with_values: bool = False) -> dict[str, object]:
    """Canonical content key of every well-formed node (DESIGN §4): a key must repeat within a group, so
    q/p: the set of (facet, value) pairs; f: the verdict (optionally with the value pair); y: the label."""
    keys = {}
    for name, span in parsed.nodes.items():
        if span.broken:
            continue
        kind = name.split(":")[0]
        if kind in ("q", "p"):
            keys[name] = tuple(sorted(span.content.items()))
        elif kind == "f":
            keys[name] = span.content if with_values else span.content[2]
        else:
            keys[name] = span.content
    return keys


def node_is_correct(name: str, parsed: ParsedCoT, ex: "Example", schema: GraphSchema) -> bool | None:
    """Is node `name` of a parsed CoT right against the gold annotation (None where there is no gold)?
    q/p: the same (facet, value) pairs as the gold CoT; f:k: the gold verdict; y: the gold label."""
    got = parsed.nodes.get(name)
    kind = name.split(":")[0]
    gold = (ex.cot or {}).get(name) if kind in ("q", "p") else (ex.nodes or {}).get(name[2:]) if kind == "f" else ex.label
    if gold is None:
        return None
    if got is None or got.broken:
        return False
    if kind in ("q", "p"):
        return got.content == parse_node_content(name, gold.split(), schema)[0]
    if kind == "f":
        return got.content[2] == gold
    return got.content == gold


# ----------------------------------------------------------------------------------------------------------
# 4. Local verifiers (DESIGN §3): grounding and comparator scores, kept separate

SCORE_KINDS = ("grounding", "comparator")


def verifier_scores(parsed: ParsedCoT, query: str, product: str, comparator: Callable[[str, str, str], str],
                    schema: GraphSchema) -> dict[str, tuple[float, float]]:
    """Per well-formed node: (grounding, comparator) in [0, 1], NaN where a kind does not apply.

    grounding  q/p: share of listed values that occur in the query / product text; f: both copied values equal
               the rollout's own q/p values for that facet.
    comparator f: the verdict equals the verifier's comparator on the copied values; y: rule adherence (the
               label follows from the rollout's own verdicts). The comparator knows head surface forms only,
               so it is wrong on synonyms/aliases/units it has not been told about, like a real heuristic.
    """
    nan = float("nan")
    qw, pw = set(query.split()), set(product.split())
    out = {}
    for name, span in parsed.nodes.items():
        if span.broken:
            continue
        kind = name.split(":")[0]
        if kind in ("q", "p"):
            words = qw if kind == "q" else pw
            vals = list(span.content.values())
            out[name] = (sum(all(w in words for w in v.split()) for v in vals) / len(vals), nan)
        elif kind == "f":
            facet = name[2:]
            vq, vp, verdict = span.content
            q = parsed.nodes.get("q")
            p = parsed.nodes.get("p")
            grounded = (q is not None and not q.broken and q.content.get(facet) == vq
                        and p is not None and not p.broken and p.content.get(facet) == vp)
            out[name] = (float(grounded), float(comparator(facet, vq, vp) == verdict))
        else:
            out[name] = (nan, float(parsed.label == label_from_verdicts(parsed.verdicts, schema.label_rule)))
    return out


# ----------------------------------------------------------------------------------------------------------
# 5. JSONL examples (DESIGN §2)

@dataclass
class Example:
    """One (query, product) pair. `cot`: gold node contents {node name: text} (SFT); `nodes`: gold facet
    verdicts {facet: verdict}; `meta`: free-form (the generator records long-tail kinds here)."""
    query: str
    product: str
    label: int
    id: str = ""
    cot: dict[str, str] | None = None
    nodes: dict[str, str] | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"id": self.id, "query": self.query, "product": self.product, "label": self.label}
        for k in ("cot", "nodes"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.meta:
            d["meta"] = self.meta
        return d


class DataError(ValueError):
    """Bad input data; the message is one line naming file:line and the field."""


def parse_example(obj, where: str, num_labels: int, schema: GraphSchema | None = None) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, typ in (("query", str), ("product", str), ("label", int)):
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}'")
        if not isinstance(obj[key], typ) or isinstance(obj[key], bool):
            raise DataError(f"{where}: field '{key}' must be {typ.__name__}, got {obj[key]!r:.40}")
    if not obj["query"].strip() or not obj["product"].strip():
        raise DataError(f"{where}: field '{'query' if not obj['query'].strip() else 'product'}' is empty")
    if not 0 <= obj["label"] < num_labels:
        raise DataError(f"{where}: field 'label' = {obj['label']} out of range 0..{num_labels - 1}")
    cot, nodes = obj.get("cot"), obj.get("nodes")
    if cot is not None:
        if not isinstance(cot, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cot.items()):
            raise DataError(f"{where}: field 'cot' must map node names to text")
        if schema is not None:
            bad = [k for k in cot if k not in schema.slots]
            if bad:
                raise DataError(f"{where}: field 'cot' has unknown node {bad[0]!r} (nodes: {schema.slots})")
            for k in ("q", "p", "y"):
                if k not in cot:
                    raise DataError(f"{where}: field 'cot' lacks node '{k}'")
            if cot["y"] != schema.label_names[obj["label"]]:
                raise DataError(f"{where}: field 'cot.y' = {cot['y']!r} disagrees with label {obj['label']}")
    if nodes is not None:
        if not isinstance(nodes, dict) or not all(v in VERDICTS for v in nodes.values()):
            raise DataError(f"{where}: field 'nodes' must map facets to one of {list(VERDICTS)}")
    return Example(query=obj["query"], product=obj["product"], label=obj["label"], id=str(obj.get("id", "")),
                   cot=cot, nodes=nodes, meta=obj.get("meta") or {})


def load_jsonl(path: str, num_labels: int = 4, schema: GraphSchema | None = None) -> list[Example]:
    """Load and validate every line; the first bad line raises DataError naming path:line and the field."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: bad JSON ({e.msg} at column {e.colno})") from None
            out.append(parse_example(obj, f"{path}:{n}", num_labels, schema))
    if not out:
        raise DataError(f"{path}: empty file (no examples)")
    return out


def write_jsonl(path: str, examples: Iterable[Example]) -> None:
    """Atomic write: a half-written data file must never be mistaken for a complete one. The temporary name is
    per process: concurrent runs that generate the same missing split write identical files, the last one wins."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# 6. Synthetic catalogue and testbed (DESIGN §2)
#
# Every facet value has a head surface form and long-tail forms. A long-tail form is 'rare' (it may appear in
# the SFT split with probability data.longtail_in_sft) or 'unseen' (never in SFT): a wrong verdict on a rare
# synonym is an error sampling can fix; an alias the policy never saw is the harder kind.

CATEGORY_TREE = {  # domain -> group -> leaves; a query may name a leaf or a group (hierarchy)
    "footwear": {"shoes": ["running_shoes", "sneakers", "hiking_boots"], "sandals": ["flip_flops", "slides"]},
    "electronics": {"screens": ["tv", "monitor"], "computers": ["laptop", "tablet"]},
    "home": {"seating": ["sofa", "armchair"], "tables": ["desk", "dining_table"]},
}
BRANDS = {  # domain -> brand -> its alias (unseen in SFT)
    "footwear": {"nike": "nike_inc", "adidas": "three_stripes", "puma": "puma_se", "asics": "onitsuka",
                 "reebok": "rbk"},
    "electronics": {"samsung": "samsung_electronics", "sony": "sony_corp", "lg": "lg_electronics",
                    "apple": "apple_inc", "dell": "dell_technologies"},
    "home": {"ikea": "ikea_of_sweden", "ashley": "ashley_furniture", "zinus": "zinus_inc", "hon": "hon_company"},
}
COLORS = {  # family -> colour -> (rare synonym, unseen synonym)
    "reds": {"red": ("crimson", "scarlet"), "pink": ("rose", "blush"), "maroon": ("burgundy", "wine")},
    "blues": {"blue": ("azure", "cobalt"), "navy": ("midnight", "indigo"), "teal": ("turquoise", "aqua")},
    "neutrals": {"black": ("jet", "onyx"), "grey": ("gray", "slate"), "white": ("ivory", "snow")},
    "greens": {"green": ("emerald", "jade"), "olive": ("khaki", "moss")},
}
SIZES = {  # domain -> ordered sizes as (head form, long-tail unit form); adjacent sizes are a 'partial' match
    "footwear": [(f"us_{s}", f"eu_{s + 33}") for s in range(6, 13)],
    "electronics": [(f"{s}_inch", f"{round(s * 2.54)}_cm") for s in (13, 15, 24, 27, 32, 43, 55, 65)],
    "home": [(f"{s}_cm", f"{round(s / 2.54)}_inch") for s in (80, 120, 160, 200, 240)],
}
SIZE_TAIL_KIND = {"footwear": "rare", "electronics": "unseen", "home": "rare"}
QUERY_NOISE = ["cheap", "best", "new", "sale", "for", "men", "women", "kids", "buy", "deal", "top", "quality"]
PRODUCT_NOISE = ["classic", "premium", "lightweight", "durable", "modern", "comfort", "pro", "edition"]
DISTRACTOR_PREFIX = {"color": "with", "brand": "compare"}  # "with red trim", "compare adidas": values in the
DISTRACTOR_SUFFIX = {"color": "trim", "brand": "alternative"}  # input that are NOT the product's own facet


class Catalogue:
    """The synthetic world's facet values and their meanings. `compare` is the gold comparator (knows every
    surface form); `head_compare` is the local verifier's comparator (head forms only, DESIGN §3).

    The tables default to the hand-made catalogue above; `wands_catalogue` passes tables built from WANDS.
    The generator works with four facet roles (category: hierarchy, brand: exact, color: families, size:
    ordered); `facet_names` names each role in the CoT (WANDS has no brand field: its 'brand' role is style).
    """

    def __init__(self, category_tree=CATEGORY_TREE, brands=BRANDS, colors=COLORS, sizes=SIZES,
                 size_tail_kind=SIZE_TAIL_KIND, query_noise=QUERY_NOISE, product_noise=PRODUCT_NOISE,
                 facet_names: dict[str, str] | None = None):
        self.category_tree, self.brands, self.colors, self.sizes = category_tree, brands, colors, sizes
        self.query_noise, self.product_noise = list(query_noise), list(product_noise)
        self.facet_names = dict(facet_names or {f: f for f in FACETS})   # role -> facet name in the CoT
        self.role = {name: r for r, name in self.facet_names.items()}   # facet name -> role
        self.leaf_group, self.group_domain, self.leaf_domain = {}, {}, {}
        for dom, groups in category_tree.items():
            for g, leaves in groups.items():
                self.group_domain[g] = dom
                for leaf in leaves:
                    self.leaf_group[leaf], self.leaf_domain[leaf] = g, dom
        # surface form -> (facet, canonical value, tail kind or "")
        self.form: dict[str, tuple[str, str, str]] = {}
        for name in list(self.leaf_group) + list(self.group_domain):
            self.form[name] = ("category", name, "")
        self.brand_domain = {}
        for dom, dom_brands in brands.items():
            for b, alias in dom_brands.items():
                self.brand_domain[b] = dom
                self.form[b] = ("brand", b, "")
                if alias:
                    self.form[alias] = ("brand", b, "brand_alias")
        self.color_family = {}
        for fam, fam_colors in colors.items():
            for c, (rare, unseen) in fam_colors.items():
                self.color_family[c] = fam
                self.form[c] = ("color", c, "")
                if rare:
                    self.form[rare] = ("color", c, "color_synonym")
                if unseen:
                    self.form[unseen] = ("color", c, "color_synonym_unseen")
        self.size_index = {}
        for dom, dom_sizes in sizes.items():
            for i, (head, tail) in enumerate(dom_sizes):
                self.size_index[head] = (dom, i)
                self.form[head] = ("size", head, "")
                kind = "size_unit" if size_tail_kind[dom] == "rare" else "size_unit_unseen"
                self.form[tail] = ("size", head, kind)

    def words(self) -> list[str]:
        extra = (self.query_noise + self.product_noise + list(DISTRACTOR_PREFIX.values())
                 + list(DISTRACTOR_SUFFIX.values()))
        return sorted(set(self.form) | set(extra) | {"color", "size"})

    def tail_forms(self, facet: str, value: str) -> list[tuple[str, str]]:
        """(form, kind) of the long-tail surface forms of a canonical value."""
        return [(f, k) for f, (fa, v, k) in self.form.items() if fa == facet and v == value and k]

    @staticmethod
    def is_rare(kind: str) -> bool:
        return not kind.endswith("_unseen") and kind != "brand_alias"

    def compare(self, facet: str, vq: str, vp: str, known: Callable[[str], bool] | None = None) -> str:
        """Verdict of a query value against a product value. With `known`, forms it rejects are unknown and
        compare by string only (the head-only verifier). `facet` is a role or a facet name."""
        facet = self.role.get(facet, facet)

        def canon(v):
            f = self.form.get(v)
            if f is None or f[0] != facet or (known is not None and not known(v)):
                return None
            return f[1]
        cq, cp = canon(vq), canon(vp)
        if cq is None or cp is None:
            return "match" if vq == vp else "mismatch"
        if facet == "category":
            if cq == cp or self.leaf_group.get(cp) == cq:
                return "match"
            return "partial" if self.leaf_group.get(cq) == self.leaf_group.get(cp) else "mismatch"
        if facet == "brand":
            return "match" if cq == cp else "mismatch"
        if facet == "color":
            if cq == cp:
                return "match"
            return "partial" if self.color_family[cq] == self.color_family[cp] else "mismatch"
        (dq, iq), (dp, ip) = self.size_index[cq], self.size_index[cp]
        if dq != dp:
            return "mismatch"
        return "match" if iq == ip else "partial" if abs(iq - ip) == 1 else "mismatch"

    def head_compare(self, facet: str, vq: str, vp: str) -> str:
        return self.compare(facet, vq, vp, known=lambda v: not self.form[v][2])


MENTION_P = {"category": 0.9, "brand": 0.55, "color": 0.6, "size": 0.45}


def _realise(cat: Catalogue, rng: random.Random, facet: str, verdict: str, prod: dict) -> str | None:
    """A canonical query value for `facet` that has `verdict` against the product's value (None: impossible)."""
    dom = cat.leaf_domain[prod["category"]]
    if facet == "category":
        leaf, group = prod["category"], cat.leaf_group[prod["category"]]
        if verdict == "match":
            return group if rng.random() < 0.25 else leaf
        if verdict == "partial":
            sib = [x for x in cat.category_tree[dom][group] if x != leaf]
            return rng.choice(sib) if sib else None
        others = [x for x in cat.leaf_group if cat.leaf_group[x] != group]
        return rng.choice(others + [g for g in cat.group_domain if g != group])
    if facet == "brand":
        if verdict == "partial":
            return None
        if verdict == "match":
            return prod["brand"]
        pool = [b for b in cat.brands[dom] if b != prod["brand"]]
        return rng.choice(pool if rng.random() < 0.8 else [b for b in cat.brand_domain if b != prod["brand"]])
    if facet == "color":
        fam = cat.color_family[prod["color"]]
        if verdict == "match":
            return prod["color"]
        if verdict == "partial":
            return rng.choice([c for c in cat.colors[fam] if c != prod["color"]])
        return rng.choice([c for c in cat.color_family if cat.color_family[c] != fam])
    _, i = cat.size_index[prod["size"]]
    sizes = [h for h, _ in cat.sizes[dom]]
    cand = [j for j in range(len(sizes)) if (j == i if verdict == "match" else
                                              abs(j - i) == 1 if verdict == "partial" else abs(j - i) >= 2)]
    return sizes[rng.choice(cand)] if cand else None


def generate_example(cat: Catalogue, rng: random.Random, schema: GraphSchema, longtail: str,
                     p_rare: float = 0.0, pivotal_p: float = 0.8, unseen_longtail: bool = True) -> Example:
    """One synthetic example. longtail: 'none' (head forms, plus rare forms with probability p_rare per value),
    'any' (one long-tail form of any kind), 'force' (one long-tail form, pivotal with probability pivotal_p:
    its verdict changes the label under the rule, so outcome reward can teach it). unseen_longtail=False lets
    every long-tail form (not only the 'rare' ones) appear at rate p_rare.
    Internally facets are the catalogue's roles; the example names them by cat.facet_names, and its label is
    the schema's (label_rule) business rule over the named verdicts, the same rule the parser checks."""
    target = rng.randrange(len(schema.label_names))  # uniform labels: drawn once, then realised
    tree, name = cat.category_tree, cat.facet_names
    named = lambda d: {name[f]: v for f, v in d.items()}  # noqa: E731
    while True:
        dom = rng.choice(list(tree))
        group = rng.choice(list(tree[dom]))
        prod = {"category": rng.choice(tree[dom][group]), "brand": rng.choice(list(cat.brands[dom])),
                "color": rng.choice(list(cat.color_family)), "size": rng.choice(cat.sizes[dom])[0]}
        mentioned = [cat.role[f] for f in schema.facets if rng.random() < MENTION_P[cat.role[f]]]
        if len(mentioned) < 2:
            continue
        verdicts = {f: rng.choice(VERDICTS if f != "brand" else ("match", "mismatch")) for f in mentioned}
        if label_from_verdicts(named(verdicts), schema.label_rule) != target:
            continue
        q = {f: _realise(cat, rng, f, verdicts[f], prod) for f in mentioned}
        if any(v is None for v in q.values()):
            continue
        p = {f: prod[f] for f in mentioned}
        # surface forms
        meta: dict = {}
        if longtail != "none":
            cand = [(side, f, form, kind) for f in mentioned if f != "category"
                    for side, val in (("query", q[f]), ("product", p[f]))
                    for form, kind in cat.tail_forms(f, val)]
            if not cand:
                continue
            kind = rng.choice(sorted({c[3] for c in cand}))  # balance the long-tail kinds
            side, f, form, kind = rng.choice([c for c in cand if c[3] == kind])
            pivotal = label_dependence(named(verdicts), schema.label_rule)[name[f]]
            if longtail == "force" and pivotal != (rng.random() < pivotal_p):
                continue
            (q if side == "query" else p)[f] = form
            meta = {"longtail": kind, "longtail_facet": name[f], "side": side, "pivotal": pivotal}
        elif p_rare > 0:
            for d in (q, p):
                for f in d:
                    rare = [fm for fm, k in cat.tail_forms(f, d[f]) if cat.is_rare(k) or not unseen_longtail]
                    if rare and rng.random() < p_rare:
                        d[f] = rng.choice(rare)
        assert all(cat.compare(f, q[f], p[f]) == verdicts[f] for f in mentioned)
        query = _query_text(rng, q, cat.query_noise)
        product = _product_text(cat, rng, prod, p)
        cot = cot_from_parts(named(q), named(p), named(verdicts), target, schema)
        return Example(query=query, product=product, label=target, cot=cot, nodes=named(verdicts), meta=meta)


def _query_text(rng: random.Random, q: dict[str, str], noise: list[str] = QUERY_NOISE) -> str:
    words = list(q.values()) + rng.sample(noise, rng.randint(0, 2))
    rng.shuffle(words)
    return " ".join(words)


def _product_text(cat: Catalogue, rng: random.Random, prod: dict, p: dict) -> str:
    """Title-like text: brand, noise, category, then keyed colour and size, maybe a distractor phrase."""
    brand = p.get("brand", prod["brand"])
    words = [brand] + rng.sample(cat.product_noise, rng.randint(0, 2)) + [p.get("category", prod["category"])]
    words += ["color", p.get("color", prod["color"]), "size", p.get("size", prod["size"])]
    if rng.random() < 0.3:
        facet = rng.choice(["color", "brand"])
        pool = list(cat.color_family) if facet == "color" else list(cat.brands[cat.leaf_domain[prod["category"]]])
        other = rng.choice([x for x in pool if x != prod[facet]])
        words += [DISTRACTOR_PREFIX[facet], other, DISTRACTOR_SUFFIX[facet]]
    return " ".join(words)


SPLITS = ("sft", "rl", "test_id", "test_longtail")


def generate_splits(schema: GraphSchema, seed: int, n_sft: int, n_rl: int, n_test_id: int,
                    n_test_longtail: int, longtail_in_sft: float, longtail_in_rl: float,
                    unseen_longtail: bool = True, cat: Catalogue | None = None) -> dict[str, list[Example]]:
    """The four splits (DESIGN §2), each from its own seeded stream so that changing one size leaves the
    others unchanged. sft/test_id: head forms and rare long-tail forms at rate longtail_in_sft; rl: a share
    longtail_in_rl of examples carry one long-tail form of any kind; test_longtail: every example does.
    `cat`: the catalogue (default: the hand-made one); its facet names must be the schema's facets."""
    cat = cat or Catalogue()
    if sorted(schema.facets) != sorted(cat.role):
        raise ValueError(f"graph.facets {list(schema.facets)} must be the catalogue's facets {sorted(cat.role)}")
    plan = {"sft": (n_sft, "none"), "rl": (n_rl, "mixed"), "test_id": (n_test_id, "none"),
            "test_longtail": (n_test_longtail, "force")}
    out = {}
    for k, (split, (n, lt)) in enumerate(plan.items()):
        rng = random.Random(seed * 1000 + k)
        exs = []
        for i in range(n):
            mode = ("any" if rng.random() < longtail_in_rl else "none") if lt == "mixed" else lt
            ex = generate_example(cat, rng, schema, mode, p_rare=longtail_in_sft if mode == "none" else 0.0,
                                  unseen_longtail=unseen_longtail)
            ex.id = f"{split}-{i:06d}"
            exs.append(ex)
        out[split] = exs
    return out


def prepare_synthetic(data_cfg, schema: GraphSchema, cat: Catalogue | None = None,
                      prefix: str = "") -> dict[str, str]:
    """Write the synthetic splits under data_cfg.dir once (deterministic; reused when present). Returns paths.
    `prefix` names a non-default catalogue in the directory name."""
    tag = prefix + (f"s{data_cfg.seed}-{data_cfg.n_sft}-{data_cfg.n_rl}-{data_cfg.n_test_id}-{data_cfg.n_test_longtail}"
           f"-{data_cfg.longtail_in_sft}-{data_cfg.longtail_in_rl}" + ("" if data_cfg.unseen_longtail else "-nounseen"))
    root = os.path.join(data_cfg.dir, tag)
    paths = {s: os.path.join(root, f"{s}.jsonl") for s in SPLITS}
    if not all(os.path.exists(p) for p in paths.values()):
        splits = generate_splits(schema, data_cfg.seed, data_cfg.n_sft, data_cfg.n_rl, data_cfg.n_test_id,
                                 data_cfg.n_test_longtail, data_cfg.longtail_in_sft, data_cfg.longtail_in_rl,
                                 data_cfg.unseen_longtail, cat)
        for s, exs in splits.items():
            write_jsonl(paths[s], exs)
    return paths


# ----------------------------------------------------------------------------------------------------------
# 7. WANDS: real pairs and a catalogue built from them (DESIGN §2, real data)
#
# The real pairs (Wayfair WANDS, 3 grades) are label-only test examples: no gold CoT, no node labels. The
# synthetic testbed keeps its generator and business rule, but its catalogue comes from WANDS: category tree
# from the category hierarchies and product classes, style values (the 'brand' role: WANDS has no brand
# field) from the style facets, colours from a hand-made home-goods table kept where WANDS text uses them.
# data.label_rule maps the rule's 4 levels onto the 3 grades (check_label_rule says why [0, 1, 1, 2]).

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
WANDS_FILES = ("query.csv", "product.csv", "label.csv")
WANDS_COLUMNS = {"query.csv": ("query_id", "query", "query_class"),
                 "product.csv": ("product_id", "product_name", "product_class", "category hierarchy",
                                 "product_features"),
                 "label.csv": ("query_id", "product_id", "label")}
WANDS_REAL_SPLIT = "wands"
WANDS_FACET_NAMES = {"category": "category", "brand": "style", "color": "color", "size": "size"}  # role -> name
WANDS_STYLE_KEYS = ("style", "dsprimaryproductstyle", "dssecondaryproductstyle")
WANDS_COLORS = {  # family -> colour -> (rare synonym, unseen synonym): hand-made; kept where WANDS text has it
    "whites": {"white": ("snow", "alabaster"), "cream": ("ivory", "eggshell"), "beige": ("tan", "sand")},
    "greys": {"gray": ("grey", "slate"), "silver": ("pewter", "nickel"), "charcoal": ("graphite", "smoke")},
    "darks": {"black": ("ebony", "onyx"), "brown": ("chocolate", "mocha"), "espresso": ("coffee", "java")},
    "woods": {"natural": ("oak", "maple"), "walnut": ("cherry", "mahogany")},
    "blues": {"blue": ("azure", "cobalt"), "navy": ("indigo", "midnight"), "teal": ("turquoise", "aqua")},
    "greens": {"green": ("emerald", "jade"), "sage": ("olive", "moss")},
    "reds": {"red": ("crimson", "scarlet"), "pink": ("blush", "rose"), "burgundy": ("wine", "maroon")},
    "metals": {"gold": ("brass", "bronze"), "copper": ("rust", "terracotta")},
}
WANDS_SIZES = {  # ordered (head, long-tail form); bed sizes where a domain sells beds, else a generic scale
    "bed": [("twin", "single"), ("full", "double"), ("queen", "qn"), ("king", "eastern_king")],
    "generic": [("small", "petite"), ("medium", "midsize"), ("large", "big"), ("oversized", "jumbo")],
}
WANDS_QUERY_NOISE = ["for", "with", "and", "set", "outdoor", "indoor", "kids", "living", "room", "bedroom",
                     "bathroom", "kitchen", "office", "wall", "cheap", "best", "new"]


def resolve_wands_dir(path: str) -> str:
    """data.wands_dir as an absolute path: a relative one is taken from the repository root, not the cwd."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(REPO_ROOT, path))


def read_wands_table(path: str) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of each data row of a TAB-separated WANDS file with a header line. A missing file or column,
    or a row with too few / too many columns, raises DataError naming file:line and the column."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in WANDS_COLUMNS.get(os.path.basename(path), ()) if c not in header]
        if not header or missing:
            raise DataError(f"{path}:1: header lacks column '{missing[0] if missing else '?'}' (got {header})")
        for row in reader:
            line = reader.line_num
            if not row or not any(x.strip() for x in row):
                continue
            if len(row) < len(header):
                raise DataError(f"{path}:{line}: column '{header[len(row)]}' missing "
                                f"({len(row)} of {len(header)} TAB-separated columns)")
            if len(row) > len(header):
                raise DataError(f"{path}:{line}: column {len(header) + 1} is extra (after '{header[-1]}'; the header "
                                f"has {len(header)} columns)")
            rows.append((line, dict(zip(header, row))))
    return rows


def _wands_id(row: dict, column: str, where: str) -> int:
    value = row[column].strip()
    if not re.fullmatch(r"\d+", value):
        raise DataError(f"{where}: column '{column}' = {value!r:.40} is not an integer id")
    return int(value)


def read_wands(wands_dir: str):
    """The three WANDS files -> (queries {query_id: (line, row)}, products {product_id: (line, row)},
    labels [(line, row)]); duplicate ids and non-integer ids raise DataError with file:line and column."""
    tables = {}
    for name, key in (("query.csv", "query_id"), ("product.csv", "product_id")):
        path = os.path.join(wands_dir, name)
        by_id = {}
        for line, row in read_wands_table(path):
            i = _wands_id(row, key, f"{path}:{line}")
            if i in by_id:
                raise DataError(f"{path}:{line}: column '{key}' = {i} repeats line {by_id[i][0]}")
            by_id[i] = (line, row)
        tables[name] = by_id
    return tables["query.csv"], tables["product.csv"], read_wands_table(os.path.join(wands_dir, "label.csv"))


def _text(s: str) -> str:
    return " ".join(s.lower().split())


def wands_examples(wands_dir: str, grades: Sequence[str]) -> list[Example]:
    """Every judged pair of label.csv as a label-only Example: query text, product text = product name +
    product class (lower-cased, whitespace-normalised), label = the index of the `label` string in `grades`
    (an optional `grade` column must agree). meta keeps the ids and classes, and "vocab": false (see vocabulary)."""
    queries, products, labels = read_wands(wands_dir)
    lpath, qpath, ppath = (os.path.join(wands_dir, f) for f in ("label.csv", "query.csv", "product.csv"))
    out = []
    for line, row in labels:
        where = f"{lpath}:{line}"
        qid, pid = _wands_id(row, "query_id", where), _wands_id(row, "product_id", where)
        if qid not in queries:
            raise DataError(f"{where}: column 'query_id' = {qid} is not in {qpath}")
        if pid not in products:
            raise DataError(f"{where}: column 'product_id' = {pid} is not in {ppath}")
        name = row["label"].strip()
        if name not in grades:
            raise DataError(f"{where}: column 'label' = {name!r:.40} is not one of {list(grades)}")
        label = list(grades).index(name)
        if (row.get("grade") or "").strip() and row["grade"].strip() != str(label):
            raise DataError(f"{where}: column 'grade' = {row['grade'].strip()!r} disagrees with label {name!r} ({label})")
        (qline, q), (pline, p) = queries[qid], products[pid]
        query = _text(q["query"])
        product = _text(f"{p['product_name']} {p['product_class'].replace('|', ' ')}")
        if not query:
            raise DataError(f"{qpath}:{qline}: column 'query' is empty")
        if not product:
            raise DataError(f"{ppath}:{pline}: columns 'product_name' and 'product_class' are empty")
        meta = {"query_id": qid, "product_id": pid, "grade": name, "query_class": q["query_class"],
                "product_class": p["product_class"], "vocab": False}
        if row.get("source"):
            meta["source"] = row["source"]
        out.append(Example(query=query, product=product, label=label, id=f"wands-{(row.get('id') or '').strip() or line}",
                           meta=meta))
    if not out:
        raise DataError(f"{lpath}: no labelled pairs")
    return out


def convert_wands(wands_dir: str, out_path: str, grades: Sequence[str] = ("Irrelevant", "Partial", "Exact")) -> list[Example]:
    """WANDS files -> the project's JSONL (one label-only example per judged pair); returns the examples."""
    examples = wands_examples(wands_dir, grades)
    write_jsonl(out_path, examples)
    return examples


def parse_wands_features(text: str) -> dict[str, list[str]]:
    """'key : value|key:value' (the product_features column) -> {key: [values]}."""
    out: dict[str, list[str]] = {}
    for item in text.split("|"):
        key, sep, value = item.partition(":")
        if sep and key.strip() and value.strip():
            out.setdefault(key.strip().lower(), []).append(value.strip().lower())
    return out


def singular(word: str) -> str:
    """English plural -> singular for product-type nouns (chairs, benches, vanities); other words unchanged."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("lves"):
        return word[:-3] + "f"
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _slug(text: str) -> str:
    return "_".join(re.findall(r"[^\W_]+", text.lower()))


def wands_catalogue(products: dict, where: str = "product.csv") -> Catalogue:
    """A Catalogue from WANDS products {product_id: (line, row)} (read_wands).

    category: leaf = the head noun of the product class ('Accent Chairs' -> chair), group = the 2nd level of
    its category hierarchy, domain = the 1st (a leaf goes to its most frequent group; a leaf without a sibling
    is never a 'partial'). style ('brand' role, exact match): head words of the style facets, most frequent
    first, the value's second word as its alias ('modern & contemporary'). colour: WANDS_COLORS where WANDS
    text has the colour; size: WANDS_SIZES, bed sizes in a domain that sells beds. Product noise: the most
    frequent other words of product names. Only product text and facets are read, never labels or queries.
    """
    leaf_at: Counter = Counter()
    style_count: Counter = Counter()
    style_alias: dict[str, str] = {}
    name_words: Counter = Counter()
    seen: set[str] = set()
    for _, row in products.values():
        name = re.findall(r"[^\W\d_]+", row["product_name"].lower())
        name_words.update(name)
        feats = parse_wands_features(row["product_features"])
        seen.update(name)
        seen.update(w for vals in feats.values() for v in vals for w in re.findall(r"[^\W\d_]+", v))
        levels = [x.strip() for x in row["category hierarchy"].split("/") if x.strip()]
        cls = re.findall(r"[^\W\d_]+", row["product_class"].split("|")[0].lower())
        if len(levels) >= 2 and cls:
            leaf_at[(singular(cls[-1]), _slug(levels[0]), _slug(levels[1]))] += 1
        for key in WANDS_STYLE_KEYS:
            for v in feats.get(key, []):
                words = re.findall(r"[^\W\d_]+(?:-[^\W\d_]+)*", v)
                if words:
                    style_count[words[0]] += 1
                    if len(words) > 1:
                        style_alias.setdefault(words[0], words[1])
    home: dict[str, tuple[str, str]] = {}
    for (leaf, dom, grp), _ in sorted(leaf_at.items(), key=lambda kv: (-kv[1], kv[0])):
        home.setdefault(leaf, (dom, grp))
    groups = {grp for dom, grp in home.values()}
    tree: dict[str, dict[str, list[str]]] = {}
    for leaf, (dom, grp) in sorted(home.items()):
        if leaf not in groups:
            tree.setdefault(dom, {}).setdefault(grp, []).append(leaf)
    if sum(len(gs) for gs in tree.values()) < 2:
        raise DataError(f"{where}: fewer than two category groups in column 'category hierarchy': no category facet")
    used = set(groups) | {leaf for gs in tree.values() for ls in gs.values() for leaf in ls}
    styles: dict[str, str | None] = {}
    for s, _ in sorted(style_count.items(), key=lambda kv: (-kv[1], kv[0])):
        if s not in used and len(styles) < 12:
            alias = style_alias.get(s)
            alias = alias if alias and alias not in used and alias not in styles else None
            styles[s] = alias
            used |= {s, alias} - {None}
    if len(styles) < 3:
        raise DataError(f"{where}: fewer than 3 style values in column 'product_features' ({sorted(styles)})")
    colors = {}
    for fam, cs in WANDS_COLORS.items():
        kept = {c: tuple(x if x not in used else None for x in syn) for c, syn in cs.items() if c in seen and c not in used}
        if len(kept) >= 2:
            colors[fam] = kept
            used |= set(kept) | {x for syn in kept.values() for x in syn if x}
    if len(colors) < 2:
        raise DataError(f"{where}: fewer than two colour families occur in product names and features")
    beds = {"bed", "mattress", "headboard", "sheet", "comforter", "duvet", "quilt"}
    sizes = {d: WANDS_SIZES["bed" if beds & {x for ls in gs.values() for x in ls} else "generic"] for d, gs in tree.items()}
    used |= {x for sc in sizes.values() for pair in sc for x in pair}
    query_noise = [w for w in WANDS_QUERY_NOISE if w not in used]
    product_noise = [w for w, _ in sorted(name_words.items(), key=lambda kv: (-kv[1], kv[0]))
                     if len(w) > 2 and w not in used and w not in query_noise][:30]
    return Catalogue(category_tree=tree, brands={d: styles for d in tree}, colors=colors, sizes=sizes,
                     size_tail_kind={d: "rare" for d in tree}, query_noise=query_noise, product_noise=product_noise,
                     facet_names=WANDS_FACET_NAMES)


def prepare_wands(data_cfg, schema: GraphSchema) -> dict[str, str]:
    """data.source 'wands': the synthetic splits over wands_catalogue and the converted real pairs (split
    'wands'), written once under data.dir in a directory named by a digest of the WANDS files and the label
    scale (a change to either makes new files). Returns {split: path}."""
    wdir = resolve_wands_dir(data_cfg.wands_dir)
    if len(data_cfg.wands_grades) != len(schema.label_names):
        raise ValueError(f"data.wands_grades {list(data_cfg.wands_grades)} must have one entry per data.label_names "
                         f"entry {list(schema.label_names)}")
    digest = hashlib.sha1(json.dumps([list(schema.label_names), list(schema.label_rule),
                                      list(data_cfg.wands_grades), list(schema.facets)]).encode())
    for name in WANDS_FILES:
        path = os.path.join(wdir, name)
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file (data.wands_dir = {data_cfg.wands_dir!r})")
        with open(path, "rb") as f:
            digest.update(f.read())
    prefix = f"wands-{digest.hexdigest()[:10]}-"
    paths = prepare_synthetic(data_cfg, schema, catalogue_of(data_cfg), prefix)
    real = os.path.join(os.path.dirname(paths["sft"]), f"{WANDS_REAL_SPLIT}.jsonl")
    if not os.path.exists(real):
        convert_wands(wdir, real, data_cfg.wands_grades)
    paths[WANDS_REAL_SPLIT] = real
    return paths


def catalogue_of(data_cfg) -> Catalogue:
    """The catalogue behind the config's synthetic data: its comparator is the verifier the trainer, the
    evaluation and the distillation use (the built-in catalogue, or the WANDS-built one for source 'wands')."""
    if data_cfg.source == "wands":
        wdir = resolve_wands_dir(data_cfg.wands_dir)
        return wands_catalogue(read_wands(wdir)[1], os.path.join(wdir, "product.csv"))
    return Catalogue()


def vocabulary(schema: GraphSchema, examples: Iterable[Example] = ()) -> list[str]:
    """Words of the word-level tokenizer: the format's fixed words, the catalogue, and any example's words.
    An example whose meta says "vocab": false (the real WANDS pairs) adds none: its words the training text lacks
    stay <unk>, counted by the evaluation, instead of getting embedding rows no training step ever moves."""
    words = set(schema.words()) | set(Catalogue().words())
    for ex in examples:
        if ex.meta.get("vocab") is False:
            continue
        words.update(ex.query.split())
        words.update(ex.product.split())
        for v in (ex.cot or {}).values():
            words.update(v.split())
    return sorted(words)


def load_splits(cfg) -> tuple[GraphSchema, dict[str, list[Example]]]:
    """The schema and every split named by the config: {'sft', 'rl', <test split name>...}.

    data.source 'synthetic' writes (once) and loads the generator's splits; 'jsonl' loads
    data.dir/<sft_file>, <rl_file> and each of <test_files> (a test split is named by its file stem); 'wands'
    writes (once) the generator's splits over the WANDS-built catalogue plus the converted real pairs
    (test split 'wands', label-only), see section 7.
    """
    schema = GraphSchema.from_config(cfg.graph, cfg.data.label_names, cfg.data.label_rule)
    n = len(schema.label_names)
    if cfg.data.source == "synthetic":
        paths = prepare_synthetic(cfg.data, schema)
    elif cfg.data.source == "wands":
        paths = prepare_wands(cfg.data, schema)
    else:
        paths = {"sft": os.path.join(cfg.data.dir, cfg.data.sft_file), "rl": os.path.join(cfg.data.dir, cfg.data.rl_file)}
        for f in cfg.data.test_files:
            paths[os.path.splitext(os.path.basename(f))[0]] = os.path.join(cfg.data.dir, f)
    return schema, {s: load_jsonl(p, n, schema) for s, p in paths.items()}


def test_split_names(splits: dict) -> list[str]:
    return [s for s in splits if s not in ("sft", "rl")]


def split_stats(splits: dict[str, list[Example]], schema: GraphSchema, cat: Catalogue | None = None) -> dict:
    """Figures of the testbed (README): label shares, long-tail kinds with the share whose verdict changes the
    label (pivotal), and the local verifiers' agreement with gold on the gold CoT (comparator errors only:
    the gold steps are all right, so agreement = share of gold nodes the verifier accepts)."""
    cat = cat or Catalogue()
    out = {}
    for name, exs in splits.items():
        n = len(exs)
        s = {"n": n, "labels": [round(sum(e.label == k for e in exs) / n, 3) for k in range(len(schema.label_names))]}
        kinds: dict[str, list[bool]] = {}
        for e in exs:
            if e.meta.get("longtail"):
                kinds.setdefault(e.meta["longtail"], []).append(bool(e.meta["pivotal"]))
        s["longtail"] = {k: {"share": round(len(v) / n, 3), "pivotal": round(sum(v) / len(v), 3)}
                         for k, v in sorted(kinds.items())}
        hits: dict[str, list[float]] = {}
        for e in exs[:2000]:
            if e.cot is None:
                continue
            words = serialize_cot(e.cot, schema).split()
            ids = list(range(len(words)))
            vocab = TagVocab({i: w for i, w in enumerate(words) if w in set(schema.tags())},
                             lambda xs, w=words: " ".join(w[i] for i in xs), None)
            parsed = parse_completion(ids, vocab, schema)
            for node, vals in verifier_scores(parsed, e.query, e.product, cat.head_compare, schema).items():
                for kind, v in zip(SCORE_KINDS, vals):
                    if not math.isnan(v):
                        hits.setdefault(f"{kind}/{node.split(':')[0]}", []).append(v)
        s["verifier_accepts_gold"] = {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}
        out[name] = s
    return out


if __name__ == "__main__":
    import sys
    from config import load_config
    cfg = load_config(sys.argv[1] if len(sys.argv) > 1 else "configs/base.yaml", sys.argv[2:])
    schema, splits = load_splits(cfg)
    cat = wands_catalogue(read_wands(resolve_wands_dir(cfg.data.wands_dir))[1]) if cfg.data.source == "wands" else None
    print(json.dumps(split_stats(splits, schema, cat), indent=1))
