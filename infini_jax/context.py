"""Context parallelism: one sequence's segments split over the `context` mesh axis (issue 8, section 3).

`infini_attention_sequence` here is attention.infini_attention_sequence, split over the mesh axis that the
logical "length" axis maps to (infini_jax/axes.py) whenever the active mesh has one of size C > 1. Device c
holds segments c·S/C … (c+1)·S/C − 1 of every row (S segments, C devices; L/C must be a multiple of the
segment length). Local attention needs nothing from other devices: segment boundaries align with the
shards. The memory at the start of a device's first segment must be what one device would hold after all
earlier segments; only that prefix crosses devices (shapes as in attention.py, x indexes devices):

    z (both rules):  Δz(x) = Σ_{s on x} c_s Σ_t σ(K_t)                z_in(x) = z_0 + Σ_{x' < x} Δz(x')
    linear (eq. 8):  ΔM(x) = Σ_{s on x} c_s σ(K_s)ᵀ V_s               M_in(x) = M_0 + Σ_{x' < x} ΔM(x')
    delta  (eq. 9):  per segment M ↦ A_s M + B_s (prefix.delta_transitions / segment_writes),
                     (A(x), B(x)) = their composition over the device's segments,
                     M_in(x) = (A(x−1), B(x−1)) ∘ … ∘ (A(0), B(0)) applied to M_0.

Eq. 9 is exactly affine in M: its denominator σ(K) z_{s−1} involves z only, and z follows the linear rule, so
D_s = diag(1 / σ(K_s) z_{s−1}) is known exactly once z_in(x) is. Hence two exchanges for delta (Δz, then
(A(x), B(x)) computed from z_in(x)), one for linear. Each is an all_gather over the context axis inside
`jax.shard_map` of B·G·K·(V+1) numbers per device and layer (delta: B·G·K plus B·G·K·(K+V)), independent of
the sequence length; every device then forms the same prefix from the gathered totals. The device's own
segments then run through attention.infini_attention_sequence (scan or parallel mode, unchanged) from
(M_in, z_in); the returned memory is the composition over all devices, identical on every device.

Cost: a device's memory writes are computed twice (once for its totals, once in its own run); delta adds
a K × K map per segment and its composition (K³ per segment and head), small next to the local attention.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from infini_jax import attention as attn
from infini_jax import prefix
from infini_jax.attention import MemoryState
from infini_jax.prefix import MEMORY_PRECISION
from infini_jax.axes import active_axis, logical_to_spec


def check_context_split(length: int, segment_len: int, context: int) -> None:
    """Plain Python on static sizes: each of the `context` devices must hold whole segments."""
    if length % (context * segment_len):
        raise ValueError(
            f"context parallelism: the sequence of {length} tokens over the mesh context axis ({context}) is not "
            f"whole segments of {segment_len} per device; make model.n_segments a multiple of {context} "
            f"(or change config.mesh.context)")


def exclusive_prefix(x0, delta_x, a_xbgkj=None):
    """Over devices x in order, from x0: memory ← A_x memory + Δ_x (A = I when `a_xbgkj` is None). delta_x: the
    per-device totals [X, *x0.shape]. Returns (the memory before each device [X, ...], the memory after the last)."""
    def body(s, step):
        a, d = step
        if a is not None:  # [B,G,K,J] x [B,G,J,V] -> [B,G,K,V]
            s_new = jnp.einsum("bgkj,bgjv->bgkv", a, s, precision=MEMORY_PRECISION) + d
        else:
            s_new = s + d
        return s_new, s

    total, before_x = jax.lax.scan(body, x0, (a_xbgkj, delta_x))
    return before_x, total


def device_delta_map(sk_bsngk, v32_bsngv, c_bs, z_in_bgk, manual_axes=()):
    """The delta rule over one device's segments as one affine map (A [B,G,K,K], B [B,G,K,V]), given the z
    at its first segment: a scan over the segments composing M ↦ A_s M + B_s (prefix.compose).
    manual_axes: inside shard_map, the mesh axes the data varies over (the identity map it starts from too)."""
    b, _, _, g, d_key = sk_bsngk.shape
    eye_bgkj = jnp.broadcast_to(jnp.eye(d_key, dtype=jnp.float32), (b, g, d_key, d_key))
    zero_bgkv = jnp.zeros((b, g, d_key, v32_bsngv.shape[-1]), jnp.float32)
    start = (eye_bgkj, zero_bgkv)
    if manual_axes:
        start = jax.lax.pcast(start, tuple(manual_axes), to="varying")

    def body(carry, seg):
        z_bgk, acc = carry
        sk_b1ngk, v_b1ngv, c_b1 = (x[:, None] for x in seg)  # one segment, kept as a segment axis of 1
        dz_b1gk, write_b1gkv = prefix.segment_writes(sk_b1ngk, v_b1ngv, c_b1)
        a_b1gkj = prefix.delta_transitions(sk_b1ngk, z_bgk[:, None], c_b1)
        return (z_bgk + dz_b1gk[:, 0], prefix.compose(acc, (a_b1gkj[:, 0], write_b1gkv[:, 0]))), None

    segs = (jnp.swapaxes(sk_bsngk, 0, 1), jnp.swapaxes(v32_bsngv, 0, 1), c_bs.T)  # scan over segments
    (_, (a_bgkj, b_bgkv)), _ = jax.lax.scan(jax.checkpoint(body), (z_in_bgk, start), segs)
    return a_bgkj, b_bgkv


def memory_at_device_start(k_blgk, v_blgv, memory: MemoryState, c_bs, *, rule: str, axis):
    """Inside shard_map, on this device's L/C tokens (c_bs: its segments' write scales [B, S/C]): (memory at its
    first segment, memory after the whole sequence). Only per-device totals cross devices (all_gather over
    `axis`); the delta rule's identity map starts varying over the shard_map's manual axes (device_delta_map)."""
    d_key, n_seg = k_blgk.shape[-1], c_bs.shape[1]
    manual_axes = tuple(sorted(jax.sharding.get_abstract_mesh().manual_axes))
    sk_bsngk = attn.sigma(attn._to_segments(k_blgk, n_seg))
    v32_bsngv = attn._to_segments(v_blgv, n_seg).astype(jnp.float32)
    x = jax.lax.axis_index(axis)
    dz_bgk = jnp.sum(sk_bsngk * c_bs[:, :, None, None, None], axis=(1, 2))  # [B,S,N,G,K] -> [B,G,K]
    if rule == "linear":
        # ΔM = Σ_s c_s σ(K_s)ᵀ V_s; [B,S,N,G,K] x [B,S,N,G,V] x [B,S] -> [B,G,K,V]
        dm_bgkv = jnp.einsum("bsngk,bsngv,bs->bgkv", sk_bsngk, v32_bsngv, c_bs, precision=MEMORY_PRECISION)
        both_xbgkw = jax.lax.all_gather(jnp.concatenate([dm_bgkv, dz_bgk[..., None]], -1), axis, to="invarying")
        z_before_xbgk, z_final_bgk = exclusive_prefix(memory.z, both_xbgkw[..., -1])
        m_before_xbgkv, m_final_bgkv = exclusive_prefix(memory.M, both_xbgkw[..., :-1])
    else:
        z_before_xbgk, z_final_bgk = exclusive_prefix(memory.z, jax.lax.all_gather(dz_bgk, axis, to="invarying"))
        a_bgkj, b_bgkv = device_delta_map(sk_bsngk, v32_bsngv, c_bs, z_before_xbgk[x], manual_axes)
        ab_xbgkw = jax.lax.all_gather(jnp.concatenate([a_bgkj, b_bgkv], -1), axis, to="invarying")
        m_before_xbgkv, m_final_bgkv = exclusive_prefix(memory.M, ab_xbgkw[..., d_key:], ab_xbgkw[..., :d_key])
    return MemoryState(m_before_xbgkv[x], z_before_xbgk[x]), MemoryState(m_final_bgkv, z_final_bgk)


def infini_attention_sequence(q_blhk, k_blgk, v_blgv, gate_logit_h, opts: attn.SequenceOptions,
                              memory: Optional[MemoryState] = None, write_scale_bs=None):
    """attention.infini_attention_sequence (same arguments, same results to float32 round-off), split over the
    context mesh axis when the active mesh has one of size > 1 (see the module docstring)."""
    axis, size = active_axis("length")
    if size == 1:
        return attn.infini_attention_sequence(q_blhk, k_blgk, v_blgv, gate_logit_h, opts, memory, write_scale_bs)
    n_seg = attn.check_sequence(q_blhk, k_blgk, v_blgv, gate_logit_h, opts)
    memory, scale_bs = attn.sequence_start(memory, write_scale_bs, k_blgk, v_blgv, n_seg)
    if scale_bs is not None and opts.rule == "delta" and opts.mass_passes > 1:
        raise ValueError("model.mass_passes > 1 (interleaved passes over a row's segments) cannot be split over "
                         "the context mesh axis: set mesh.context=1 or model.mass_passes=1")
    if scale_bs is not None and opts.mass_source == "batch":
        raise ValueError("model.mass_source='batch' (a mean over every segment of the batch) cannot be split over "
                         "the context mesh axis: set mesh.context=1 or model.mass_source='own'")
    b, l = q_blhk.shape[:2]
    check_context_split(l, opts.segment_len, size)
    c_bs = jnp.ones((b, n_seg), jnp.float32) if scale_bs is None else scale_bs
    # Manual over the context axis and the batch axes (rows are independent; left to XLA's propagation, the
    # small memory exchange came out replicated over the batch axes); heads stay automatic.
    mesh = jax.sharding.get_abstract_mesh()
    rows = logical_to_spec(("batch",), (b,), mesh)[0]
    seq, row = P(rows, axis), P(rows)
    manual = sorted({a for ax in (axis, rows) if ax is not None for a in ((ax,) if isinstance(ax, str) else ax)})

    def local(q_blhk, k_blgk, v_blgv, gate_h, memory, c_bs):
        gate_h = jax.lax.pcast(gate_h, tuple(manual), to="varying")  # β's gradient: summed once, not per segment
        start, final = memory_at_device_start(k_blgk, v_blgv, memory, c_bs, rule=opts.rule, axis=axis)
        out_blhv, _ = attn.infini_attention_sequence(q_blhk, k_blgk, v_blgv, gate_h, opts, start,
                                                     None if scale_bs is None else c_bs)
        return out_blhv, final

    fn = jax.shard_map(local, mesh=mesh, axis_names=set(manual), out_specs=(seq, MemoryState(row, row)),
                       in_specs=(seq, seq, seq, P(), MemoryState(row, row), seq))
    return fn(q_blhk, k_blgk, v_blgv, gate_logit_h, memory, c_bs)
