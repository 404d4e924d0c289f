"""Tests for infini_jax/attention.py against the independent float64 reference (tests/reference_np.py).

Float32 JAX vs float64 NumPy, small shapes, CPU. Inputs are drawn in float32 and the reference
consumes exactly those values (cast to float64), so differences are JAX round-off only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_np as ref
from infini_jax.attention import (
    MemoryState,
    infini_attention,
    infini_attention_sequence,
    init_memory,
    retrieve,
    update,
)

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


def test_reference_self_check():
    ref._self_check()


def test_init_memory_zeros_float32():
    state = init_memory(B, H, DK, DV)
    assert isinstance(state, MemoryState)
    assert state.M.shape == (B, H, DK, DV) and state.z.shape == (B, H, DK)
    assert state.M.dtype == jnp.float32 and state.z.dtype == jnp.float32
    assert not np.any(np.asarray(state.M)) and not np.any(np.asarray(state.z))
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 2  # a pytree of exactly M and z


# ----------------------------------------------------------------------------- retrieve / update
def test_retrieve_matches_eq7():
    m, z = _nonempty_state(10)
    q, k, _ = _qkv(11)
    out = retrieve(_state(m, z), jnp.asarray(q))
    assert out.dtype == jnp.float32 and out.shape == (B, N, H, DV)
    _close(out, ref.retrieve_ref(m, z, q), what="retrieve")
    # sanity that the check can fail: keys give a clearly different read than queries
    assert np.max(np.abs(ref.retrieve_ref(m, z, k) - ref.retrieve_ref(m, z, q))) > 1e-2


def test_retrieve_denominator_guard_only_near_zero():
    """eq. 7 is invariant to scaling (M, z) by c; with max(denom, 1e-6) that must hold for small c
    too (an additive eps in the denominator would break it)."""
    m, z = _nonempty_state(12)
    q, _, _ = _qkv(13)
    base = np.asarray(retrieve(_state(m, z), jnp.asarray(q)))
    c = np.float32(1e-4)
    small = retrieve(_state(m * c, z * c), jnp.asarray(q))
    _close(small, base, rtol=2e-5, what="scaled memory retrieval")


@pytest.mark.parametrize("rule", RULES)
def test_update_matches_eq8_eq9(rule):
    m, z = _nonempty_state(20)
    _, k, v = _qkv(21)
    new = update(_state(m, z), jnp.asarray(k), jnp.asarray(v), rule)
    assert isinstance(new, MemoryState)
    assert new.M.dtype == jnp.float32 and new.z.dtype == jnp.float32
    m_ref, z_ref = ref.update_ref(m, z, k, v, rule)
    _close(new.M, m_ref, what=f"M after {rule} update")
    _close(new.z, z_ref, what=f"z after {rule} update")
    # the two rules really differ on a non-empty memory (so each test can tell them apart)
    other = ref.update_ref(m, z, k, v, "delta" if rule == "linear" else "linear")[0]
    assert np.max(np.abs(other - m_ref)) > 1e-2
    # z uses sigma(K): z_s - z_{s-1} == sum_t sigma(K_t)
    _close(np.asarray(new.z) - z, ref.sigma(k).sum(axis=1), rtol=1e-5, what="z increment")


# ----------------------------------------------------------------------------- one segment
@pytest.mark.parametrize("rule", RULES)
def test_one_segment_matches_reference(rule):
    m, z = _nonempty_state(30)
    q, k, v = _qkv(31)
    out, new = infini_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), _state(m, z),
                                jnp.asarray(BETA), rule=rule)
    assert out.dtype == jnp.float32 and out.shape == (B, N, H, DV)
    out_ref, m_ref, z_ref = ref.infini_attention_ref(q, k, v, m, z, BETA, rule)
    _close(out, out_ref, what="segment output")
    _close(new.M, m_ref, what="segment M")
    _close(new.z, z_ref, what="segment z")


def test_gate_direction_sigmoid_beta_weights_memory():
    """eq. 10: sigmoid(beta) multiplies A_mem. beta=+8 -> output ~ A_mem; beta=-8 -> ~ A_dot."""
    m, z = _nonempty_state(40)
    q, k, v = _qkv(41)
    beta = np.array([8.0, -8.0, 8.0], np.float32)
    out, _ = infini_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), _state(m, z),
                              jnp.asarray(beta), rule="linear")
    out = np.asarray(out)
    a_mem = ref.retrieve_ref(m, z, q)
    a_dot = ref.local_attention_ref(q, k, v)
    gap = np.max(np.abs(a_mem - a_dot))
    assert gap > 0.3  # the two paths are far apart, so a reversed gate cannot pass
    tol = 2e-3 * gap  # 1 - sigmoid(8) = 3.4e-4
    assert np.max(np.abs(out[:, :, 0] - a_mem[:, :, 0])) < tol
    assert np.max(np.abs(out[:, :, 2] - a_mem[:, :, 2])) < tol
    assert np.max(np.abs(out[:, :, 1] - a_dot[:, :, 1])) < tol


def test_read_before_write():
    """Retrieval inside a segment uses the memory from BEFORE that segment's update."""
    m, z = _nonempty_state(50)
    q, k, v = _qkv(51, scale=2.0)
    beta = np.full((H,), 12.0, np.float32)  # output ~= A_mem
    out, new = infini_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), _state(m, z),
                                jnp.asarray(beta), rule="linear")
    read_old = ref.retrieve_ref(m, z, q)
    read_new = ref.retrieve_ref(np.asarray(new.M, np.float64), np.asarray(new.z, np.float64), q)
    gap = np.max(np.abs(read_new - read_old))
    assert gap > 0.1
    assert np.max(np.abs(np.asarray(out) - read_old)) < 1e-3 * gap


# ----------------------------------------------------------------------------- many segments
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("initial", ["empty", "given"])
def test_sequence_matches_reference(rule, mode, initial):
    n_seg = 5
    q, k, v = _qkv(60, length=n_seg * N)
    if initial == "empty":
        m0 = z0 = state = None
    else:
        m0, z0 = _nonempty_state(61)
        state = _state(m0, z0)
    out, final = infini_attention_sequence(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                           jnp.asarray(BETA), segment_len=N, rule=rule, memory=state,
                                           mode=mode)
    assert out.shape == (B, n_seg * N, H, DV) and out.dtype == jnp.float32
    assert final.M.dtype == jnp.float32 and final.z.dtype == jnp.float32
    out_ref, m_ref, z_ref = ref.infini_attention_sequence_ref(q, k, v, BETA, N, rule, m0, z0)
    _close(out, out_ref, rtol=3e-5, what=f"sequence output {rule}/{mode}/{initial}")
    _close(final.M, m_ref, rtol=3e-5, what="final M")
    _close(final.z, z_ref, rtol=3e-5, what="final z")


@pytest.mark.parametrize("rule", RULES)
def test_scan_and_parallel_agree(rule):
    n_seg = 6
    q, k, v = _qkv(70, length=n_seg * N, scale=1.5)
    m0, z0 = _nonempty_state(71)
    results = {}
    for mode in MODES:
        results[mode] = infini_attention_sequence(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(BETA), segment_len=N,
            rule=rule, memory=_state(m0, z0), mode=mode)
    (o_s, st_s), (o_p, st_p) = results["scan"], results["parallel"]
    _close(o_p, o_s, rtol=1e-5, what="parallel vs scan output")
    _close(st_p.M, st_s.M, rtol=1e-5, what="parallel vs scan M")
    _close(st_p.z, st_s.z, rtol=1e-5, what="parallel vs scan z")


@pytest.mark.parametrize("mode", MODES)
def test_sequence_under_jit(mode):
    q, k, v = _qkv(75, length=3 * N)
    fn = jax.jit(functools.partial(infini_attention_sequence, segment_len=N, rule="delta", mode=mode))
    out, final = fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(BETA))
    out_ref, m_ref, _ = ref.infini_attention_sequence_ref(q, k, v, BETA, N, "delta")
    _close(out, out_ref, rtol=3e-5, what="jitted sequence")
    _close(final.M, m_ref, rtol=3e-5, what="jitted final M")


# ----------------------------------------------------------------------------- RoPE
ROPE_BASE = 100.0  # small base so that even d_key=4 rotates a lot over 8 positions


@pytest.mark.parametrize("rule", RULES)
def test_rope_one_segment(rule):
    m, z = _nonempty_state(80)
    q, k, v = _qkv(81)
    out, new = infini_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), _state(m, z),
                                jnp.asarray(BETA), rule=rule, rope_base=ROPE_BASE)
    out_ref, m_ref, z_ref = ref.infini_attention_ref(q, k, v, m, z, BETA, rule, rope_base=ROPE_BASE)
    _close(out, out_ref, what="rope segment output")
    # RoPE touches the local path only: the memory update is the same as without RoPE
    _close(new.M, m_ref, what="rope segment M")
    _close(new.z, z_ref, what="rope segment z")
    no_rope = ref.infini_attention_ref(q, k, v, m, z, BETA, rule)[0]
    assert np.max(np.abs(no_rope - out_ref)) > 1e-2  # the rope path is really exercised


@pytest.mark.parametrize("mode", MODES)
def test_rope_sequence_positions_restart_each_segment(mode):
    n_seg = 4
    q, k, v = _qkv(85, length=n_seg * N)
    out, final = infini_attention_sequence(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                           jnp.asarray(BETA), segment_len=N, rule="linear",
                                           mode=mode, rope_base=ROPE_BASE)
    out_ref, m_ref, _ = ref.infini_attention_sequence_ref(q, k, v, BETA, N, "linear",
                                                          rope_base=ROPE_BASE)
    _close(out, out_ref, rtol=3e-5, what=f"rope sequence {mode}")
    _close(final.M, m_ref, rtol=3e-5, what="rope sequence M")


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("initial", ["empty", "given"])
def test_gradients_finite(rule, mode, initial):
    q, k, v = _qkv(90, length=3 * N)
    state = None if initial == "empty" else _state(*_nonempty_state(91))
    w = jnp.asarray(_rand(92, B, 3 * N, H, DV))

    def loss(q_, k_, v_, beta_):
        out, final = infini_attention_sequence(q_, k_, v_, beta_, segment_len=N, rule=rule,
                                               memory=state, mode=mode)
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
        out, _ = infini_attention_sequence(q_, k_, v_, beta_, segment_len=N, rule=rule)
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
            jnp.asarray(q_), jnp.asarray(k_), jnp.asarray(v_), jnp.asarray(BETA), segment_len=N,
            rule=rule, mode=mode)[0])

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
                                      beta, rule=rule)
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
                                           jnp.full((H,), 6.0 * sign, jnp.float32), segment_len=N,
                                           rule="delta", mode=mode)
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
    out, final = infini_attention_sequence(qb, kb, vb, jnp.asarray(BETA), segment_len=N, rule=rule,
                                           mode=mode)
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
                              jnp.asarray(BETA), rule=rule)
    assert o1.dtype == jnp.bfloat16 and s1.M.dtype == jnp.float32 and s1.z.dtype == jnp.float32


@pytest.mark.parametrize("rule", RULES)
def test_thousand_segments_stay_finite(rule):
    n_seg, seg, b, h, d = 1000, 4, 1, 2, 4
    q, k, v = _qkv(130, length=n_seg * seg, b=b, h=h, dk=d, dv=d)
    beta = np.array([2.0, -1.0], np.float32)
    out, final = infini_attention_sequence(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                           jnp.asarray(beta), segment_len=seg, rule=rule, mode="scan")
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
        return infini_attention_sequence(q_, k_, v_, beta_, segment_len=N, rule=rule,
                                         memory=_state(m0, z0), mode="scan")

    args = tuple(jnp.asarray(x) for x in (q, k, v, BETA))
    out, final = run(*args)
    for x in (out, final.M, final.z):
        assert np.all(np.isfinite(np.asarray(x)))
    out_ref, m_ref, _ = ref.infini_attention_sequence_ref(q, k, v, BETA, N, rule, m0, z0)
    _close(out, out_ref, rtol=1e-4, what="extreme-input output")
    _close(final.M, m_ref, rtol=1e-4, what="extreme-input M")
    grads = jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=(0, 1, 2, 3))(*args)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    q, k, v = (jnp.asarray(x) for x in _qkv(140))
    st = init_memory(B, H, DK, DV)
    beta = jnp.asarray(BETA)
    seg = functools.partial(infini_attention, rule="linear")
    seq = functools.partial(infini_attention_sequence, segment_len=N, rule="linear")
    wrong_state = init_memory(B, H + 1, DK, DV)
    wrong_z = MemoryState(M=st.M, z=jnp.zeros((B, H, DK + 1), jnp.float32))
    return {
        "q_3d": (lambda: seg(q[..., 0], k, v, st, beta), r"(?i)(rank|ndim|dim|shape)"),
        "seq_q_3d": (lambda: seq(q[..., 0], k, v, beta), r"(?i)(rank|ndim|dim|shape)"),
        "kv_length": (lambda: seg(q, k, v[:, :-1], st, beta), r"(?i)(shape|length|mismatch|match)"),
        "qk_dkey": (lambda: seg(q, k[..., :-1], v, st, beta), r"(?i)(shape|d_key|mismatch|match)"),
        "batch": (lambda: seg(q, k[:1], v[:1], st, beta), r"(?i)(shape|batch|mismatch|match)"),
        "state_heads": (lambda: seg(q, k, v, wrong_state, beta), r"(?i)(state|memory|shape)"),
        "state_z": (lambda: seg(q, k, v, wrong_z, beta), r"(?i)(state|memory|\bz\b|shape)"),
        "seq_state": (lambda: seq(q, k, v, beta, memory=wrong_state), r"(?i)(state|memory|shape)"),
        "retrieve_state": (lambda: retrieve(wrong_state, q), r"(?i)(state|memory|shape)"),
        "update_state": (lambda: update(wrong_state, k, v, "linear"), r"(?i)(state|memory|shape)"),
        "gate_len": (lambda: seg(q, k, v, st, beta[:2]), r"(?i)(gate|beta)"),
        "gate_2d": (lambda: seg(q, k, v, st, beta[None]), r"(?i)(gate|beta)"),
        "seq_gate": (lambda: seq(q, k, v, jnp.zeros((H + 1,))), r"(?i)(gate|beta)"),
        "not_multiple": (lambda: infini_attention_sequence(q, k, v, beta, segment_len=3, rule="linear"),
                         r"(?i)(segment|multiple|divisible)"),
        "rule_seg": (lambda: infini_attention(q, k, v, st, beta, rule="hebbian"), r"(?i)rule"),
        "rule_seq": (lambda: infini_attention_sequence(q, k, v, beta, segment_len=N, rule="x"),
                     r"(?i)rule"),
        "rule_update": (lambda: update(st, k, v, "deltaa"), r"(?i)rule"),
        "mode": (lambda: seq(q, k, v, beta, mode="sideways"), r"(?i)mode"),
    }


BAD_CASES = ("q_3d", "seq_q_3d", "kv_length", "qk_dkey", "batch", "state_heads", "state_z", "seq_state",
             "retrieve_state", "update_state", "gate_len", "gate_2d", "seq_gate", "not_multiple",
             "rule_seg", "rule_seq", "rule_update", "mode")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_value_error(case):
    cases = _bad_cases()
    assert set(cases) == set(BAD_CASES)
    fn, pattern = cases[case]
    with pytest.raises(ValueError, match=pattern):
        fn()
