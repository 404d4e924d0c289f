"""The paper's baselines, in the same code as Infini-attention: segment-local attention, Transformer-XL
(Dai et al. 2019) and full causal attention. Pure functions of arrays, shapes as in attention.py."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from infini_jax.attention import (_check_qkv, _check_segments, _softmax_attention, _to_segments, local_attention,
                                  repeat_heads)
from infini_jax.rope import apply_rope


class XLCache(NamedTuple):
    """Transformer-XL cache (Dai et al. 2019): the previous segment's hidden states at the layer's attention
    input, x: [B, N, D]; valid: [B] bool (False until a segment has been seen, or after a reset). Keys and
    values of the cached half are projected from them with the current weights, so W_K and W_V learn from both
    halves while no gradient flows into the cached states."""

    x: jax.Array
    valid: jax.Array


class PrevKV(NamedTuple):
    """Transformer-XL: the keys/values of the previous segment, k, v: [B, N, G, K] (or [B, L, G, K]: for each
    segment of a call, those of the segment before it); valid [B]: False until one has been seen."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array


def local_attention_sequence(q_blhk, k_blhk, v_blhv, *, segment_len: int, rope_base=None) -> jax.Array:
    """Segment-local causal attention only (no memory). [B, L, H, d_value] in q's dtype."""
    _check_qkv(q_blhk, k_blhk, v_blhv)
    b, l, h, _ = q_blhk.shape
    n_seg = _check_segments(l, segment_len)
    fold = lambda x: x.reshape(b * n_seg, segment_len, x.shape[-2], x.shape[-1])  # noqa: E731
    out = local_attention(fold(q_blhk), fold(k_blhk), fold(v_blhv), rope_base=rope_base)
    return out.reshape(b, l, h, -1).astype(q_blhk.dtype)


def full_attention(q_blhk, k_blhk, v_blhv, *, rope_base=None) -> jax.Array:
    """Ordinary causal attention over the whole input (O(L²) memory). [B, L, H, d_value] in q's dtype."""
    _check_qkv(q_blhk, k_blhk, v_blhv)
    return local_attention(q_blhk, k_blhk, v_blhv, rope_base=rope_base).astype(q_blhk.dtype)


def init_xl_cache(batch: int, segment_len: int, d_model: int, dtype=jnp.float32) -> XLCache:
    return XLCache(x=jnp.zeros((batch, segment_len, d_model), dtype), valid=jnp.zeros((batch,), bool))


def xl_previous_inputs(x_bld: jax.Array, cache: XLCache, segment_len: int) -> jax.Array:
    """The inputs whose keys/values each segment's cached half uses: segment s gets segment s−1's inputs
    (segment 0 gets the cache), behind `stop_gradient` (Dai et al.: SG at the cached hidden states).
    [B, L, D] -> [B, L, D]."""
    b, l, d = x_bld.shape
    if cache.x.shape != (b, segment_len, d):
        raise ValueError(f"XL cache shape mismatch: expected x {(b, segment_len, d)}, got {cache.x.shape}; "
                         "build it with init_xl_cache(batch, segment_len, d_model)")
    prev_bld = jnp.concatenate([cache.x.astype(x_bld.dtype), x_bld[:, : l - segment_len]], axis=1)
    return jax.lax.stop_gradient(prev_bld)


def xl_attention_sequence(q_blhk, k_blgk, v_blgk, prev: PrevKV, *, segment_len: int, rope_base=None) -> jax.Array:
    """Transformer-XL attention (Dai et al. 2019): each segment attends causally to itself and to all keys of
    the previous segment. k/v: this call's keys/values; prev.k/prev.v: the keys/values of the *previous*
    segment's inputs for every segment (the projections of `xl_previous_inputs`); prev.valid [B]: whether the
    first segment has a previous one (False at a document start). With absolute positions, query t of segment s
    sees keys max(0, (s−1)N) .. t. With RoPE the previous segment sits at positions 0..N-1 and the current one
    at N..2N-1 (relative distances are what RoPE sees). Returns [B, L, H, d_value] in q's dtype.
    """
    kp_blgk, vp_blgk, valid_b = prev
    _check_qkv(q_blhk, k_blgk, v_blgk)
    _check_qkv(q_blhk, kp_blgk, vp_blgk)
    b, l, h, _ = q_blhk.shape
    n_seg = _check_segments(l, segment_len)
    n = segment_len
    xs = tuple(jnp.swapaxes(_to_segments(x, n_seg), 0, 1) for x in (q_blhk, k_blgk, v_blgk, kp_blgk, vp_blgk))
    prev_valid_sb = jnp.concatenate([valid_b[None].astype(bool), jnp.ones((n_seg - 1, b), bool)], axis=0)
    causal_nn = jnp.tril(jnp.ones((n, n), bool))

    @jax.checkpoint
    def body(_, seg):
        q_bnhk, k_bngk, v_bngk, kp_bngk, vp_bngk, valid_b = seg
        k_b2ngk = jnp.concatenate([kp_bngk, k_bngk], axis=1)  # keys: [previous segment | current segment]
        v_b2ngk = jnp.concatenate([vp_bngk, v_bngk], axis=1)
        if rope_base is not None:
            q_bnhk = apply_rope(q_bnhk, jnp.arange(n, 2 * n), rope_base)
            k_b2ngk = apply_rope(k_b2ngk, jnp.arange(2 * n), rope_base)
        prev_bnn = jnp.broadcast_to(valid_b[:, None, None], (b, n, n))
        mask_bn2n = jnp.concatenate([prev_bnn, jnp.broadcast_to(causal_nn, (b, n, n))], axis=-1)
        out_bnhv = _softmax_attention(q_bnhk, repeat_heads(k_b2ngk, h), repeat_heads(v_b2ngk, h), mask_bn2n)
        return None, out_bnhv.astype(q_bnhk.dtype)

    _, out_sbnhv = jax.lax.scan(body, None, xs + (prev_valid_sb,))
    return jnp.swapaxes(out_sbnhv, 0, 1).reshape(b, l, h, -1)


def reset_xl_cache(cache: XLCache, reset_b: jax.Array) -> XLCache:
    """Invalidates the cache of the batch rows where reset_b [B] is True."""
    return cache._replace(valid=cache.valid & ~reset_b.astype(bool))
