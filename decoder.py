"""A hand-written inference forward for Qwen2 / Llama-family decoders, used by the sampler (policy.sample).

Why: at the testbed's sizes a Hugging Face forward carries much Python and many small operators per call (mask
building, the Cache object and its concatenation per step, RMSNorm as six operators, separate q/k/v and gate/up
products), and sampling runs that forward once per new token. This file reads the same modules' weights and does
the same arithmetic in fewer operators (the weights are the modules' own tensors, not copies):
  - RMSNorm by torch's fused `F.rms_norm`; RoPE cos/sin from the model's own `rotary_emb` (every rope type);
  - a preallocated key/value buffer written in place (no concatenation per step), finished rows removed by
    moving only the rows that fill their places (not by copying every surviving row);
  - grouped-query attention without repeated keys/values (SDPA's `enable_gqa` for the prompt; for one new token,
    two batched products with a key/value head's query heads stacked);
  - rows whose tokens so far are the same (a group's samples until they first differ) share one forward per step:
    the projections, MLPs and output layer run once per distinct row, attention per row on each row's own
    buffer (twins hold equal keys / values), and every twin gets the same logits, from which it draws its own
    token.
Measured: 1.38-1.39x faster sampling than the model's own forward at hidden 128 and 256 before twins shared a
forward, 1.53x at hidden 256 with them; 1.01x on SmolLM2 on a host where its decode is bound by reading the weights
(benchmarks/sampling.py, benchmarks/README.md). Same numbers as the model's own forward up to float rounding (tests/test_policy.py
compares logits and samples). Inference only (no autograd; the update pass keeps the Hugging Face forward, whose modules DDP
and FSDP wrap). `supports(model)` says which models qualify; the others keep the Hugging Face path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_MODEL_TYPES = ("qwen2", "llama")


def supports(model) -> bool:
    """True for an unsharded Qwen2 / Llama-family causal LM this file computes exactly: SiLU MLP, full attention
    in every layer, no MLP bias, one tensor-parallel slice, plain (non-DTensor) parameters."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _MODEL_TYPES:
        return False
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "mlp_bias", False):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if not hasattr(model, "model") or not hasattr(model.model, "rotary_emb"):
        return False
    return all(type(p) is torch.nn.Parameter for p in model.parameters())  # FSDP2's DTensor shards are not


class Decoder:
    """One model's weights arranged for inference, and a key/value buffer for the rows being sampled.

    prefill(ids, mask, G, capacity) runs left-padded prompts once and makes G rows of each (group-contiguous);
    step(tokens) appends one token to every row; drop(alive) removes finished rows. Rows are independent.
    """

    def __init__(self, model):
        self.model = model
        body = model.model
        cfg = model.config
        self.embed = body.embed_tokens.weight
        self.head = model.get_output_embeddings().weight
        self.norm_w, self.eps = body.norm.weight, body.norm.variance_epsilon
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.layers = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                q=(a.q_proj.weight, a.q_proj.bias), k=(a.k_proj.weight, a.k_proj.bias),
                v=(a.v_proj.weight, a.v_proj.bias),
                o=a.o_proj.weight, o_b=a.o_proj.bias,
                g=m.gate_proj.weight, u=m.up_proj.weight, down=m.down_proj.weight,
                scale=a.scaling))
        self.k = self.v = None  # per layer (n, kv heads, capacity, head dim)
        self.valid = None  # (n, capacity) bool: a real token sits at this position
        self.pos = None  # (n,) the next position id of each row (its count of real tokens)
        self.history = None  # (n,) long: rows with equal values have the same tokens so far (prompt and samples)
        self.length = 0  # positions written
        self.fed = 0  # rows run through the projections and MLPs by step() so far (distinct rows per step, summed)

    def _rope(self, x, position_ids):
        cos, sin = self.model.model.rotary_emb(x, position_ids)  # (n, L, hd) each
        return cos.unsqueeze(1), sin.unsqueeze(1)

    @staticmethod
    def _rotate(x, cos, sin):  # x (n, heads, L, hd)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def _attend(self, q, k, v, mask, scale):
        """q (n, h, L, hd), k/v (n, kvh, S, hd), mask (n, 1, L, S) bool -> (n, h, L, hd). One query (decoding):
        batched products with the heads of a key/value group stacked (no repeated keys); else SDPA."""
        n, h, L, hd = q.shape
        if L > 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=self.nkv != h)
        rep = h // self.nkv
        s = torch.matmul(q.view(n, self.nkv, rep, hd), k.transpose(-1, -2)) * scale  # (n, kvh, rep, S)
        s = s.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.matmul(s, v).view(n, h, 1, hd)

    def _forward(self, ids, position_ids, attn_mask, twins=None):
        """ids (m, L) -> final hidden (m, L, H); appends L positions to the buffer's n rows. twins: None (m = n), or
        (first (m,), of (n,)) when the buffer's n rows are m distinct ones: row r continues distinct row of[r],
        which is row first[of[r]] of the buffer; ids / position_ids are then the distinct rows'."""
        m, L = ids.shape
        n = m if twins is None else len(twins[1])
        spread = (lambda t: t) if twins is None else (lambda t: t.index_select(0, twins[1]))  # noqa: E731 (m, ...) -> (n, ...)
        x = F.embedding(ids, self.embed)
        cos, sin = self._rope(x, position_ids)
        s0, s1 = self.length, self.length + L
        q_size = self.nh * self.hd
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), w["ln1"], self.eps)
            q, k, v = (F.linear(h, *w["q"]), F.linear(h, *w["k"]), F.linear(h, *w["v"]))
            q = self._rotate(q.view(m, L, self.nh, self.hd).transpose(1, 2), cos, sin)
            self.k[i][:, :, s0:s1] = spread(self._rotate(k.view(m, L, self.nkv, self.hd).transpose(1, 2), cos, sin))
            self.v[i][:, :, s0:s1] = spread(v.view(m, L, self.nkv, self.hd).transpose(1, 2))
            o = self._attend(spread(q), self.k[i][:, :, :s1], self.v[i][:, :, :s1], attn_mask, w["scale"])
            if twins is not None:
                o = o.index_select(0, twins[0])  # (m, h, L, hd): twins' outputs are equal
            x = x + F.linear(o.transpose(1, 2).reshape(m, L, q_size), w["o"], w["o_b"])
            h = F.rms_norm(x, (x.shape[-1],), w["ln2"], self.eps)
            g, u = F.linear(h, w["g"]), F.linear(h, w["u"])
            x = x + F.linear(F.silu(g) * u, w["down"])
        self.length = s1
        return F.rms_norm(x, (x.shape[-1],), self.norm_w, self.eps)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: int, capacity: int) -> torch.Tensor:
        """Left-padded prompts (n, P) -> (n * group, V) logits of each prompt's last position, repeated for its
        `group` rows (group-contiguous); the buffer then holds n * group rows of `capacity` positions."""
        n, P = input_ids.shape
        dev = input_ids.device
        self.k = [torch.empty(n, self.nkv, P, self.hd, dtype=self.embed.dtype, device=dev) for _ in self.layers]
        self.v = [torch.empty_like(k) for k in self.k]
        self.length = 0
        valid = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (n, P), as policy.position_ids_from_mask
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        # a pad query attends to itself only: a query with no key at all is NaN in some SDPA kernels, and a pad's
        # output becomes the next layer's (masked, but NaN * 0 = NaN) pad key/value
        mask = (causal & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=dev)  # (n, P, P)
        logits = F.linear(self._forward(input_ids, position_ids, mask.unsqueeze(1))[:, -1], self.head)
        N = n * group
        for buffers in (self.k, self.v):  # (n, kvh, P, hd) -> (N, kvh, capacity, hd), only the prefix copied
            for i, b in enumerate(buffers):
                big = b.new_empty(N, self.nkv, capacity, self.hd)
                big.view(n, group, self.nkv, capacity, self.hd)[:, :, :, :P] = b[:, None]
                buffers[i] = big
        self.valid = torch.zeros(N, capacity, dtype=torch.bool, device=dev)
        self.valid[:, :P] = valid.repeat_interleave(group, 0)
        self.pos = attention_mask.long().sum(1).repeat_interleave(group, 0)
        self.history = torch.arange(n, device=dev).repeat_interleave(group, 0)
        return logits.repeat_interleave(group, 0)

    def drop(self, alive: torch.Tensor) -> torch.Tensor:
        """Keep the rows where alive (n,) is True, compacted in place: each dead row among the first m = alive.sum()
        is overwritten by a live row from beyond m (only those rows move), then every buffer is cut to m rows (a
        view). Returns perm (m,): new row j is old row perm[j]; the caller reorders its own per-row state by it."""
        m = int(alive.sum())
        perm = torch.arange(m, device=alive.device)
        holes = (~alive[:m]).nonzero().squeeze(1)
        movers = alive[m:].nonzero().squeeze(1) + m
        perm[holes] = movers
        for buffers in (self.k, self.v):
            for i, b in enumerate(buffers):
                if len(holes):
                    b[holes, :, :self.length] = b[movers, :, :self.length]
                buffers[i] = b[:m]
        self.valid, self.pos, self.history = self.valid[perm], self.pos[perm], self.history[perm]
        return perm

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (n,) appended to every row -> (n, V) logits of the next token."""
        if self.length >= self.valid.shape[1]:
            raise ValueError(f"Decoder.step: the buffer's {self.valid.shape[1]} positions are full")
        self.valid[:, self.length] = True
        mask = self.valid[:, None, None, :self.length + 1]  # (n, 1, 1, S)
        n = len(tokens)
        # rows with the same history that append the same token stay twins; the others part here
        _, self.history = torch.unique(self.history * self.head.shape[0] + tokens, return_inverse=True)
        m = int(self.history.max()) + 1 if n else 0
        twins = None
        if m < n:
            first = torch.full((m,), n, dtype=torch.long, device=tokens.device).scatter_reduce(
                0, self.history, torch.arange(n, device=tokens.device), "amin")  # (m,) the first row of each
            twins, tokens = (first, self.history), tokens[first]
        hidden = self._forward(tokens[:, None], self.pos[:, None] if twins is None else self.pos[first, None], mask, twins)
        self.pos = self.pos + 1
        self.fed += m
        logits = F.linear(hidden[:, -1], self.head)  # (m, V)
        return logits if twins is None else logits.index_select(0, self.history)
