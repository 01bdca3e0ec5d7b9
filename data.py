"""The format the method reads (DESIGN.md §1-3): the reasoning graph, the business rule, the CoT serialiser and
its parser, node keys, local verifiers and the JSONL examples. The data a run trains on is made by testbed.py.

Read in this order:
  1. GraphSchema            node types and edge types, from the config; any DAG (DESIGN §1, §0.1)
  2. business rule          the label from verdicts, and which verdicts the label depends on (§2, the §4 gate)
  3. CoT serialiser/parser  one tagged span per node; the parser never raises (§1)
  4. keys, gold, verifiers  canonical node keys (§4), node correctness (§4.2), grounding / comparator scores (§3)
  5. JSONL                  one example per line, validated with file:line:field errors (§2)

A schema is config, not code. A node type has a role:
  evidence  what the query (side: query) or the product (side: product) says about the facets it covers:
            `<q> category running_shoes brand nike </q>`
  verdict   how the two sides compare on the facets it covers. Over one facet (one node per facet with
            per_facet, or a type with one facet): copy-then-compare, `<f:brand> nike adidas mismatch </f:brand>`.
            Over several facets (the paper's `ma`): the same per mentioned facet, named, then the pooled
            verdict, `<ma> brand nike adidas mismatch color red red match mismatch </ma>`
  label     the graded label, `<y> mismatch </y>`: exactly one label type
A node of the per-example graph exists when the query mentions one of its facets (the label always). Our
default graph (Q, P, one F per facet, Y) and the paper's 7-node graph (configs/paper.yaml) are two schemas.
Small models learn copy-then-compare steps quickly and verdict-only steps poorly (DESIGN §1).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

VERDICTS = ("match", "partial", "mismatch")
LABEL_NAMES = ("irrelevant", "mismatch", "related", "excellent")  # 0..3, DESIGN §0
FACETS = ("category", "brand", "color", "size")
PROMPT_TAGS = ("<query>", "</query>", "<product>", "</product>")
ROLES = ("evidence", "verdict", "label")
SIDES = ("query", "product")
# Business-rule level (0..3) that each verdict of a facet forces, as (match, partial, mismatch); the label's level
# is the minimum over the facets (DESIGN §2): category mismatch -> 0 irrelevant; brand or size mismatch -> 1;
# any other mismatch or any partial -> 2 related; all match -> 3 excellent. Facets not listed: (3, 2, 2).
SEVERITY = {"category": (3, 2, 0), "brand": (3, 2, 1), "size": (3, 2, 1)}
SECONDARY = (3, 2, 2)
TOP_LEVEL = 3


class SchemaError(ValueError):
    """A bad graph schema; the message is one line naming the config key (graph.nodes[i].role, ...)."""


# ----------------------------------------------------------------------------------------------------------
# 1. Reasoning graph schema (DESIGN §1)

@dataclass(frozen=True)
class NodeType:
    name: str                     # tag name: <q> ... </q>; a per-facet type's nodes are <name:facet>
    role: str                     # evidence | verdict | label
    side: str = ""                # evidence: query | product
    facets: tuple[str, ...] = ()  # facets covered; () = every facet of the schema
    per_facet: bool = False       # one node per facet (our F_k)


DEFAULT_NODE_TYPES = (NodeType("q", "evidence", "query"), NodeType("p", "evidence", "product"),
                      NodeType("f", "verdict", per_facet=True), NodeType("y", "label"))


@dataclass(frozen=True)
class Slot:
    """One node of the union graph: a node type restricted to the facets it covers ('f:brand' covers brand)."""
    name: str
    type: NodeType
    facets: tuple[str, ...]

    @property
    def pooled(self) -> bool:
        """A verdict over several facets: its content names each facet and ends with the pooled verdict."""
        return self.type.role == "verdict" and len(self.facets) > 1


@dataclass(frozen=True)
class GraphSchema:
    """Node types and edge types of the reasoning graph. Edge types are (parent type, child type) name pairs;
    every instance edge of one type shares one coefficient alpha_e (DESIGN §4). An edge between two per-facet
    types joins the nodes of the same facet only. `severity` is the business rule (SEVERITY's form)."""
    facets: tuple[str, ...] = FACETS
    edge_kinds: tuple[tuple[str, str], ...] = (("q", "f"), ("p", "f"), ("f", "y"))
    label_names: tuple[str, ...] = LABEL_NAMES
    label_rule: tuple[int, ...] = (0, 1, 2, 3)  # rule level -> label index
    node_types: tuple[NodeType, ...] = DEFAULT_NODE_TYPES
    severity: tuple[tuple[str, tuple[int, int, int]], ...] = tuple(SEVERITY.items())

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_config(cls, graph_cfg, label_names: Sequence[str] = LABEL_NAMES,
                    label_rule: Sequence[int] = ()) -> "GraphSchema":
        """From the config's graph section: nodes (mappings, or the default names q / p / f / y), edges, severity."""
        defaults = {t.name: t for t in DEFAULT_NODE_TYPES}
        types = []
        for i, n in enumerate(getattr(graph_cfg, "nodes", list(defaults))):
            if isinstance(n, str):
                if n not in defaults:
                    raise SchemaError(f"graph.nodes[{i}]: {n!r} is not a default node type {list(defaults)}; "
                                      f"give a mapping {{name, role, side, facets, per_facet}}")
                types.append(defaults[n])
                continue
            bad = sorted(set(n) - {"name", "role", "side", "facets", "per_facet"})
            if bad or "name" not in n or "role" not in n:
                raise SchemaError(f"graph.nodes[{i}]: needs name and role, may have side, facets, per_facet "
                                  f"(got keys {sorted(n)})")
            types.append(NodeType(str(n["name"]), str(n["role"]), str(n.get("side", "")),
                                  tuple(n.get("facets", ())), bool(n.get("per_facet", False))))
        sev = {k: tuple(v) for k, v in dict(getattr(graph_cfg, "severity", SEVERITY)).items()}
        return cls(facets=tuple(graph_cfg.facets), edge_kinds=tuple(tuple(e) for e in graph_cfg.edges),
                   label_names=tuple(label_names), label_rule=check_label_rule(label_rule, len(label_names)),
                   node_types=tuple(types), severity=tuple(sev.items()))

    def validate(self) -> None:
        names = [t.name for t in self.node_types]
        for i, t in enumerate(self.node_types):
            where = f"graph.nodes[{i}] ({t.name})"
            if not t.name or any(c in t.name for c in " <>/:") or names.count(t.name) > 1:
                raise SchemaError(f"{where}: the name must be unique and free of spaces and < > / :")
            if t.role not in ROLES:
                raise SchemaError(f"{where}: role {t.role!r} is not one of {list(ROLES)}")
            if (t.role == "evidence") != (t.side in SIDES):
                raise SchemaError(f"{where}: an evidence node has side query or product, other roles none (got {t.side!r})")
            if any(f not in self.facets for f in t.facets):
                raise SchemaError(f"{where}: facets {list(t.facets)} not all in graph.facets {list(self.facets)}")
            if t.role == "label" and (t.facets or t.per_facet):
                raise SchemaError(f"{where}: the label node covers no facets")
        if [t.role for t in self.node_types].count("label") != 1:
            raise SchemaError("graph.nodes: exactly one node type has role label")
        if not any(t.role == "evidence" and t.side == "query" for t in self.node_types):
            raise SchemaError("graph.nodes: at least one evidence node has side query (it says what the query asks)")
        for e in self.edge_kinds:
            if len(e) != 2 or e[0] not in names or e[1] not in names or e[0] == e[1]:
                raise SchemaError(f"graph.edges: bad edge {list(e)} (node types are {names})")
        custom = dict(self.severity) != SEVERITY  # the default names facets a graph may not have (WANDS: no brand)
        for f, levels in self.severity:
            if (custom and f not in self.facets) or len(levels) != 3 or any(not 0 <= x <= TOP_LEVEL for x in levels):
                raise SchemaError(f"graph.severity.{f}: a facet of graph.facets with 3 levels in 0..{TOP_LEVEL} "
                                  f"for (match, partial, mismatch), got {list(levels)}")
        for s in self.slot_info.values():  # a pooled verdict must express every level its facets can force
            if s.pooled:
                own = {self.slot_level(s.name, v) for v in VERDICTS}
                need = {self.facet_level(f, v) for f in s.facets for v in VERDICTS}
                if not need <= own:
                    raise SchemaError(f"graph.nodes ({s.name}): its facets {list(s.facets)} force rule levels "
                                      f"{sorted(need)}, a pooled verdict can only say {sorted(own)}")
        self.type_order()  # raises on a cycle

    def type_order(self) -> list[NodeType]:
        """Node types in a topological order of edge_kinds (ties by config order); SchemaError on a cycle."""
        names = [t.name for t in self.node_types]
        indeg = {n: sum(b == n for _, b in self.edge_kinds) for n in names}
        order, ready = [], [n for n in names if indeg[n] == 0]
        while ready:
            n = ready.pop(0)
            order.append(n)
            for a, b in self.edge_kinds:
                if a == n:
                    indeg[b] -= 1
                    if indeg[b] == 0:
                        ready.append(b)
        if len(order) != len(names):
            raise SchemaError(f"graph.edges: the edge types {self.edge_type_names} contain a cycle")
        return [self.node_types[names.index(n)] for n in order]

    @functools.cached_property
    def slot_info(self) -> dict[str, Slot]:
        """{node name: Slot} of the union graph, in topological order (parents before children)."""
        out = {}
        for t in self.type_order():
            covered = t.facets or (self.facets if t.role != "label" else ())
            for s in ([Slot(f"{t.name}:{f}", t, (f,)) for f in covered] if t.per_facet else [Slot(t.name, t, covered)]):
                out[s.name] = s
        return out

    @property
    def slots(self) -> list[str]:
        return list(self.slot_info)

    @functools.cached_property
    def label_slot(self) -> str:
        return next(n for n, s in self.slot_info.items() if s.type.role == "label")

    @property
    def edge_type_names(self) -> list[str]:
        return [f"{a}->{b}" for a, b in self.edge_kinds]

    def parents(self) -> tuple[list[list[int]], list[list[int]]]:
        """Per slot, its parent slots and the edge-type index of each parent edge (union graph)."""
        slots = list(self.slot_info.values())
        parents, etypes = [[] for _ in slots], [[] for _ in slots]
        for e, (a, b) in enumerate(self.edge_kinds):
            for u, su in enumerate(slots):
                if su.type.name != b:
                    continue
                for v, sv in enumerate(slots):
                    if sv.type.name == a and not (sv.type.per_facet and su.type.per_facet and sv.facets != su.facets):
                        parents[u].append(v)
                        etypes[u].append(e)
        return parents, etypes

    def tags(self) -> list[str]:
        return [t for s in self.slot_info for t in (f"<{s}>", f"</{s}>")]

    def words(self) -> list[str]:
        """Fixed words of the format (tags, facet names, verdicts, labels): part of every vocabulary."""
        return list(PROMPT_TAGS) + self.tags() + list(self.facets) + list(VERDICTS) + list(self.label_names)

    # ------------------------------------------------------------------------------------------------------
    # 2. Business rule (DESIGN §2) and the instance gate (DESIGN §4)

    def facet_level(self, facet: str, verdict: str) -> int:
        return dict(self.severity).get(facet, SECONDARY)[VERDICTS.index(verdict)]

    def slot_level(self, slot: str, verdict: str) -> int:
        """Rule level a verdict node's verdict forces: the most severe of its facets' (a pooled node's scale)."""
        return min(self.facet_level(f, verdict) for f in self.slot_info[slot].facets)

    def pool(self, slot: str, facet_verdicts: dict[str, str]) -> str:
        """A verdict node's verdict from its facets' verdicts: one facet, that verdict; several (pooled), the
        verdict of the slot whose level is the most severe level among them (validate: one always exists)."""
        s = self.slot_info[slot]
        if not s.pooled:
            return facet_verdicts[s.facets[0]]
        level = min(self.facet_level(f, v) for f, v in facet_verdicts.items())
        return next(v for v in VERDICTS if self.slot_level(slot, v) == level)

    def label_from_verdicts(self, verdicts: dict[str, str], by_slot: bool = False) -> int:
        """The business rule: label index from facet verdicts {facet: verdict} (by_slot: verdict-node verdicts
        {slot: verdict}, which give the same label). Facets the query does not mention impose nothing."""
        level = min([TOP_LEVEL] + [self.slot_level(k, v) if by_slot else self.facet_level(k, v)
                                   for k, v in verdicts.items()])
        return self.label_rule[level]

    def label_dependence(self, verdicts: dict[str, str], by_slot: bool = False) -> dict[str, bool]:
        """Instance gate g of the edges verdict -> label (DESIGN §4): would changing this verdict, the others fixed,
        change the label under the rule? A category mismatch masks every other facet, for example."""
        base = self.label_from_verdicts(verdicts, by_slot)
        return {k: any(self.label_from_verdicts({**verdicts, k: v}, by_slot) != base for v in VERDICTS if v != verdicts[k])
                for k in verdicts}

    # ------------------------------------------------------------------------------------------------------
    # gold content

    def present_slots(self, asked: Iterable[str]) -> list[str]:
        """Nodes of the per-example graph of a query that mentions `asked`: the label, and every node covering one."""
        asked = set(asked)
        return [n for n, s in self.slot_info.items() if s.type.role == "label" or asked & set(s.facets)]

    def gold_cot(self, q: dict[str, str], p: dict[str, str], verdicts: dict[str, str], label: int) -> dict[str, str]:
        """Node contents {node: text} from the facet values the query asks for (q), the product's (p), the verdicts."""
        cot = {}
        for name in self.present_slots(q):
            s = self.slot_info[name]
            fs = [f for f in s.facets if f in q]
            if s.type.role == "evidence":
                side = q if s.type.side == "query" else p
                cot[name] = " ".join(f"{f} {side[f]}" for f in fs)
            elif s.type.role == "verdict" and s.pooled:
                parts = " ".join(f"{f} {q[f]} {p[f]} {verdicts[f]}" for f in fs)
                cot[name] = f"{parts} {self.pool(name, {f: verdicts[f] for f in fs})}"
            elif s.type.role == "verdict":
                cot[name] = f"{q[fs[0]]} {p[fs[0]]} {verdicts[fs[0]]}"
            else:
                cot[name] = self.label_names[label]
        return cot


def check_label_rule(rule: Sequence[int], num_labels: int) -> tuple[int, ...]:
    """data.label_rule checked against the label scale: the rule's 4 levels -> label indices, non-decreasing
    and onto 0..num_labels-1 (every label reachable, order kept). Empty: the identity, for 4 labels only.

    WANDS (3 grades) uses [0, 1, 1, 2]: a product of the wrong kind (category mismatch) is Irrelevant, every
    product of the right kind that misses some facet is Partial, and a full match is Exact, as in the WANDS
    guidelines (a king bed for "queen bed" is Partial).
    """
    rule = tuple(rule) or (tuple(range(4)) if num_labels == 4 else ())
    if len(rule) != 4:
        raise ValueError(f"data.label_rule: {num_labels} label names need a rule of 4 entries (one per business-rule "
                         f"level 0..3), got {list(rule)}")
    if (any(not isinstance(x, int) or isinstance(x, bool) for x in rule) or list(rule) != sorted(rule)
            or set(rule) != set(range(num_labels))):
        raise ValueError(f"data.label_rule: {list(rule)} must be non-decreasing and use every label 0..{num_labels - 1}")
    return rule


DEFAULT_SCHEMA = GraphSchema()


def label_from_verdicts(verdicts: dict[str, str], schema: GraphSchema = DEFAULT_SCHEMA) -> int:
    """The business rule over facet verdicts (GraphSchema.label_from_verdicts)."""
    return schema.label_from_verdicts(verdicts)


# ----------------------------------------------------------------------------------------------------------
# 3. CoT serialiser and parser (DESIGN §1)

def format_prompt(query: str, product: str) -> str:
    return f"<query> {query} </query> <product> {product} </product>"


def serialize_cot(cot: dict[str, str], schema: GraphSchema) -> str:
    """Gold node contents {node name: content text} -> completion text, nodes in schema order."""
    return " ".join(f"<{s}> {cot[s]} </{s}>" for s in schema.slots if s in cot)


@dataclass(frozen=True)
class Verdict:
    """Content of a verdict node: its verdict and, per facet it compares, (query value, product value, verdict)."""
    verdict: str
    parts: tuple[tuple[str, tuple[str, str, str]], ...]

    @property
    def facet_verdicts(self) -> dict[str, str]:
        return {f: c[2] for f, c in self.parts}


@dataclass
class NodeSpan:
    start: int                 # index of the opening tag in the completion tokens
    end: int                   # one past the closing tag
    words: list[str]           # content words between the tags
    content: object = None     # evidence: {facet: value}; verdict: Verdict; label: index; None when broken
    broken: str = ""           # why the content does not parse ("" when it does)


@dataclass
class ParsedCoT:
    """What the parser found in one completion. Never raised on; garbage gives valid=False."""
    nodes: dict[str, NodeSpan] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    valid: bool = False
    label: int | None = None                                     # parsed label index, None if missing/broken
    verdicts: dict[str, str] = field(default_factory=dict)       # facet -> verdict, from well-formed verdict nodes
    node_verdicts: dict[str, str] = field(default_factory=dict)  # verdict node -> its verdict
    schema: GraphSchema | None = None

    @property
    def consistent(self) -> bool:
        """Faithfulness (DESIGN §3): the label follows from the rollout's own verdict nodes under the rule, and
        every pooled verdict from its own facet verdicts."""
        if not self.valid:
            return False
        s = self.schema
        pooled_ok = all(v == s.pool(n, self.nodes[n].content.facet_verdicts) for n, v in self.node_verdicts.items()
                        if s.slot_info[n].pooled)
        return pooled_ok and self.label == s.label_from_verdicts(self.node_verdicts, by_slot=True)

    def ok(self, name: str) -> bool:
        return name in self.nodes and not self.nodes[name].broken


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


def _compared(words: list[str], name: str):
    """'value_q value_p verdict' -> ((value_q, value_p, verdict), problem); values split in half."""
    if len(words) < 3 or words[-1] not in VERDICTS:
        return None, f"{name}: expected 'value value verdict'"
    half = (len(words) - 1) // 2
    return (" ".join(words[:half]), " ".join(words[half:-1]), words[-1]), ""


def parse_node_content(name: str, words: list[str], schema: GraphSchema):
    """Content of one node from its words -> (content, problem); see NodeSpan.content."""
    s = schema.slot_info[name]
    role = s.type.role
    if role == "evidence":
        out, key = {}, None
        for w in words:
            if w in schema.facets:
                if w in out:
                    return None, f"{name}: facet {w!r} twice"
                if w not in s.facets:
                    return None, f"{name}: facet {w!r} is not one of {list(s.facets)}"
                key, out[w] = w, ""
            elif key is None:
                return None, f"{name}: value {w!r} before any facet name"
            else:
                out[key] = (out[key] + " " + w).strip()
        if not out or any(v == "" for v in out.values()):
            return None, f"{name}: empty or missing value"
        return out, ""
    if role == "verdict" and not s.pooled:
        c, problem = _compared(words, name)
        return (None, problem) if problem else (Verdict(c[2], ((s.facets[0], c),)), "")
    if role == "verdict":  # pooled: (facet value value verdict)+ pooled_verdict
        if len(words) < 5 or words[-1] not in VERDICTS:
            return None, f"{name}: expected 'facet value value verdict ... verdict'"
        parts, cur = {}, None
        for w in words[:-1]:
            if w in s.facets and (cur is None or cur[1][-1:] and cur[1][-1] in VERDICTS):
                if w in parts:
                    return None, f"{name}: facet {w!r} twice"
                cur = (w, [])
                parts[w] = cur[1]
            elif cur is None:
                return None, f"{name}: {w!r} before any facet name"
            else:
                cur[1].append(w)
        compared = {}
        for f, ws in parts.items():
            compared[f], problem = _compared(ws, f"{name}/{f}")
            if problem:
                return None, problem
        return Verdict(words[-1], tuple(compared.items())), ""
    if len(words) != 1 or words[0] not in schema.label_names:
        return None, f"{name}: expected one label word"
    return schema.label_names.index(words[0]), ""


def parse_completion(ids: Sequence[int], vocab: TagVocab, schema: GraphSchema) -> ParsedCoT:
    """Token ids of a completion -> node spans (token index ranges) and contents (DESIGN §1).

    Never raises. Spans are [start, end) over `ids` and include both tags. Problems (missing, duplicated,
    unclosed or nested nodes, content that does not parse, nodes the rollout's own query evidence does not call
    for) are listed; `valid` means no problem, a well-formed label, and query evidence that asks for something.
    """
    out = ParsedCoT(schema=schema)
    ids = list(ids)
    if vocab.eos_id is not None and vocab.eos_id in ids:
        ids = ids[: ids.index(vocab.eos_id)]
    info = schema.slot_info
    open_name, open_at = None, -1
    for t, i in enumerate(ids):
        tag = vocab.id_to_tag.get(int(i))
        if tag is None:
            continue
        closing = tag.startswith("</")
        name = tag[2:-1] if closing else tag[1:-1]
        if name not in info:
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
    asked = set()
    for name, s in info.items():
        if s.type.role == "evidence" and s.type.side == "query" and out.ok(name):
            asked |= set(out.nodes[name].content)
    if not asked:
        out.problems.append("query evidence: missing or broken, so nothing is asked")
    expected = set(schema.present_slots(asked)) if asked else {schema.label_slot}
    for name, s in info.items():
        if name in expected and name not in out.nodes:
            out.problems.append(f"{name}: missing")
        elif name in out.nodes and name not in expected:
            out.problems.append(f"{name}: not called for by the query evidence ({sorted(asked)})")
        elif s.pooled and out.ok(name) and {f for f, _ in out.nodes[name].content.parts} != asked & set(s.facets):
            out.problems.append(f"{name}: compares {[f for f, _ in out.nodes[name].content.parts]}, the query evidence "
                                f"asks for {sorted(asked & set(s.facets))}")
    for name, span in out.nodes.items():
        if info[name].type.role == "verdict" and not span.broken:
            out.node_verdicts[name] = span.content.verdict
            out.verdicts.update(span.content.facet_verdicts)
    if out.ok(schema.label_slot):
        out.label = out.nodes[schema.label_slot].content
    out.valid = not out.problems and bool(asked) and out.ok(schema.label_slot)
    return out


def single_verdict_repairs(parsed: ParsedCoT, label: int, schema: GraphSchema) -> list[tuple[str, str]]:
    """The single-verdict repairs of an answer: every (facet, verdict) change of one of its facet verdicts, the
    others kept, after which the business rule (DESIGN §2) gives `label`. Uses the outcome label only. Empty for an
    answer that does not parse (valid False) or has no facet verdicts. Read by rl.repair_replay and the repair
    screen (experiments/reach_screen.py)."""
    have = parsed.verdicts if parsed.valid else {}
    return [(f, v) for f, cur in have.items() for v in VERDICTS
            if v != cur and schema.label_from_verdicts({**have, f: v}) == label]


def repaired_cot(parsed: ParsedCoT, facet: str, verdict: str, label: int, schema: GraphSchema) -> dict[str, str]:
    """Node contents {node: text} (for serialize_cot) of a valid answer with facet `facet`'s verdict set to
    `verdict`: every verdict node comparing that facet rewritten, a pooled node's own verdict pooled again from its
    facets (DESIGN §1), and the label node set to `label`; every other word as the answer wrote it. With a repair
    from single_verdict_repairs the result parses as a valid answer that follows the rule and has label `label`."""
    cot = {}
    for name, span in parsed.nodes.items():
        s = schema.slot_info[name]
        if s.type.role == "verdict":
            parts = span.content.parts  # ((facet, (query value, product value, verdict)), ...)
            fv = {f: verdict if f == facet else c[2] for f, c in parts}
            compared = [f"{c[0]} {c[1]} {fv[f]}" for f, c in parts]
            cot[name] = (" ".join(f"{f} {x}" for (f, _), x in zip(parts, compared)) + f" {schema.pool(name, fv)}"
                         if s.pooled else compared[0])
        elif s.type.role == "label":
            cot[name] = schema.label_names[label]
        else:
            cot[name] = " ".join(span.words)
    return cot


# ----------------------------------------------------------------------------------------------------------
# 4. Node keys (DESIGN §4), gold correctness (§4.2), local verifiers (§3)

def node_keys(parsed: ParsedCoT, with_values: bool = False) -> dict[str, object]:
    """Canonical content key of every well-formed node (DESIGN §4): a key must repeat within a group, so
    evidence: the set of (facet, value) pairs; verdict: the verdict (optionally with the compared values);
    label: the label."""
    keys = {}
    for name, span in parsed.nodes.items():
        if span.broken:
            continue
        c = span.content
        if isinstance(c, dict):
            keys[name] = tuple(sorted(c.items()))
        elif isinstance(c, Verdict):
            keys[name] = (c.verdict, c.parts) if with_values else c.verdict
        else:
            keys[name] = c
    return keys


def gold_node(name: str, ex: "Example", schema: GraphSchema):
    """The gold content of node `name` of an example (as parse_node_content gives it; a verdict node: its verdict),
    or None where the example has no gold for it (label-only data, a facet the query does not mention)."""
    s = schema.slot_info[name]
    if s.type.role == "evidence":
        text = (ex.cot or {}).get(name)
        return None if text is None else parse_node_content(name, text.split(), schema)[0]
    if s.type.role == "verdict":
        vs = {f: v for f, v in (ex.nodes or {}).items() if f in s.facets}
        return schema.pool(name, vs) if vs else None
    return ex.meta.get("clean_label", ex.label)  # the true label where the RL pool's label is noisy (data.rl_label_noise)


def node_is_correct(name: str, parsed: ParsedCoT, ex: "Example", schema: GraphSchema) -> bool | None:
    """Is node `name` of a parsed CoT right against the gold annotation (None where there is no gold)?"""
    gold = gold_node(name, ex, schema)
    if gold is None:
        return None
    if not parsed.ok(name):
        return False
    c = parsed.nodes[name].content
    return (c.verdict if isinstance(c, Verdict) else c) == gold


SCORE_KINDS = ("grounding", "comparator")
# The score kinds without which a step's content is not judged, per role (credit.shield = complete; credit.
# verified_steps): a verdict step's grounding only checks that its values were copied from the evidence; whether the
# verdict is right is the comparator's to say, and where the comparator abstains (a form it does not know) nobody has
# said it. The other roles' scores judge them whole where they apply.
JUDGING_KINDS = {"verdict": ("comparator",)}


def verifier_scores(parsed: ParsedCoT, query: str, product: str, comparator: Callable[[str, str, str], str | None],
                    schema: GraphSchema) -> dict[str, tuple[float, float]]:
    """Per well-formed node: (grounding, comparator) in [0, 1], NaN where a kind does not apply.

    grounding  evidence: share of listed values that occur in the query / product text; verdict: every compared
               pair equals the rollout's own evidence values for that facet.
    comparator verdict: the verdict equals the verifier's comparator on the copied values (pooled the same way);
               label: rule adherence (the label follows from the rollout's own verdicts). The comparator knows
               head surface forms only, so it is wrong on forms it has not been told about, like a real heuristic;
               where it abstains (returns None: reward.comparator_unknown = abstain) on any compared pair, the
               verdict node's comparator score is NaN, no evidence.
    """
    nan = float("nan")
    text = {"query": set(query.split()), "product": set(product.split())}
    own = {"query": {}, "product": {}}  # the rollout's own evidence values per side and facet
    for name, span in parsed.nodes.items():
        s = schema.slot_info[name]
        if s.type.role == "evidence" and not span.broken:
            own[s.type.side].update(span.content)
    out = {}
    for name, span in parsed.nodes.items():
        if span.broken:
            continue
        role = schema.slot_info[name].type.role
        if role == "evidence":
            words = text[schema.slot_info[name].type.side]
            vals = list(span.content.values())
            out[name] = (sum(all(w in words for w in v.split()) for v in vals) / len(vals), nan)
        elif role == "verdict":
            parts = dict(span.content.parts)
            grounded = all(own["query"].get(f) == vq and own["product"].get(f) == vp for f, (vq, vp, _) in parts.items())
            calls = {f: comparator(f, vq, vp) for f, (vq, vp, _) in parts.items()}
            judged = None if None in calls.values() else schema.pool(name, calls)
            out[name] = (float(grounded), nan if judged is None else float(judged == span.content.verdict))
        else:
            out[name] = (nan, float(parsed.label == schema.label_from_verdicts(parsed.node_verdicts, by_slot=True)))
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
            bad = [k for k in cot if k not in schema.slot_info]
            if bad:
                raise DataError(f"{where}: field 'cot' has unknown node {bad[0]!r} (nodes: {schema.slots})")
            y = schema.label_slot
            if y not in cot:
                raise DataError(f"{where}: field 'cot' lacks node '{y}'")
            if cot[y] != schema.label_names[obj["label"]]:
                raise DataError(f"{where}: field 'cot.{y}' = {cot[y]!r} disagrees with label {obj['label']}")
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
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
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
