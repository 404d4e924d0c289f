"""Rotary position embedding (RoPE), Llama's rotate-half convention, with Llama 3.1/3.2's frequency
scaling: used on the local (dot-product) attention path only (eq. 6), never on the memory."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rope_frequencies(base, d: int) -> jax.Array:
    """[d/2] inverse frequencies. `base`: θ, or (θ, factor, low_freq_factor, high_freq_factor,
    original_max_positions) for Llama 3.1/3.2's scaled RoPE (Hugging Face rope_type 'llama3'): wavelengths
    above original_max_positions / low_freq_factor are stretched `factor` times, those below
    original_max_positions / high_freq_factor kept, the band between interpolated."""
    theta, *scaling = base if isinstance(base, tuple) else (base,)
    inv_freq_f = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    if not scaling:
        return inv_freq_f
    factor, low, high, original = scaling
    wavelen_f = 2 * math.pi / inv_freq_f
    smooth_f = (original / wavelen_f - low) / (high - low)
    mid_f = (wavelen_f <= original / low) & (wavelen_f >= original / high)
    scaled_f = jnp.where(wavelen_f > original / low, inv_freq_f / factor, inv_freq_f)
    return jnp.where(mid_f, (1 - smooth_f) * inv_freq_f / factor + smooth_f * inv_freq_f, scaled_f)


def apply_rope(x_bnhd: jax.Array, positions_n: jax.Array, base) -> jax.Array:
    """Rotary position embedding, Llama's rotate-half convention, computed in float32 (`base`: see
    `rope_frequencies`)."""
    d = x_bnhd.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {d}")
    inv_freq_f = rope_frequencies(base, d)  # [d/2]
    angle_nf = positions_n.astype(jnp.float32)[:, None] * inv_freq_f[None, :]  # [N, d/2]
    cos_n1d = jnp.cos(jnp.concatenate([angle_nf, angle_nf], -1))[:, None, :]  # [N, 1, d]
    sin_n1d = jnp.sin(jnp.concatenate([angle_nf, angle_nf], -1))[:, None, :]
    x = x_bnhd.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos_n1d + rotated * sin_n1d).astype(x_bnhd.dtype)
