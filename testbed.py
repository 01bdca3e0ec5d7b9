"""The testbed: the data a run trains on, made from the config (DESIGN.md §2). data.py is the format the method
reads; this file writes it (as nanoGPT's prepare.py does), once, into data.dir, and loads it for a run.

    python testbed.py configs/base.yaml         # the testbed's figures: label shares, long tail, verifiers (README)

Read in this order:
  1. synthetic catalogue   facets with hierarchy / aliases / synonyms / units; the gold and the verifier comparators
  2. generator, splits     seeded examples with gold CoT in the config's graph schema; sft / rl / test splits
  3. WANDS                 real relevance pairs -> JSONL (label-only tests), a catalogue built from WANDS
  4. Task                  what a run reads: schema, splits, the verifiers' comparator, the vocabulary; split stats
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from data import (FACETS, VERDICTS, DataError, Example, GraphSchema, SCORE_KINDS, TagVocab, load_jsonl,
                  parse_completion, serialize_cot, verifier_scores, write_jsonl)

# ----------------------------------------------------------------------------------------------------------
# 1. Synthetic catalogue (DESIGN §2)
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

    def compare(self, facet: str, vq: str, vp: str, known: Callable[[str], bool] | None = None,
                unknown: str = "mismatch") -> str | None:
        """Verdict of a query value against a product value. With `known`, forms it rejects are unknown and
        compare by string only (the head-only verifier). `facet` is a role or a facet name. Where that fallback
        applies and the strings differ, unknown='mismatch' guesses a mismatch (wrong on every long-tail form of an
        equal value) and unknown='abstain' returns None: no verdict (reward.comparator_unknown)."""
        facet = self.role.get(facet, facet)

        def canon(v):
            f = self.form.get(v)
            if f is None or f[0] != facet or (known is not None and not known(v)):
                return None
            return f[1]
        cq, cp = canon(vq), canon(vp)
        if cq is None or cp is None:
            if vq == vp:
                return "match"
            return None if unknown == "abstain" else "mismatch"
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

    def head_compare(self, facet: str, vq: str, vp: str, unknown: str = "mismatch") -> str | None:
        """The local verifier's comparator: head forms only (DESIGN §3); `unknown` as in `compare`."""
        return self.compare(facet, vq, vp, known=lambda v: not self.form[v][2], unknown=unknown)


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
        if schema.label_from_verdicts(named(verdicts)) != target:
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
            pivotal = schema.label_dependence(named(verdicts))[name[f]]
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
        cot = schema.gold_cot(named(q), named(p), named(verdicts), target)
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


# ----------------------------------------------------------------------------------------------------------
# 2. Generator and splits (DESIGN §2)

SPLITS = ("sft", "rl", "test_id", "test_longtail")


def generate_splits(schema: GraphSchema, seed: int, n_sft: int, n_rl: int, n_test_id: int,
                    n_test_longtail: int, longtail_in_sft: float, longtail_in_rl: float,
                    unseen_longtail: bool = True, cat: Catalogue | None = None,
                    rl_label_noise: float = 0.0, noise_kind: str = "uniform") -> dict[str, list[Example]]:
    """The four splits (DESIGN §2), each from its own seeded stream so that changing one size leaves the
    others unchanged. sft/test_id: head forms and rare long-tail forms at rate longtail_in_sft; rl: a share
    longtail_in_rl of examples carry one long-tail form of any kind; test_longtail: every example does.
    `cat`: the catalogue (default: the hand-made one); its facet names must be the schema's facets.
    rl_label_noise, noise_kind: annotation noise on the RL pool only (label_noise)."""
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
    if rl_label_noise > 0:
        label_noise(out["rl"], rl_label_noise, len(schema.label_names), random.Random(seed * 1000 + len(plan)),
                    noise_kind)
    return out


def label_noise(examples: list[Example], p: float, num_labels: int, rng: random.Random,
                kind: str = "uniform") -> None:
    """In place: each example's label, with probability p, becomes a wrong one: for kind "uniform" a uniformly drawn
    *other* label, as an annotator who errs at rate p and then guesses would give; for kind "adjacent" a neighbouring
    grade (one up or one down, each half the time where both exist), as graders of an ordinal scale mostly err. The
    true label stays in meta['clean_label'] (data.gold_node's gold for the label node) and the gold facet verdicts
    (`nodes`, diagnostics) are unchanged. A relabelled example loses its CoT: no chain of steps ends in the wrong
    label (data.parse_example refuses one that disagrees), so it is label-only, as the product's pool is (the
    gold-CoT replay skips it). The same two draws per example whatever p and kind, so the examples hit at a smaller p
    are a subset of those hit at a larger one, and both kinds hit the same examples (the same seed); "adjacent"
    picks its neighbour from u / p, uniform in [0, 1) given u < p."""
    if kind not in ("uniform", "adjacent"):
        raise ValueError(f"kind={kind!r}, expected 'uniform' or 'adjacent'")
    for ex in examples:
        u, other = rng.random(), rng.randrange(num_labels - 1)
        if u < p:
            ex.meta["clean_label"] = ex.label
            if kind == "adjacent":
                near = [y for y in (ex.label - 1, ex.label + 1) if 0 <= y < num_labels]
                ex.label = near[int(u / p * len(near))]
            else:
                ex.label = other + (other >= ex.label)
            ex.cot = None


def schema_tag(schema: GraphSchema) -> str:
    """'' for the default graph; else '-g' + a digest of what the gold CoT depends on (node types, facets, label
    scale, severity; not the edges), so that data of one graph never stands in for another's."""
    what = lambda g: repr((g.node_types, g.facets, g.label_names, g.label_rule, g.severity))  # noqa: E731
    if what(schema) == what(GraphSchema()):
        return ""
    return "-g" + hashlib.sha1(what(schema).encode()).hexdigest()[:8]


def prepare_synthetic(data_cfg, schema: GraphSchema, cat: Catalogue | None = None,
                      prefix: str = "") -> dict[str, str]:
    """Write the synthetic splits under data_cfg.dir once (deterministic; reused when present). Returns paths.
    `prefix` names a non-default catalogue in the directory name, schema_tag a graph whose gold CoT differs."""
    tag = prefix + (f"s{data_cfg.seed}-{data_cfg.n_sft}-{data_cfg.n_rl}-{data_cfg.n_test_id}-{data_cfg.n_test_longtail}"
           f"-{data_cfg.longtail_in_sft}-{data_cfg.longtail_in_rl}" + ("" if data_cfg.unseen_longtail else "-nounseen")
           + (f"-noise{data_cfg.rl_label_noise}" if data_cfg.rl_label_noise else "")
           + ("-adjacent" if data_cfg.rl_label_noise and data_cfg.rl_label_noise_kind == "adjacent" else "")
           + schema_tag(schema))
    root = os.path.join(data_cfg.dir, tag)
    paths = {s: os.path.join(root, f"{s}.jsonl") for s in SPLITS}
    if not all(os.path.exists(p) for p in paths.values()):
        splits = generate_splits(schema, data_cfg.seed, data_cfg.n_sft, data_cfg.n_rl, data_cfg.n_test_id,
                                 data_cfg.n_test_longtail, data_cfg.longtail_in_sft, data_cfg.longtail_in_rl,
                                 data_cfg.unseen_longtail, cat, data_cfg.rl_label_noise, data_cfg.rl_label_noise_kind)
        for s, exs in splits.items():
            write_jsonl(paths[s], exs)
    return paths


# ----------------------------------------------------------------------------------------------------------
# 3. WANDS: real pairs and a catalogue built from them (DESIGN §2, real data)
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


def prepare_wands(data_cfg, schema: GraphSchema, cat: Catalogue) -> dict[str, str]:
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
    paths = prepare_synthetic(data_cfg, schema, cat, prefix)
    real = os.path.join(os.path.dirname(paths["sft"]), f"{WANDS_REAL_SPLIT}.jsonl")
    if not os.path.exists(real):
        convert_wands(wdir, real, data_cfg.wands_grades)
    paths[WANDS_REAL_SPLIT] = real
    return paths


# ----------------------------------------------------------------------------------------------------------
# 4. Task: what a run reads

def catalogue_of(data_cfg) -> Catalogue:
    """The catalogue behind the config's synthetic data (the built-in one, or the WANDS-built one for source
    'wands'): its head-form comparator is the verifier the trainer, the evaluation and the distillation use."""
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


@dataclass
class Task:
    """What a run reads, made once from the config: the graph schema, the splits ('sft', 'rl', then the test
    splits), the catalogue whose head-form comparator the verifiers use, and `strict`: every word of the data is
    in the tokenizer (the synthetic testbed; an unknown word is then a bug, while real text has unknown words).
    `comparator_unknown`: what that comparator says on forms it does not know (reward.comparator_unknown)."""
    schema: GraphSchema
    splits: dict[str, list[Example]]
    catalogue: Catalogue
    strict: bool
    comparator_unknown: str = "mismatch"

    @property
    def tests(self) -> dict[str, list[Example]]:
        return {k: v for k, v in self.splits.items() if k not in ("sft", "rl")}

    @property
    def comparator(self) -> Callable[[str, str, str], str | None]:
        return functools.partial(self.catalogue.head_compare, unknown=self.comparator_unknown)

    def vocabulary(self) -> list[str]:
        return vocabulary(self.schema, (ex for exs in self.splits.values() for ex in exs))


def load_task(cfg) -> Task:
    """The schema and every split named by the config. data.source 'synthetic' writes (once) and loads the
    generator's splits; 'jsonl' loads data.dir/<sft_file>, <rl_file> and each of <test_files> (a test split is
    named by its file stem); 'wands' writes (once) the generator's splits over the WANDS-built catalogue plus the
    converted real pairs (test split 'wands', label-only), see section 3."""
    schema = GraphSchema.from_config(cfg.graph, cfg.data.label_names, cfg.data.label_rule)
    cat = catalogue_of(cfg.data)
    if cfg.data.source == "synthetic":
        paths = prepare_synthetic(cfg.data, schema)
    elif cfg.data.source == "wands":
        paths = prepare_wands(cfg.data, schema, cat)
    else:
        paths = {"sft": os.path.join(cfg.data.dir, cfg.data.sft_file), "rl": os.path.join(cfg.data.dir, cfg.data.rl_file)}
        for f in cfg.data.test_files:
            paths[os.path.splitext(os.path.basename(f))[0]] = os.path.join(cfg.data.dir, f)
    n = len(schema.label_names)
    return Task(schema, {s: load_jsonl(p, n, schema) for s, p in paths.items()}, cat, cfg.data.source == "synthetic",
                cfg.reward.comparator_unknown)


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
    from config import cli, parse_args
    _cfg = parse_args(sys.argv[1:])[0]
    _task = cli(lambda: load_task(_cfg))
    print(json.dumps(split_stats(_task.splits, _task.schema, _task.catalogue), indent=1))
