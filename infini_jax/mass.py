"""Memory-mass augmentation beyond one c-fold write (attention.py's write scale): how a training row's scaled
segments are written so that their memory resembles a real long haystack's. Called by
attention.infini_attention_sequence when SequenceOptions asks for it; training only (evaluation never scales).

    mass_passes = P (delta rule): the haystack before the key line in P interleaved passes (`interleaved_passes`)
    mass_source = "batch" (linear rule, scan mode): c × the batch's mean write instead of c copies (`batch_mass`)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infini_jax.attention import MemoryState, _to_segments, sigma, update
from infini_jax.prefix import MEMORY_PRECISION


def interleaved_passes(memory: MemoryState, k_blgk, v_blgv, scale_bs, passes: int):
    """Memory-mass augmentation for the delta rule, closer to a real haystack: (memory after the first
    passes − 1 passes, the write scale of the last pass [B, S]).

    In each row, the leading run of segments whose scale c ≠ 1 (the haystack before the key line; the run ends
    at the first unscaled segment) is written passes − 1 times in order, each segment with scale c / passes,
    memory only (no reads, no outputs); the returned scale gives those segments c / passes once more in the
    sequence proper, where they are read as usual. Their total mass is still c, but the passes interleave, as
    a haystack's repeats of its filler do, instead of writing each segment's c repeats at once. Later scaled
    segments keep c × one write. For the linear rule every split of c gives the same memory (do not call it)."""
    n_seg = scale_bs.shape[1]
    lead_bs = jnp.cumprod((scale_bs != 1.0).astype(jnp.int32), axis=1).astype(bool)  # the leading scaled run
    part_bs = jnp.where(lead_bs, scale_bs / passes, 0.0)  # 0: that segment's write is exactly nothing
    # [B, S*N, G, D] -> [S, B, N, G, D]
    k_sbngk, v_sbngv = (jnp.swapaxes(_to_segments(x, n_seg), 0, 1) for x in (k_blgk, v_blgv))

    def one_pass(mem, _):
        def write(m, seg):
            k_bngk, v_bngv, part_b = seg
            return update(m, k_bngk, v_bngv, "delta", part_b), None

        return jax.lax.scan(write, mem, (k_sbngk, v_sbngv, part_bs.T))[0], None

    def all_passes(mem):
        return jax.lax.scan(one_pass, mem, None, length=passes - 1)[0]

    # batches without a scaled leading run (before the augmentation starts) skip the passes altogether
    memory = jax.lax.cond(jnp.any(lead_bs), all_passes, lambda mem: mem, memory)
    return memory, jnp.where(lead_bs, part_bs, scale_bs)


def batch_mass(k_blgk, v_blgv, scale_bs):
    """mass_source="batch" (linear rule): (own write scale [B, S], batch-mean write scale [B, S], the batch-mean
    write (σ(K)ᵀV [G, K, V], Σσ(K) [G, K])). Every segment whose scale c ≠ 1 writes c × the mean of the writes of
    all such segments in the batch (every row's, its own included) instead of c × its own: c *different*
    segments' worth, as in a haystack of prose, not c copies of one. Segments with c = 1 (the key line's) write
    themselves as usual. No segment with c ≠ 1 in the batch: nothing changes."""
    n_seg = scale_bs.shape[1]
    pooled_bs = scale_bs != 1.0
    sk_bsngk = sigma(_to_segments(k_blgk, n_seg))
    v_bsngv = _to_segments(v_blgv, n_seg).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(pooled_bs), 1).astype(jnp.float32)
    w_bs = pooled_bs.astype(jnp.float32) / count
    # [B,S,N,G,K] x [B,S,N,G,V] x [B,S] -> [G,K,V]
    mean_gkv = jnp.einsum("bsngk,bsngv,bs->gkv", sk_bsngk, v_bsngv, w_bs, precision=MEMORY_PRECISION)
    # [B,S,N,G,K] x [B,S] -> [G,K]
    mean_gk = jnp.einsum("bsngk,bs->gk", sk_bsngk, w_bs, precision=MEMORY_PRECISION)
    return jnp.where(pooled_bs, 0.0, scale_bs), jnp.where(pooled_bs, scale_bs, 0.0), (mean_gkv, mean_gk)
