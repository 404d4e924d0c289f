"""Properties of infini_jax/attention.py beyond the equations (tests/test_attention.py): gradients (finite, and
equal to the float64 reference's finite differences), causality, rows with empty memory, bfloat16 inputs,
thousands of segments and extreme inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_np as ref
from _attention import B, BETA, DK, DV, H, MODES, N, RULES, _close, _nonempty_state, _qkv, _rand, _state
from infini_jax.attention import (SequenceOptions, infini_attention, infini_attention_sequence, init_memory, retrieve,
                                  update)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("initial", ["empty", "given"])
def test_gradients_finite(rule, mode, initial):
    q, k, v = _qkv(90, length=3 * N)
    state = None if initial == "empty" else _state(*_nonempty_state(91))
    w = jnp.asarray(_rand(92, B, 3 * N, H, DV))

    def loss(q_, k_, v_, beta_):
        out, final = infini_attention_sequence(q_, k_, v_, beta_, SequenceOptions(N, rule, mode), memory=state)
        return jnp.sum(out * w) + 1e-2 * jnp.sum(final.M) + 1e-2 * jnp.sum(final.z)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                 jnp.asarray(BETA))
    for name, g in zip("qkvb", grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), f"non-finite grad wrt {name}"
        assert np.max(np.abs(g)) > 0, f"zero grad wrt {name}"


@pytest.mark.parametrize("rule", RULES)
def test_gradient_matches_reference_finite_difference(rule):
    """Directional derivative of JAX's grad vs a float64 central difference of the reference."""
    n_seg = 3
    q, k, v = _qkv(95, length=n_seg * N)
    w = _rand(96, B, n_seg * N, H, DV)
    dq, dk, dv = _qkv(97, length=n_seg * N)
    dbeta = _rand(98, H)

    def loss_jax(q_, k_, v_, beta_):
        out, _ = infini_attention_sequence(q_, k_, v_, beta_, SequenceOptions(N, rule))
        return jnp.sum(out * jnp.asarray(w))

    grads = jax.grad(loss_jax, argnums=(0, 1, 2, 3))(jnp.asarray(q), jnp.asarray(k),
                                                     jnp.asarray(v), jnp.asarray(BETA))
    directional = sum(float(np.sum(np.asarray(g, np.float64) * d))
                      for g, d in zip(grads, (dq, dk, dv, dbeta)))

    q64, k64, v64, b64 = (np.asarray(x, np.float64) for x in (q, k, v, BETA))
    dq, dk, dv, dbeta = (np.asarray(x, np.float64) for x in (dq, dk, dv, dbeta))

    def loss_ref(t):
        out = ref.infini_attention_sequence_ref(q64 + t * dq, k64 + t * dk, v64 + t * dv,
                                                b64 + t * dbeta, N, rule)[0]
        return float(np.sum(out * w))

    eps = 1e-5
    fd = (loss_ref(eps) - loss_ref(-eps)) / (2 * eps)
    assert abs(directional - fd) <= 1e-3 * max(abs(fd), 1.0), (directional, fd)


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("t", [5, 13, 24])
def test_causality(rule, mode, t):
    """Perturbing q/k/v at position t changes nothing before t, in this or earlier segments;
    it changes position t, and (through the memory) later segments."""
    n_seg = 4
    q, k, v = _qkv(100, length=n_seg * N)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    rng = np.random.default_rng(101)
    for arr in (q2, k2, v2):
        arr[:, t] += rng.normal(size=arr[:, t].shape).astype(np.float32) * 3.0

    def run(q_, k_, v_):
        return np.asarray(infini_attention_sequence(
            jnp.asarray(q_), jnp.asarray(k_), jnp.asarray(v_), jnp.asarray(BETA),
            SequenceOptions(N, rule, mode))[0])

    base, pert = run(q, k, v), run(q2, k2, v2)
    diff = np.max(np.abs(pert - base), axis=(0, 2, 3))  # [L]
    assert np.all(diff[:t] <= 1e-6), f"output before t={t} changed: {diff[:t]}"
    assert diff[t] > 1e-2
    next_seg = (t // N + 1) * N
    if next_seg < n_seg * N:
        assert np.all(diff[next_seg:] > 1e-5), "memory does not carry position t to later segments"


# ----------------------------------------------------------------------------- empty memory
def _mixed_state():
    """Row 0: all heads empty. Row 1: head 0 empty, heads 1, 2 non-empty."""
    m, z = _nonempty_state(110)
    m[0], z[0] = 0.0, 0.0
    m[1, 0], z[1, 0] = 0.0, 0.0
    empty = np.array([[True, True, True], [True, False, False]])
    assert np.array_equal(ref.is_empty(z), empty)
    return m, z, empty


@pytest.mark.parametrize("rule", RULES)
def test_empty_memory_rows_read_nothing(rule):
    m, z, empty = _mixed_state()
    q, k, v = _qkv(111)
    outs = {}
    for sign in (+1.0, -1.0):
        beta = jnp.full((H,), 5.0 * sign, jnp.float32)
        outs[sign] = infini_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), _state(m, z),
                                      beta, SequenceOptions(N, rule))
    o_pos, o_neg = (np.asarray(outs[s][0]) for s in (+1.0, -1.0))
    assert np.all(np.isfinite(o_pos)) and np.all(np.isfinite(o_neg))
    local = ref.local_attention_ref(q, k, v)
    for b in range(B):
        for h in range(H):
            if empty[b, h]:
                # exactly the local attention: no gate, so beta cannot matter (bitwise)
                np.testing.assert_array_equal(o_pos[b, :, h], o_neg[b, :, h])
                _close(o_pos[b, :, h], local[b, :, h], what=f"empty ({b},{h}) == A_dot")
            else:
                assert np.max(np.abs(o_pos[b, :, h] - o_neg[b, :, h])) > 1e-2
    out_ref, m_ref, z_ref = ref.infini_attention_ref(q, k, v, m, z, np.full(H, 5.0), rule)
    _close(o_pos, out_ref, what="mixed-batch output")
    _close(outs[1.0][1].M, m_ref, what="mixed-batch M")
    _close(outs[1.0][1].z, z_ref, what="mixed-batch z")
    # retrieve returns exactly 0 on empty (row, head) pairs and no NaN anywhere
    read = np.asarray(retrieve(_state(m, z), jnp.asarray(q)))
    assert np.all(np.isfinite(read))
    assert np.all(read.transpose(0, 2, 1, 3)[empty] == 0.0)
    # delta == linear where the memory is empty
    lin = update(_state(m, z), jnp.asarray(k), jnp.asarray(v), "linear")
    dlt = update(_state(m, z), jnp.asarray(k), jnp.asarray(v), "delta")
    np.testing.assert_array_equal(np.asarray(dlt.M)[empty], np.asarray(lin.M)[empty])
    np.testing.assert_array_equal(np.asarray(dlt.z), np.asarray(lin.z))
    assert np.max(np.abs(np.asarray(dlt.M)[~empty] - np.asarray(lin.M)[~empty])) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_first_segment_of_sequence_is_local_attention(mode):
    q, k, v = _qkv(115, length=2 * N)
    firsts = []
    for sign in (+1.0, -1.0):
        out, _ = infini_attention_sequence(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                           jnp.full((H,), 6.0 * sign, jnp.float32),
                                           SequenceOptions(N, "delta", mode))
        firsts.append(np.asarray(out)[:, :N])
    np.testing.assert_array_equal(firsts[0], firsts[1])
    _close(firsts[0], ref.local_attention_ref(q[:, :N], k[:, :N], v[:, :N]), what="first segment")


# ----------------------------------------------------------------------------- precision / length
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
def test_bf16_inputs_keep_float32_memory(rule, mode):
    n_seg = 16
    q, k, v = _qkv(120, length=n_seg * N, scale=3.0)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out, final = infini_attention_sequence(qb, kb, vb, jnp.asarray(BETA), SequenceOptions(N, rule, mode))
    assert out.dtype == jnp.bfloat16
    assert final.M.dtype == jnp.float32 and final.z.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert np.all(np.isfinite(np.asarray(final.M))) and np.all(np.isfinite(np.asarray(final.z)))
    # loose agreement with the reference run on the bf16-rounded inputs
    qr, kr, vr = (np.asarray(x, np.float64) for x in (qb, kb, vb))
    out_ref, _, z_ref = ref.infini_attention_sequence_ref(qr, kr, vr, BETA, N, rule)
    _close(np.asarray(out, np.float32), out_ref, rtol=3e-2, what="bf16 output")
    _close(final.z, z_ref, rtol=1e-3, what="bf16 z (float32 accumulation)")
    # one segment with bf16 q/k/v and a float32 state keeps the state float32
    o1, s1 = infini_attention(qb[:, :N], kb[:, :N], vb[:, :N], init_memory(B, H, DK, DV),
                              jnp.asarray(BETA), SequenceOptions(N, rule))
    assert o1.dtype == jnp.bfloat16 and s1.M.dtype == jnp.float32 and s1.z.dtype == jnp.float32


@pytest.mark.parametrize("rule", RULES)
def test_thousand_segments_stay_finite(rule):
    n_seg, seg, b, h, d = 1000, 4, 1, 2, 4
    q, k, v = _qkv(130, length=n_seg * seg, b=b, h=h, dk=d, dv=d)
    beta = np.array([2.0, -1.0], np.float32)
    out, final = infini_attention_sequence(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                           jnp.asarray(beta), SequenceOptions(seg, rule, "scan"))
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.all(np.isfinite(np.asarray(final.M))) and np.all(np.isfinite(np.asarray(final.z)))
    out_ref, m_ref, z_ref = ref.infini_attention_sequence_ref(q, k, v, beta, seg, rule)
    _close(final.z, z_ref, rtol=1e-4, what="z after 1000 segments")
    _close(final.M, m_ref, rtol=1e-3, what="M after 1000 segments")
    _close(np.asarray(out)[:, -seg * 10:], out_ref[:, -seg * 10:], rtol=1e-3, what="late outputs")


@pytest.mark.parametrize("rule", RULES)
def test_extreme_inputs_finite(rule):
    """Very negative q/k make sigma underflow to exactly 0 (den = 0 on a non-empty memory: the guard
    must give 0, not NaN); very positive ones make sigma large. Values and gradients stay finite."""
    n_seg = 3
    q, k, v = _qkv(150, length=n_seg * N, scale=1.0)
    q[:, 3], k[:, 9] = -200.0, -200.0  # sigma(x) = exp(-200) -> 0 in float32 (and tiny in float64)
    q[:, 5], k[:, 12] = 60.0, 60.0
    m0, z0 = _nonempty_state(151)

    def run(q_, k_, v_, beta_):
        return infini_attention_sequence(q_, k_, v_, beta_, SequenceOptions(N, rule, "scan"),
                                         memory=_state(m0, z0))

    args = tuple(jnp.asarray(x) for x in (q, k, v, BETA))
    out, final = run(*args)
    for x in (out, final.M, final.z):
        assert np.all(np.isfinite(np.asarray(x)))
    out_ref, m_ref, _ = ref.infini_attention_sequence_ref(q, k, v, BETA, N, rule, m0, z0)
    _close(out, out_ref, rtol=1e-4, what="extreme-input output")
    _close(final.M, m_ref, rtol=1e-4, what="extreme-input M")
    grads = jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=(0, 1, 2, 3))(*args)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
