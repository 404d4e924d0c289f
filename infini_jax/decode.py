"""Streaming decode: the decode cache (memory + a KV cache of the current segment) and the forward of a few tokens.

Shapes use attention.py's letters, plus
    t   positions fed by one call: 1 for a decode step, segment_len for the prompt's last segment
    n   positions of the current segment's cache (segment_len N)
    m   keys one query may see: n (infini, local) or 2n (xl: previous segment | current segment)

Per layer the decode cache keeps
    memory  infini: the MemoryState of every whole segment so far;
            xl: PrevKV, the keys/values of the previous segment (the model projects them from its cached
                hidden states with the same weights: caching the projections holds the same numbers);
            local: ()
    k, v    [B, N, G, K]: the current segment's keys and values (unrotated) at positions 0 .. pos-1
and DecodeCache.pos, how many tokens of the current segment have been seen (shared by the batch rows).

A call appends t tokens at pos and runs each layer on them only:
    A_dot   softmax(Q Kᵀ / sqrt(d_key) + causal) V over the cache (eq. 6; RoPE on this path only, positions
            within the segment; xl: previous segment at 0..N-1, current one at N..2N-1, as the model does)
    A_mem   σ(Q) M / (σ(Q) z)                                     (eq. 7, infini)
    A       sigmoid(β) A_mem + (1 − sigmoid(β)) A_dot              (eq. 10, infini)
When the segment is full it is written into the memory (eq. 8 linear / eq. 9 delta; xl: the cache rolls) and
pos returns to 0: cache entries at pos and beyond are stale and masked, so clearing the cache is pos = 0.
The logits equal those of the teacher-forced forward over the whole sequence (tests/test_generate.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from infini_jax import attention as attn
from infini_jax import baselines
from infini_jax.baselines import PrevKV
from infini_jax.rope import apply_rope
from infini_jax.model import InfiniTransformer, ModelConfig, logits_from_hidden


class LayerCache(NamedTuple):
    """One layer's decode cache: the current segment's keys/values [B, N, G, K] and the memory."""

    k: jax.Array
    v: jax.Array
    memory: Any  # MemoryState (infini) | PrevKV (xl) | () (local)


class DecodeCache(NamedTuple):
    """layers: a LayerCache per layer (tuple), or one with a leading [layers] axis (model.scan_layers);
    pos: int32 scalar, tokens of the current segment already in the caches (0 .. N-1)."""

    layers: Any
    pos: jax.Array


def check_streamable(cfg: ModelConfig) -> None:
    if cfg.attention == "full":
        raise ValueError("attention='full' keeps no memory between calls, so it cannot decode with bounded memory; "
                         "use an infini, xl or local model")


def _over_layers(model: InfiniTransformer, fn: Callable, x, layers):
    """fn(block, x, layer) -> (x, layer) through the blocks in order: a Python loop over model.blocks, or a
    jax.lax.scan over the stacked block parameters and per-layer memories (model.scan_layers)."""
    if not model.cfg.scan_layers:
        out = []
        for block, layer in zip(model.blocks, layers):
            x, layer = fn(block, x, layer)
            out.append(layer)
        return x, tuple(out)
    graphdef, params = nnx.split(model.blocks)
    return jax.lax.scan(lambda x, pl: fn(nnx.merge(graphdef, pl[0]), x, pl[1]), x, (params, layers))


def _project_kv(block, x_btd, dt):
    """Keys and values of the layer's attention input: [B, T, D] x [D, G, K] -> [B, T, G, K] (each)."""
    x = x_btd.astype(dt)
    k_btgk = jnp.einsum("btd,dgk->btgk", x, block.attn.wk_dgk[...].astype(dt))  # [B,T,D] x [D,G,K]
    v_btgk = jnp.einsum("btd,dgk->btgk", x, block.attn.wv_dgk[...].astype(dt))  # [B,T,D] x [D,G,K]
    return k_btgk, v_btgk


def from_memory(model: InfiniTransformer, memory, batch: int) -> DecodeCache:
    """The decode cache at a segment boundary, from the model's memory after whole segments
    (`model(tokens, memory)`): infini memory as is; xl hidden-state cache projected to keys/values."""
    cfg = model.cfg
    check_streamable(cfg)
    dt = jnp.dtype(cfg.dtype)
    empty_bngk = jnp.zeros((batch, cfg.segment_len, cfg.kv_heads, cfg.head_dim), dt)

    def layer(block, carry, layer_memory):
        if cfg.attention == "xl":  # layer_memory: the XLCache of hidden states
            layer_memory = PrevKV(*_project_kv(block, layer_memory.x, dt), layer_memory.valid)
        return carry, LayerCache(empty_bngk, empty_bngk, layer_memory)  # infini: the MemoryState; local: ()

    _, layers = _over_layers(model, layer, None, memory)
    return DecodeCache(layers, jnp.zeros((), jnp.int32))


def cache_attention(q_bthk, k_bngk, v_bngk, pos, *, rope_base=None, prev: PrevKV | None = None) -> jax.Array:
    """Eq. 6 for t queries at positions pos .. pos+t-1 of the segment against the segment's cache (keys at
    positions ≤ the query's; later entries are stale and masked). xl (`prev`): the previous segment's keys
    come first, at RoPE positions 0..N-1, the current segment at N..2N-1. Float32 [B, T, H, V]."""
    b, t, h, _ = q_bthk.shape
    n = k_bngk.shape[1]
    pos_t = pos + jnp.arange(t)
    causal_tn = jnp.arange(n)[None, :] <= pos_t[:, None]
    if prev is None:
        k_bmgk, v_bmgk, mask_btm, q_pos_t = k_bngk, v_bngk, causal_tn[None], pos_t
    else:
        k_bmgk = jnp.concatenate([prev.k, k_bngk], axis=1)
        v_bmgk = jnp.concatenate([prev.v, v_bngk], axis=1)
        mask_btm = jnp.concatenate([jnp.broadcast_to(prev.valid[:, None, None], (b, t, n)),
                                    jnp.broadcast_to(causal_tn, (b, t, n))], axis=-1)
        q_pos_t = n + pos_t
    if rope_base is not None:
        q_bthk = apply_rope(q_bthk, q_pos_t, rope_base)
        k_bmgk = apply_rope(k_bmgk, jnp.arange(k_bmgk.shape[1]), rope_base)
    return attn._softmax_attention(q_bthk, attn.repeat_heads(k_bmgk, h), attn.repeat_heads(v_bmgk, h), mask_btm)


def flush(cfg: ModelConfig, cache: LayerCache) -> LayerCache:
    """A full segment leaves the cache: written into the memory (eq. 8 / 9), or (xl) it becomes the previous
    segment. The caller sets pos = 0."""
    if cfg.attention == "infini":
        return cache._replace(memory=attn.update(cache.memory, cache.k, cache.v, cfg.rule))
    if cfg.attention == "xl":
        return cache._replace(memory=PrevKV(cache.k, cache.v, jnp.ones_like(cache.memory.valid)))
    return cache


def _layer_step(cfg: ModelConfig, pos, n_new, block, x_btd, cache: LayerCache):
    """One block on the t new tokens (t = 1 at any pos, or t = N at pos 0); flushes when the segment fills."""
    dt = jnp.dtype(cfg.dtype)
    t = x_btd.shape[1]
    a_btd = block.attn_norm(x_btd).astype(dt)
    q_bthk = jnp.einsum("btd,dhk->bthk", a_btd, block.attn.wq_dhk[...].astype(dt))  # [B,T,D] x [D,H,K]
    k_btgk, v_btgk = _project_kv(block, a_btd, dt)
    prev = cache.memory if cfg.attention == "xl" else None
    if t == 1:
        k_bngk = jax.lax.dynamic_update_slice_in_dim(cache.k, k_btgk, pos, axis=1)
        v_bngk = jax.lax.dynamic_update_slice_in_dim(cache.v, v_btgk, pos, axis=1)
        a_bthv = cache_attention(q_bthk, k_bngk, v_bngk, pos, rope_base=cfg.rope, prev=prev)
    else:  # a segment from its start: the model's own one-segment attention (query-blocked when long)
        k_bngk, v_bngk = k_btgk, v_btgk
        if prev is None:
            a_bthv = attn.local_attention(q_bthk, k_bngk, v_bngk, rope_base=cfg.rope)
        else:
            a_bthv = baselines.xl_attention_sequence(q_bthk, k_bngk, v_bngk, prev, segment_len=t, rope_base=cfg.rope)
    if cfg.attention == "infini":  # eq. 7 on the memory of earlier segments, eq. 10
        memory = cache.memory
        a_bthv = attn._gate(attn.retrieve(memory, q_bthk), a_bthv, block.attn.gate_logit[...], attn.is_empty(memory))
    y_btd = jnp.einsum("bthk,hkd->btd", a_bthv.astype(dt), block.attn.wo_hkd[...].astype(dt))  # [B,T,H,K] x [H,K,D]
    x_btd = x_btd + y_btd
    x_btd = x_btd + block.mlp(block.mlp_norm(x_btd))
    cache = LayerCache(k_bngk, v_bngk, cache.memory)
    if cfg.attention != "local":
        cache = jax.lax.cond(pos + n_new == cfg.segment_len, functools.partial(flush, cfg), lambda c: c, cache)
    return x_btd, cache


def forward(model: InfiniTransformer, cache: DecodeCache, tokens_bt: jax.Array, n_new) -> tuple[jax.Array, DecodeCache]:
    """Feeds tokens [B, T] at cache.pos: T = 1 (a decode step) or T = segment_len with cache.pos = 0 (a segment
    from its start, of which the first n_new tokens are real and the rest padding, e.g. the prompt's last
    segment). Returns (float32 logits [B, V] at the last real token, the cache after the n_new tokens)."""
    cfg = model.cfg
    check_streamable(cfg)
    t = tokens_bt.shape[1]
    if t not in (1, cfg.segment_len):
        raise ValueError(f"feed 1 token or a whole segment of {cfg.segment_len} (padded), got {t}")
    dt = jnp.dtype(cfg.dtype)
    x_btd = jnp.take(model.embed_vd[...], tokens_bt, axis=0).astype(dt)
    if cfg.embed_scale:
        x_btd = x_btd * jnp.asarray(cfg.d_model ** 0.5, dt)
    step = functools.partial(_layer_step, cfg, cache.pos, n_new)
    x_btd, layers = _over_layers(model, step, x_btd, cache.layers)
    x_b1d = jax.lax.dynamic_slice_in_dim(x_btd, n_new - 1, 1, axis=1)
    logits_b1v = logits_from_hidden(model.final_norm(x_b1d), model.output_embedding(), cfg.dtype)
    return logits_b1v[:, 0], DecodeCache(layers, (cache.pos + n_new) % cfg.segment_len)
