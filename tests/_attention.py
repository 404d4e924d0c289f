"""Shapes, inputs and the comparison shared by tests/test_attention.py and tests/test_attention_properties.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import reference_np as ref
from infini_jax.attention import MemoryState

B, N, H, DK, DV = 2, 8, 3, 4, 5
RULES = ("linear", "delta")
MODES = ("scan", "parallel")
# Far from 0 and of both signs, so a gate applied the wrong way round (1 - sigmoid on the memory
# term) fails every comparison by O(1).
BETA = np.array([3.0, -3.0, 0.7], np.float32)


def _rand(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _qkv(seed, length=N, b=B, h=H, dk=DK, dv=DV, scale=1.0):
    """Distinct q, k, v (so using sigma(Q) where sigma(K) belongs, or vice versa, is caught)."""
    return (_rand(seed, b, length, h, dk, scale=scale), _rand(seed + 1, b, length, h, dk, scale=scale),
            _rand(seed + 2, b, length, h, dv, scale=scale))


def _nonempty_state(seed, b=B, h=H, dk=DK, dv=DV, tokens=6):
    """A float32 memory built by one random linear update from zero (z > 0 everywhere)."""
    _, k, v = _qkv(seed, length=tokens, b=b, h=h, dk=dk, dv=dv)
    m, z = ref.update_ref(np.zeros((b, h, dk, dv)), np.zeros((b, h, dk)), k, v, "linear")
    return m.astype(np.float32), z.astype(np.float32)


def _state(m, z):
    return MemoryState(M=jnp.asarray(m, jnp.float32), z=jnp.asarray(z, jnp.float32))


def _close(actual, expected, rtol=2e-5, what=""):
    """Relative to the array's scale: |a - e| <= rtol * (|e| + max|e|)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)
