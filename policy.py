"""
Everything that touches the language model: the word-level tokenizer, building and loading
the causal LM, batched sampling with a shared KV cache, and per-token log-probs.

Used by sft_mask.py (tokenizer, model, save), eval.py (greedy sampling), graph_grpo.py
(G rollouts per prompt, log-probs at the sampling temperature for the loss of DESIGN.md
section 6, hidden states and logits for the Eq. 3 controller) and distill.py (teacher
forcing on the teacher's own CoT).

Sequence layout shared by sampling and the loss (DESIGN.md section 7):

    [left pad][prompt][completion][right pad]

position ids come from the attention mask (cumsum - 1), so a left-padded row sees exactly the
positions it would see alone.

Sampling is deterministic and independent of batching: the uniform that picks output row r's
token at step s (inverse CDF) is a counter-based hash of (seed, r, s), so row r's sample
depends only on (seed, r, its own prefix). `sample` (shared prompt cache, finished rows
dropped) and `sample_reference` (one row at a time, no cache) therefore give the same tokens;
the reference is the readable spec and the test oracle.
"""
import contextlib
import json
import os
import re
import warnings
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoTokenizer, DynamicCache,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import decoder

# -----------------------------------------------------------------------------
# tokenizer

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "mask_token": "<mask>",  # CoT random masking (DESIGN.md section 9)
}
_TAG = re.compile(r"^<[^<>\s]+>$")


def is_tag_token(word: str) -> bool:
    """`<q>`, `</q>`, `<f:brand>`, `<mask>`: words that must stay one token in any tokenizer."""
    return bool(_TAG.match(word))


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0..4 are SPECIAL_TOKENS (in dict order), then `words` sorted.

    Tags (`<q>`, `<f:brand>`, ...) are plain words of the vocabulary. Text splits on
    whitespace; decoding joins tokens with single spaces (the tokenizers library's default
    when no decoder is set). save_pretrained + AutoTokenizer.from_pretrained round-trips ids.
    """
    specials = list(SPECIAL_TOKENS.values())
    words = sorted(set(words) - set(specials))
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"build_word_tokenizer: words must be non-empty and contain no whitespace: {bad[:5]!r}")
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def encode(tokenizer, text: str, strict: bool) -> list[int]:
    """Token ids of `text`, no special tokens added. strict: an unknown word is a ValueError."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = tokenizer.unk_token_id
    if strict and unk is not None and unk in ids:
        unknown = [w for w in text.split() if tokenizer.convert_tokens_to_ids(w) == unk]
        raise ValueError(f"encode: word(s) not in the vocabulary: {sorted(set(unknown))!r} in {text[:80]!r}")
    return ids


def count_unknown(tokenizer, ids: list[int]) -> int:
    """Number of <unk> ids in `ids` (0 for tokenizers without an unk token, e.g. byte-level BPE)."""
    unk = tokenizer.unk_token_id
    return 0 if unk is None else sum(1 for i in ids if i == unk)


def add_graph_tokens(tokenizer, model, tokens: Iterable[str]) -> int:
    """Make every tag in `tokens` (and the mask token) one token id of a pretrained tokenizer.

    Adds the missing tags as (non-special, so decode keeps them) added tokens, a `<mask>` mask
    token and a `<eos>` eos token where the tokenizer has none, sets pad = eos where pad is
    missing, and grows the model's embeddings when the new ids do not fit. Tokens already in
    the vocabulary are left alone, so on our own word-level checkpoints this adds nothing.
    A tag absorbs the space before it (lstrip): in a byte-level BPE that space would otherwise be a
    token of its own before every tag, and a node's decision word would not sit right before its
    closing tag (distill.node_word_positions); decoding then drops that space, which no parser sees
    (contents are read between tags). The new embedding rows are drawn from a fixed seed, so that a
    model loaded twice gets the same rows (transformers draws them from the global RNG).
    Returns the number of tokens added.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab and t != SPECIAL_TOKENS["mask_token"]]
    added = tokenizer.add_tokens([AddedToken(t, lstrip=True, normalized=False) for t in missing], special_tokens=False)
    if tokenizer.mask_token is None:
        added += tokenizer.add_special_tokens({"mask_token": SPECIAL_TOKENS["mask_token"]})
    if tokenizer.eos_token is None:
        added += tokenizer.add_special_tokens({"eos_token": SPECIAL_TOKENS["eos_token"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Some checkpoints (Qwen) ship more embedding rows than tokenizer entries: never shrink.
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tokenizer))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, key)
        if value is not None:
            setattr(model.config, key, value)
    return added


# -----------------------------------------------------------------------------
# model


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cuda' -> cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def tiny_kwargs(model_cfg, seed: int = 0) -> dict:
    """build_tiny_model's arguments from the config's model section."""
    return dict(hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                num_kv_heads=model_cfg.num_kv_heads, intermediate_size=model_cfg.intermediate_size,
                max_positions=model_cfg.max_positions, tie_embeddings=model_cfg.tie_embeddings, seed=seed)


def resolve_dtype(dtype, device) -> torch.dtype:
    """Parameter dtype. 'auto' -> fp32 parameters everywhere; on CUDA the forward runs under bf16 autocast
    (`autocast`): fp32 master weights, the usual mixed-precision recipe. 'bfloat16' asks for bf16 parameters
    (memory for large checkpoints); also accepts torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype: unknown value {dtype!r}, expected 'auto' or one of {sorted(names)}")
    return names[dtype]


def adamw(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over each parameter instead of about ten operators; 6x faster on one CPU
    thread at SmolLM2's 135M parameters, benchmarks/README.md; TRL's Trainer default) where every parameter is a
    plain floating-point tensor on CPU or CUDA; else the default implementation (FSDP2's DTensor shards). The same
    update up to rounding (tests/test_policy.py); checkpoints of either load into the other."""
    params = list(params)
    fused = all(type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def autocast(dtype, device):
    """bf16 autocast for dtype 'auto' on CUDA (fp32 master weights); a no-op context elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype == "auto" and device.type == "cuda"))


def build_tiny_model(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 512,
                     max_positions: int = 512, tie_embeddings: bool = False, seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM; the same seed gives the same weights, global RNG untouched."""
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model


def load_policy(name_or_path: str | None, tokenizer_words: Iterable[str], dtype="auto", device="cpu",
                tiny_kwargs: dict | None = None, key: str = ""):
    """(model, tokenizer) on `device`.

    None: a fresh word tokenizer over `tokenizer_words` and a tiny Qwen2 (`tiny_kwargs` go to
    build_tiny_model). A local directory: any HF causal LM checkpoint (ours from save_policy, or
    a pretrained one); the tag-shaped words of `tokenizer_words` (`<...>`, see is_tag_token)
    are added as single tokens where missing (add_graph_tokens). Never downloads.
    The directory is checked first (checkpoint.check_model_dir: its manifest where it has one,
    config.json, a tokenizer); a directory that cannot be used is one error naming the path, and
    `key`, the config key that gave it (FileNotFoundError when missing, else checkpoint.PathError).
    """
    dtype = resolve_dtype(dtype, device)
    words = list(tokenizer_words)
    if name_or_path is None:
        tokenizer = build_word_tokenizer(words)
        model = build_tiny_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                 tokenizer.eos_token_id, **(tiny_kwargs or {}))
        return model.to(device=device, dtype=dtype), tokenizer
    from checkpoint import check_model_dir, load_error  # here: checkpoint imports this module
    from safetensors import SafetensorError
    check_model_dir(name_or_path, key)
    tokenizer = _load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise load_error(f"{key} = {name_or_path}" if key else name_or_path, "model", err) from None
    add_graph_tokens(tokenizer, model, sorted(w for w in words if is_tag_token(w)))
    return model.to(device=device, dtype=dtype), tokenizer


def _load_tokenizer(path: str):
    """Our word-level tokenizer must load as itself: AutoTokenizer maps a directory whose config.json says
    'qwen2' to Qwen2Tokenizer, which replaces the whitespace pre-tokenizer and silently encodes to nothing."""
    from checkpoint import load_error  # here: checkpoint imports this module
    tj = os.path.join(path, "tokenizer.json")
    try:
        if os.path.isfile(tj):
            with open(tj, encoding="utf-8") as f:
                if json.load(f).get("model", {}).get("type") == "WordLevel":
                    return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:  # a JSON error is a ValueError
        raise load_error(path, "tokenizer", err) from None


def save_policy(model, tokenizer, out_dir: str) -> None:
    """save_pretrained of model and tokenizer into one directory; load_policy(out_dir) reads it back."""
    model = getattr(model, "module", model)  # DDP
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# -----------------------------------------------------------------------------
# batching helpers


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) positions: 0 at the first real token; pads get 0 (never attended to)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to the longest one: (input_ids (B, P), attention_mask (B, P))."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def build_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device=None):
    """[left pad][prompt][completion][right pad] -> input_ids, attention_mask, completion_mask, all (N, P + C).

    len(completions) may be a multiple k of len(prompts): completions are then group-contiguous
    (k per prompt, prompt 0's first), the layout `sample` returns.
    """
    if len(prompts) == 0 or len(completions) % len(prompts) != 0:
        raise ValueError(f"build_sequences: {len(completions)} completions is not a multiple of {len(prompts)} prompts")
    k = len(completions) // len(prompts)
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(k)], pad_id)  # (N, P)
    width = max([len(c) for c in completions] + [0])
    comp_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        comp_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        comp_mask[i, :len(c)] = 1
    input_ids = torch.cat([prompt_ids, comp_ids], 1)
    attention_mask = torch.cat([prompt_mask, comp_mask], 1)
    completion_mask = torch.cat([torch.zeros_like(prompt_mask), comp_mask], 1)
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device)


# -----------------------------------------------------------------------------
# log-probs


class TokenLogprobs(NamedTuple):
    """Per-position outputs of token_logprobs, all aligned with input_ids (B, L): entry t belongs
    to the prediction of input_ids[:, t] from input_ids[:, :t]; 0 where completion_mask is 0."""
    logprobs: torch.Tensor  # (B, L) float32, log softmax(logits / T)[token]
    entropy: torch.Tensor | None  # (B, L) float32, entropy of softmax(logits / T)
    hidden: torch.Tensor | None  # (B, L, H) model dtype, input of the lm head that produced the prediction
    logits: torch.Tensor | None  # (B, L, V) float32, logits / T (softmax of it is pi at temperature T)


def rolled_to_right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Left-padded rows (B, L) rolled so that their padding is on the right: (ids, mask, left), left (B,) the
    leading pads per row; rolled[:, j] = original[:, (j + left) % L]."""
    L = input_ids.shape[1]
    left = (attention_mask.long().cumsum(1) == 0).sum(1)
    roll = (torch.arange(L, device=input_ids.device)[None] + left[:, None]) % L
    return input_ids.gather(1, roll), attention_mask.gather(1, roll), left


PACKED_ATTENTION = "graph_grpo_packed"
"""The attention implementation name of a packed pass (registered with transformers below)."""
PACK_MIN_PADDING = 0.1
"""A packed pass drops the grid's padding only when at least this share of its (rows x columns) cells is padding;
below, it feeds every cell (the packed sequence is then the grid itself: no scatter, no gather). Measured at
hidden 256 (benchmarks/README.md): scattering and gathering cost 6% of an update without padding; dropping 19%
padding saved 14-19%."""
NO_PACKING = "_graph_grpo_no_packing"
"""Set on a model whose attention layers ignored the packed implementation: its passes run unpacked from then on."""


class PackingUnsupported(RuntimeError):
    """The model's attention layers did not all take the packed path: the pass's numbers are wrong."""


class PackedRows(NamedTuple):
    """Where a packed pass's tokens sit in their rows, and what each row attends to before its own tokens.

    A packed pass feeds the N distinct prefixes of a (B, S) grid of right-padded rows as one sequence (1, N): every
    projection, MLP and norm runs on those tokens only, once per prefix however many rows share it. Attention
    alone needs rows: packed_attention places each cell's query / key / value (its prefix's) in the grid, puts each
    row's prompt keys / values (if any) in front, and takes each token's output from its first cell."""
    cell_token: torch.Tensor | None  # (B * S,) the token (0..N-1) at each cell, N where none is fed; None: every
    # cell fed, none shared (the sequence is the grid, row after row)
    first_cell: torch.Tensor | None  # (N,) row * S + column of each token's first cell (row-major)
    rows: int                  # B
    columns: int               # S
    prompt: tuple | None       # None: each row starts in the grid (causal attention); else (cache, group, mask):
    # the prompts' keys / values per layer (n, kv_heads, P, d) from a prompt pass (differentiable), the prompt of
    # each row (B,), and (B, 1, S, P + S) bool: the row's real prompt tokens, then causal over the row
    calls: list                # one entry per attention call: checks that every layer took the packed path


def packed_attention(module, query, key, value, attention_mask, packed_rows: PackedRows | None = None, **kwargs):
    """Attention of a packed pass (query (1, heads, N, d), key / value (1, kv_heads, N, d), rotary applied at the
    tokens' own positions) for the rows described by `packed_rows`; returns (1, N, heads, d) as transformers'
    attention functions do. The attention itself is transformers' SDPA function on the (B, S) grid (its scaling,
    GQA and kernel choice), so each token sees exactly what it sees in the per-row forward. A token shared by
    several rows (a common prefix) has the same keys before it in each of them, hence the same output: it is read
    from its first cell; its key / value's gradient sums over the rows that attend to it."""
    if packed_rows is None:
        raise RuntimeError(f"attention implementation {PACKED_ATTENTION!r} is only for policy.packed_forward")
    pr = packed_rows
    pr.calls.append(module.layer_idx)

    def grid(x):  # (1, h, N, d) -> (B, h, S, d), zeros where no token is fed
        h, d = x.shape[1], x.shape[-1]
        if pr.cell_token is None:  # every cell fed, row after row
            return x[0].view(h, pr.rows, pr.columns, d).transpose(0, 1)
        tokens = torch.cat([x[0].transpose(0, 1), x.new_zeros(1, h, d)])  # (N + 1, h, d): row N is "no token"
        return tokens.index_select(0, pr.cell_token).view(pr.rows, pr.columns, h, d).transpose(1, 2)

    if pr.prompt is None:  # causal within each row: SDPA's causal kernel, no mask tensor
        out, _ = sdpa_attention_forward(module, grid(query), grid(key), grid(value), None, **kwargs)
    else:
        cache, group, mask = pr.prompt
        layer = cache.layers[module.layer_idx]
        k = torch.cat([layer.keys.index_select(0, group), grid(key)], 2)      # (B, kv_heads, P + S, d)
        v = torch.cat([layer.values.index_select(0, group), grid(value)], 2)
        out, _ = sdpa_attention_forward(module, grid(query), k, v, mask, **kwargs)  # (B, S, heads, d)
    out = out.reshape(pr.rows * pr.columns, *out.shape[2:])
    return (out if pr.cell_token is None else out.index_select(0, pr.first_cell))[None], None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """config._attn_implementation set to `name` inside the block (every attention layer of Qwen2, Llama and
    GPT-2 reads it at each call), restored after."""
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved


@contextlib.contextmanager
def lm_head_inputs(model, on: bool = True):
    """Yields a list that collects the output layer's input of every forward inside the block (nothing when
    `on` is False); `model` may be wrapped."""
    captured = []
    hook = getattr(model, "module", model).get_output_embeddings().register_forward_hook(
        lambda module, args, output: captured.append(args[0])) if on else None
    try:
        yield captured
    finally:
        if hook is not None:
            hook.remove()


def shared_prefixes(ids: torch.Tensor, fed: torch.Tensor, roots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct prefixes of a (B, S) grid of right-padded rows. Rows with the same root (the same context
    before column 0: the same prompt) and the same first s + 1 tokens share a prefix at column s.

    ids (B, S) long, fed (B, S) bool (a prefix of each row), roots (B,) long >= 0. Returns node (B, S) long, the
    index of each fed cell's prefix (-1 where not fed), and first (N,) long, the first cell (row * S + column) of
    each of the N prefixes; indices follow the first cells in row-major order, so with nothing shared they number
    the fed cells row after row."""
    B, S = ids.shape
    width = int(ids.max()) + 1 if ids.numel() else 1
    node = torch.full((B, S), -1, dtype=torch.long, device=ids.device)
    parent, count = roots.long(), 0
    for s in range(S):  # one column at a time: a prefix is (its parent prefix, its token)
        rows = fed[:, s].nonzero().squeeze(1)
        if len(rows) == 0:
            break
        _, local = torch.unique(parent[rows] * width + ids[rows, s], return_inverse=True)
        node[rows, s] = count + local
        parent = torch.zeros_like(parent).index_copy(0, rows, local)
        count += int(local.max()) + 1
    if count == 0:
        return node, torch.zeros(0, dtype=torch.long, device=ids.device)
    flat = node.flatten()
    cells = (flat >= 0).nonzero().squeeze(1)
    first = torch.full((count,), B * S, dtype=torch.long, device=ids.device).scatter_reduce(
        0, flat[cells], cells, "amin")
    first, order = first.sort()                                             # renumbered by first cell
    rank = torch.empty_like(order).index_copy_(0, order, torch.arange(count, device=ids.device))
    return torch.where(node >= 0, rank[node.clamp(min=0)], node), first


def packed_forward(model, ids: torch.Tensor, fed: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                   prompt: tuple | None = None, return_hidden: bool = False, roots: torch.Tensor | None = None):
    """`model` on the fed cells of a (B, S) grid of right-padded rows, packed into one sequence (1, N) with one
    token per distinct prefix (shared_prefixes): a prefix common to several rows runs once.

    ids / positions (B, S): each cell's token and position id (cells of one prefix have one position); fed (B, S)
    bool, a prefix of each row: the cells that run; keep (B, S) bool, within fed: the cells whose predictions are
    asked for. roots (B,) long: each row's context before column 0 (prefixes are shared within a root only; None:
    every row its own). prompt: PackedRows.prompt without its mask, i.e. (cache, group, prompt mask (n, P) bool),
    or None; rows of one root must have one prompt. With nothing shared and less than PACK_MIN_PADDING of the grid
    unfed, every cell runs (no scatter); with none fed, one cell runs and is never read (ranks run the same
    forwards, parallel.FSDP_MIN_COLUMNS). `model` may be DDP-wrapped: the pass goes through the wrapper. Returns
    the logits (K', V) and lm-head inputs (K', H) of the K' distinct prefixes among the kept cells, and index
    (K,) long: the row in them of each kept cell (row-major). Raises PackingUnsupported when the model's
    attention layers did not all take the packed path.
    """
    raw = getattr(model, "module", model)
    B, S = ids.shape
    dev = ids.device
    node, first = shared_prefixes(ids, fed, torch.arange(B, device=dev) if roots is None else roots)
    N = len(first)
    if N == int(fed.sum()) and N > (1 - PACK_MIN_PADDING) * B * S:  # nothing shared, little padding: every cell
        node, first = torch.arange(B * S, device=dev).view(B, S), torch.arange(B * S, device=dev)
        rows = PackedRows(None, None, B, S, None, [])
    else:
        if N == 0:  # nothing fed: one dummy token read from cell 0, whose output nothing reads
            first = torch.zeros(1, dtype=torch.long, device=dev)
        flat = node.flatten()
        rows = PackedRows(torch.where(flat >= 0, flat, len(first)), first, B, S, None, [])
    kept, index = torch.unique(node[keep], return_inverse=True)             # (K',) tokens, (K,) row of each kept cell
    if prompt is not None:
        cache, group, prompt_mask = prompt
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        P = prompt_mask.shape[1]
        mask = torch.cat([prompt_mask.bool()[group, None].expand(B, S, P), causal.expand(B, S, S)], 2)[:, None]
        rows = rows._replace(prompt=(cache, group, mask))
    with lm_head_inputs(model, return_hidden) as captured, attention_implementation(raw.config, PACKED_ATTENTION):
        out = model(input_ids=ids.flatten()[first][None], position_ids=positions.flatten()[first][None],
                    use_cache=False, logits_to_keep=kept, packed_rows=rows)
    if len(rows.calls) != raw.config.num_hidden_layers:
        raise PackingUnsupported(f"{type(raw).__name__}'s attention took the packed path in {len(rows.calls)} of "
                                 f"{raw.config.num_hidden_layers} layers")
    return out.logits[0], captured[0][0] if return_hidden else None, index


def packing_off(model, err: PackingUnsupported) -> None:
    """Remember (on the model) that its passes run unpacked, and say so once."""
    setattr(getattr(model, "module", model), NO_PACKING, True)
    warnings.warn(f"{err}: this model's log-probs run unpacked (padding included) from now on", stacklevel=3)


def packs(model) -> bool:
    """False once packing_off marked the model (its attention ignores the packed implementation)."""
    return not getattr(getattr(model, "module", model), NO_PACKING, False)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                   temperature: float, return_entropy: bool = False, return_hidden: bool = False,
                   targets: torch.Tensor | None = None, packed: bool = True) -> TokenLogprobs:
    """log pi_theta(o_t | prefix) at temperature T for every completion position (DESIGN.md section 6).

    Differentiable; `model` may be DDP-wrapped (the forward goes through the wrapper). The forward runs on rows
    rolled to right padding (see below), packed (packed_forward: no work on padding outside attention, and a
    prefix that several rows start with runs once; `packed` False, or a model whose attention ignores packing,
    runs the padded rows), with logits only where a completion
    token is predicted; log-softmax in float32 even under bf16. return_hidden also returns the tempered logits: the
    closed form of d_t in Eq. 3 needs h_t and p_t = softmax(logits_t). `targets` (B, L): score these tokens instead
    of input_ids (CoT random masking feeds masked inputs but scores the original tokens, DESIGN section 9).
    """
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    B, L = input_ids.shape
    completion_mask = completion_mask.bool()
    if completion_mask[:, 0].any():
        raise ValueError("token_logprobs: position 0 has no prefix and cannot be a completion token")
    targets = input_ids if targets is None else targets
    # Left padding is rolled to the right for the forward: a left pad is a query row with no key to attend to,
    # and CUDA SDPA under bf16 autocast returned NaN gradients for such rows (README, experiments/gpu_debug.py);
    # rolled, every pad row sees the real tokens before it. Real tokens see exactly what they saw before.
    ids_r, mask_r, left = rolled_to_right_padding(input_ids, attention_mask)
    if packed and packs(model):
        try:
            return _token_logprobs_packed(model, ids_r, mask_r.bool(), left, completion_mask, targets, temperature,
                                          return_entropy, return_hidden)
        except PackingUnsupported as err:
            packing_off(model, err)
    cols = completion_mask.any(0).nonzero()
    first = int(cols[0]) if len(cols) else L  # first column holding any completion token

    # Logits only where a completion token is predicted: original positions first-1 .. L-2, which sit at rolled
    # positions >= first-1-left >= `start` (a (B, L, V) tensor over the prompt is memory wasted with a 150k vocabulary).
    start = max(0, first - 1 - int(left.max()))
    with lm_head_inputs(model, return_hidden) as captured:
        out = model(input_ids=ids_r, attention_mask=mask_r, position_ids=position_ids_from_mask(mask_r),
                    use_cache=False, logits_to_keep=L - start)
    # (B, L - first) index into the kept rolled positions; left-pad positions (masked below) may wrap out: clamped
    at = ((torch.arange(first - 1, L - 1, device=input_ids.device)[None] - left[:, None]) % L - start).clamp(0, L - start - 1)
    back = lambda x: x.gather(1, at.view(*at.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))  # noqa: E731
    logits = back(out.logits).float() / temperature  # (B, L - first, V), predicts input_ids[:, first:]
    logp_all = F.log_softmax(logits, dim=-1)
    mask = completion_mask[:, first:]
    logp = logp_all.gather(-1, targets[:, first:].unsqueeze(-1)).squeeze(-1) * mask  # (B, L - first)

    def aligned(x):  # (B, L - first, ...) -> (B, L, ...) with zeros before `first`
        pad = x.new_zeros((B, first) + tuple(x.shape[2:]))
        return torch.cat([pad, x], 1)

    entropy = hidden = tempered = None
    if return_entropy:  # a logged diagnostic: no gradient
        with torch.no_grad():
            entropy = aligned(-(logp_all.exp() * logp_all).sum(-1) * mask)
    if return_hidden:
        h = back(captured[0])
        hidden = aligned(h * mask.unsqueeze(-1).to(h.dtype))
        tempered = aligned(logits * mask.unsqueeze(-1))
    return TokenLogprobs(aligned(logp), entropy, hidden, tempered)


class TargetLogprobs(torch.autograd.Function):
    """log softmax(logits)[index[k], target[k]] for k < K (DESIGN.md section 6's log pi_theta of each sampled
    token), from logits (K', V) and index / target (K,) long, with one (K', V) tensor instead of three: the
    log-softmax becomes the softmax p in place once the targets are read, and backward writes
    d/dlogits[j] = sum over k with index[k] = j of g_k (onehot(target[k]) - p[j]) without the (K', V) zeros that
    the gather's backward would fill. Also returns each row's entropy -sum p log p (K',), without a gradient
    (with_entropy, at the cost of one more (K', V) tensor for the while; else an empty tensor). The same numbers as
    log_softmax + gather (tests/test_policy.py); 1.8x faster forward + backward at SmolLM2's 49k vocabulary
    (benchmarks/README.md)."""

    @staticmethod
    def forward(ctx, logits, index, target, with_entropy: bool):
        logp = F.log_softmax(logits, -1)                                    # (K', V)
        out = logp[index, target]                                           # (K,)
        entropy = logp.new_zeros(0)
        if with_entropy:
            p = logp.exp()
            entropy = -(p * logp).sum(-1)                                   # (K',)
        else:
            p = logp.exp_()                                                 # (K', V), in place: logp is not kept
        ctx.save_for_backward(p, index, target)
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, g, _):
        p, index, target = ctx.saved_tensors
        reads = torch.zeros(len(p), dtype=g.dtype, device=g.device).index_add_(0, index, g)  # (K',)
        grad = p * -reads[:, None]
        return grad.index_put_((index, target), g, accumulate=True), None, None, None


def predictions_on_grid(B: int, T: int, at_row: torch.Tensor, at_col: torch.Tensor, index: torch.Tensor,
                        logits: torch.Tensor, hidden: torch.Tensor | None, targets: torch.Tensor, mask: torch.Tensor,
                        temperature: float, return_entropy: bool) -> TokenLogprobs:
    """TokenLogprobs (B, T) from K predictions of the tokens at (at_row, at_col) (K,) of the (B, T) grid, whose
    targets (B, T) and mask (B, T) bool say what is scored (zeros elsewhere). Prediction k's logits / lm-head input
    are row index[k] of logits (K', V) / hidden (K', H): a context shared by several rows is one row there (the
    log-softmax runs once per distinct context; its gradient sums over the rows that read it)."""
    logits = logits.float()                                                 # (K', V)
    if temperature != 1.0:
        logits = logits / temperature
    logp, entropy = TargetLogprobs.apply(logits, index, targets[at_row, at_col], return_entropy)  # (K,), (K',)
    grid = lambda x: x.new_zeros((B, T) + x.shape[1:]).index_put((at_row, at_col), x)  # noqa: E731
    logp = grid(logp) * mask
    entropy = grid(entropy[index]) * mask if return_entropy else None  # a logged diagnostic: no gradient
    h = tempered = None
    if hidden is not None:
        h = grid(hidden[index]) * mask.unsqueeze(-1).to(hidden.dtype)
        tempered = grid(logits[index]) * mask.unsqueeze(-1)
    return TokenLogprobs(logp, entropy, h, tempered)


def _token_logprobs_packed(model, ids_r, mask_r, left, completion_mask, targets, temperature, return_entropy,
                           return_hidden) -> TokenLogprobs:
    """token_logprobs' packed forward: rows already rolled to right padding (ids_r, mask_r (B, L), left (B,))."""
    B, L = ids_r.shape
    S = max(int(mask_r.sum(1).max()), 1)                                    # the longest row: the grid's width
    roll = (torch.arange(L, device=ids_r.device)[None] + left[:, None]) % L  # rolled column -> original column
    comp_r = completion_mask.gather(1, roll)
    keep = torch.zeros_like(mask_r[:, :S])
    keep[:, :-1] = comp_r[:, 1:S]                                           # cell u predicts the token at u + 1
    # rows that start alike (after rolling, every row starts at position 0) share their common prefix's forward
    logits, hidden, index = packed_forward(model, ids_r[:, :S], mask_r[:, :S],
                                           torch.arange(S, device=ids_r.device).expand(B, S), keep, None,
                                           return_hidden, roots=torch.zeros_like(left))
    kr, kc = keep.nonzero(as_tuple=True)
    return predictions_on_grid(B, L, kr, roll[kr, kc + 1], index, logits, hidden, targets, completion_mask,
                               temperature, return_entropy)


def completion_logprobs_shared_prompt(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                                      completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_size: int,
                                      temperature: float, return_entropy: bool = False,
                                      return_hidden: bool = False) -> TokenLogprobs:
    """token_logprobs for G completions per prompt, with each prompt's forward run once and no work on padding.

    prompt_ids / prompt_mask: (n, P) left-padded prompts; completion_ids / completion_mask: (n * G, T), rows
    group-contiguous (rows g*G .. g*G+G-1 continue prompt g), right-padded (the mask a prefix of each row). Two
    passes: the prompts once, keeping their keys / values (differentiable: the prompt's gradient is the sum
    over its G completions, as in the per-row forward); then the completions packed (packed_forward): a
    right-padded completion's padding costs nothing in the projections, the MLPs and the log-softmax, only in
    attention's (B, S) grid, and a prefix that several of a group's completions share runs once (at the
    testbed's SFT start a group's 8 completions hold 34-46% as many distinct prefixes as tokens). Same numbers as
    token_logprobs on the concatenated rows (up to summation order). Outputs are (B, T) /
    (B, T, ...) over the completion columns only. `model` may be DDP-wrapped: the completion pass goes through the
    wrapper, the prompt pass through the module (its gradient reaches the same parameters in the same backward).
    A model whose attention ignores packing runs token_logprobs on the concatenated, padded rows.
    """
    if temperature <= 0:
        raise ValueError(f"completion_logprobs_shared_prompt: temperature must be > 0, got {temperature}")
    n, P = prompt_ids.shape
    B, T = completion_ids.shape
    if B != n * group_size:
        raise ValueError(f"completion_logprobs_shared_prompt: {B} completion rows for {n} prompts x G = {group_size}")
    if packs(model):
        try:
            return _shared_prompt_packed(model, prompt_ids, prompt_mask, completion_ids, completion_mask.bool(),
                                         group_size, temperature, return_entropy, return_hidden)
        except PackingUnsupported as err:
            packing_off(model, err)
    rep = lambda x: x.repeat_interleave(group_size, 0)  # noqa: E731
    out = token_logprobs(model, torch.cat([rep(prompt_ids), completion_ids], 1),
                         torch.cat([rep(prompt_mask), completion_mask.to(prompt_mask.dtype)], 1),
                         torch.cat([torch.zeros_like(rep(prompt_mask)), completion_mask.to(prompt_mask.dtype)], 1),
                         temperature, return_entropy, return_hidden, packed=False)
    return TokenLogprobs(*(None if x is None else x[:, P:] for x in out))


def _shared_prompt_packed(model, prompt_ids, prompt_mask, completion_ids, mask, group_size, temperature,
                          return_entropy, return_hidden) -> TokenLogprobs:
    """completion_logprobs_shared_prompt's two passes (mask: the completion mask as bool)."""
    n, P = prompt_ids.shape
    B, T = completion_ids.shape
    raw = getattr(model, "module", model)
    dev = prompt_ids.device
    # prompts rolled to right padding (no query row without a key: the CUDA SDPA NaN, see token_logprobs)
    ids_r, mask_r, _ = rolled_to_right_padding(prompt_ids, prompt_mask)
    lens = mask_r.long().sum(1)                                             # (n,) real prompt tokens
    group = torch.arange(n, device=dev).repeat_interleave(group_size)       # (B,)
    cache = DynamicCache(config=raw.config)
    last = (lens - 1).clamp(min=0)                                          # the prompt's last real position
    # logits only at the positions that are some prompt's last (the first completion token's prediction)
    keep, where = torch.unique(last, return_inverse=True)                  # (u,) positions, (n,) index into them
    with lm_head_inputs(raw, return_hidden) as captured:
        out_p = raw(input_ids=ids_r, attention_mask=mask_r, position_ids=position_ids_from_mask(mask_r),
                    past_key_values=cache, use_cache=True, logits_to_keep=keep)
    pick = lambda x: x[torch.arange(n, device=dev), where]  # noqa: E731
    logits, hidden = [pick(out_p.logits)], [pick(captured[0])] if return_hidden else None  # (n, V), (n, H)
    # every prediction in one flat list (B [+ K]); (at_row, at_col): the completion position it predicts; index:
    # its row in the logits. Token 0 is predicted at the prompt's last position (the prompt pass, one row per
    # prompt); token t >= 1 at completion column t - 1 (the packed pass, one row per distinct completion prefix:
    # a group's completions often start alike).
    at_row, at_col, index = torch.arange(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev), group
    if T > 1:
        S = T - 1
        fed = mask[:, 1:]                                                   # column t - 1 runs iff token t is real
        lc, hc, ic = packed_forward(model, completion_ids[:, :S], fed, lens[group, None] + torch.arange(S, device=dev),
                                    fed, (cache, group, mask_r), return_hidden, roots=group)
        kr, kc = fed.nonzero(as_tuple=True)
        at_row, at_col, index = torch.cat([at_row, kr]), torch.cat([at_col, kc + 1]), torch.cat([index, n + ic])
        logits.append(lc)
        if return_hidden:
            hidden.append(hc)
    return predictions_on_grid(B, T, at_row, at_col, index, torch.cat(logits),
                               torch.cat(hidden) if return_hidden else None, completion_ids, mask, temperature,
                               return_entropy)


# -----------------------------------------------------------------------------
# sampling

_GAMMA = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 (golden-ratio increment of splitmix64) as int64
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def row_uniforms(seed: int, rows: torch.Tensor, step: int) -> torch.Tensor:
    """(n,) float64 uniforms in (0, 1): a hash of (seed, output row, step), nothing else (top 53 bits, centred)."""
    key = splitmix64(torch.full_like(rows, seed) * _GAMMA + _GAMMA)
    key = splitmix64((key ^ rows) * _GAMMA + _GAMMA)
    key = splitmix64((key ^ step) * _GAMMA + _GAMMA)  # (n,)
    return (_shr(key, 11).double() + 0.5) * 2.0 ** -53


def next_tokens(logits: torch.Tensor, temperature: float, seed: int, rows: torch.Tensor, step: int,
                greedy: bool) -> torch.Tensor:
    """(n, V) logits -> (n,) tokens sampled from softmax(logits / T) by the inverse CDF: the first v whose
    cumulative probability exceeds u (one counter-based uniform per row, row_uniforms); greedy is plain argmax.
    Exact, and one uniform per row instead of a hashed Gumbel noise per vocabulary entry: at a 49k vocabulary
    the hashing cost 146 ms per decode step of 16 rows against 10 ms for softmax + cumsum + search
    (benchmarks/README.md). The cumulative weights are left unnormalised, exp((logits - max) / T), one tensor
    written in place: 6.1 -> 2.5 ms at 16 x 49k."""
    logits = logits.float()
    if greedy:
        return logits.argmax(-1)
    x = logits - logits.max(-1, keepdim=True).values                       # (n, V), a new tensor
    if temperature != 1.0:
        x.div_(temperature)
    c = x.exp_().cumsum_(-1)                                                # (n, V), weights up to each token
    u = row_uniforms(seed, rows, step).to(c.dtype) * c[:, -1]  # scaled to the row's total weight
    return torch.searchsorted(c, u[:, None], right=True).squeeze(1).clamp(max=c.shape[-1] - 1)


# cuDNN attention builds a plan for every new shape, and dropping finished rows makes a new shape
# at almost every step: on an H100 (torch 2.11) that made sample() 10x slower. The other kernels
# have no per-shape cost.
_SAMPLING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def sampling_mode(model):
    """eval mode (no dropout) and no cuDNN attention while sampling; the train flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(_SAMPLING_SDPA_BACKENDS):
            yield
    finally:
        model.train(was_training)


def _check_sampling_args(num_samples, max_new_tokens, temperature, greedy):
    if num_samples < 1 or max_new_tokens < 0:
        raise ValueError(f"sample: need num_samples >= 1 and max_new_tokens >= 0, got {num_samples}, {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0 (use greedy=True for argmax), got {temperature}")


SAMPLING_ENGINES = ("auto", "decoder", "hf")


@torch.no_grad()
def sample(model, prompts: list[list[int]], num_samples: int, max_new_tokens: int, temperature: float,
           eos_id: int, pad_id: int, seed: int, greedy: bool = False, engine: str = "auto") -> list[list[int]]:
    """len(prompts) * num_samples completions, group-contiguous (prompt 0's samples first); each
    ends with eos if produced, else has max_new_tokens tokens.

    Each prompt is prefilled once and its keys/values repeated for its samples; rows that produced
    eos leave the batch. Call on the raw model (model.module under DDP); dropout is off while
    sampling. Row r equals sample_reference's row r (same seed) up to floating-point ties.
    engine: 'decoder' runs decoder.Decoder (a hand-written Qwen2 / Llama forward with a preallocated key/value
    buffer and one forward row per distinct row, faster at the testbed's sizes, benchmarks/README.md), 'hf' the
    model's own forward with a DynamicCache (any causal LM), 'auto' the decoder where decoder.supports(model),
    else 'hf'.
    """
    _check_sampling_args(num_samples, max_new_tokens, temperature, greedy)
    if engine not in SAMPLING_ENGINES:
        raise ValueError(f"sample: engine must be one of {SAMPLING_ENGINES}, got {engine!r}")
    completions = [[] for _ in range(len(prompts) * num_samples)]
    if max_new_tokens == 0:
        return completions
    if engine == "auto":
        engine = "decoder" if decoder.supports(model) else "hf"
    device = model.device
    with sampling_mode(model):
        input_ids, attention_mask = left_pad(prompts, pad_id, device)  # (B, P)
        run = _DecoderRows(model, input_ids, attention_mask, num_samples, max_new_tokens) if engine == "decoder" \
            else _HFRows(model, input_ids, attention_mask, num_samples)
        logits = run.logits  # (N, V), N = B * G rows, group-contiguous
        rows = torch.arange(len(completions), device=device)  # output row of each active row
        for step in range(max_new_tokens):
            tokens = next_tokens(logits, temperature, seed, rows, step, greedy)  # (n,)
            for r, t in zip(rows.tolist(), tokens.tolist()):
                completions[r].append(t)
            if step == max_new_tokens - 1:
                break
            alive = tokens != eos_id
            if not bool(alive.all()):
                if not bool(alive.any()):
                    break
                keep = run.drop(alive)  # (m,) which current rows continue, in their new order
                rows, tokens = rows[keep], tokens[keep]
            logits = run.step(tokens)
    return completions


class _HFRows:
    """sample()'s rows on the model's own forward: a DynamicCache, an attention mask grown by one column a step."""

    def __init__(self, model, input_ids, attention_mask, group):
        self.model, self.cache = model, DynamicCache(config=model.config)
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), past_key_values=self.cache,
                    use_cache=True, logits_to_keep=1)
        self.cache.batch_repeat_interleave(group)  # (B * G, ...) rows, group-contiguous
        self.logits = out.logits[:, -1].repeat_interleave(group, 0)  # (N, V)
        self.mask = attention_mask.repeat_interleave(group, 0)  # (N, P)

    def drop(self, alive):
        keep = alive.nonzero().squeeze(1)
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        return keep

    def step(self, tokens):
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], 1)
        out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=self.mask,
                         position_ids=self.mask.sum(1, keepdim=True) - 1, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]


class _DecoderRows:
    """sample()'s rows on decoder.Decoder: a buffer of P + max_new_tokens positions, rows compacted in place."""

    def __init__(self, model, input_ids, attention_mask, group, max_new_tokens):
        self.dec = decoder.Decoder(model)
        self.logits = self.dec.prefill(input_ids, attention_mask, group, input_ids.shape[1] + max_new_tokens)

    def drop(self, alive):
        return self.dec.drop(alive)

    def step(self, tokens):
        return self.dec.step(tokens)


@torch.no_grad()
def sample_reference(model, prompts: list[list[int]], num_samples: int, max_new_tokens: int, temperature: float,
                     eos_id: int, pad_id: int, seed: int, greedy: bool = False) -> list[list[int]]:
    """The spec of `sample`: one row at a time, full forward over the whole prefix every step, no
    padding, no cache. Slow; for tests and for reading. pad_id is unused (no padding)."""
    _check_sampling_args(num_samples, max_new_tokens, temperature, greedy)
    completions = []
    with sampling_mode(model):
        for i, prompt in enumerate(prompts):
            for g in range(num_samples):
                row = torch.tensor([i * num_samples + g], device=model.device)
                ids = list(prompt)
                completion = []
                for step in range(max_new_tokens):
                    logits = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[:, -1]
                    token = int(next_tokens(logits, temperature, seed, row, step, greedy)[0])
                    completion.append(token)
                    ids.append(token)
                    if token == eos_id:
                        break
                completions.append(completion)
    return completions
