"""Tests for infini_jax/attention.py against the independent float64 reference (tests/reference_np.py): the
equations (retrieve, update, one segment, a sequence in both modes, RoPE) and the input checks. Gradients,
causality, empty memory and precision are in tests/test_attention_properties.py.

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
from _attention import B, BETA, DK, DV, H, MODES, N, RULES, _close, _nonempty_state, _qkv, _state
from infini_jax.attention import (
    MemoryState,
    SequenceOptions,
    infini_attention,
    infini_attention_sequence,
    init_memory,
    retrieve,
    update,
)


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
                                jnp.asarray(BETA), SequenceOptions(N, rule))
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
                              jnp.asarray(beta), SequenceOptions(N, "linear"))
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
                                jnp.asarray(beta), SequenceOptions(N, "linear"))
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
                                           jnp.asarray(BETA), SequenceOptions(N, rule, mode), memory=state)
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
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(BETA), SequenceOptions(N, rule, mode),
            memory=_state(m0, z0))
    (o_s, st_s), (o_p, st_p) = results["scan"], results["parallel"]
    _close(o_p, o_s, rtol=1e-5, what="parallel vs scan output")
    _close(st_p.M, st_s.M, rtol=1e-5, what="parallel vs scan M")
    _close(st_p.z, st_s.z, rtol=1e-5, what="parallel vs scan z")


@pytest.mark.parametrize("mode", MODES)
def test_sequence_under_jit(mode):
    q, k, v = _qkv(75, length=3 * N)
    fn = jax.jit(functools.partial(infini_attention_sequence, opts=SequenceOptions(N, "delta", mode)))
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
                                jnp.asarray(BETA), SequenceOptions(N, rule, rope_base=ROPE_BASE))
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
                                           jnp.asarray(BETA), SequenceOptions(N, "linear", mode, ROPE_BASE))
    out_ref, m_ref, _ = ref.infini_attention_sequence_ref(q, k, v, BETA, N, "linear",
                                                          rope_base=ROPE_BASE)
    _close(out, out_ref, rtol=3e-5, what=f"rope sequence {mode}")
    _close(final.M, m_ref, rtol=3e-5, what="rope sequence M")




# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    q, k, v = (jnp.asarray(x) for x in _qkv(140))
    st = init_memory(B, H, DK, DV)
    beta = jnp.asarray(BETA)
    seg = functools.partial(infini_attention, opts=SequenceOptions(N, "linear"))
    seq = functools.partial(infini_attention_sequence, opts=SequenceOptions(N, "linear"))
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
        "not_multiple": (lambda: infini_attention_sequence(q, k, v, beta, SequenceOptions(3, "linear")),
                         r"(?i)(segment|multiple|divisible)"),
        "rule_seg": (lambda: infini_attention(q, k, v, st, beta, SequenceOptions(N, "hebbian")), r"(?i)rule"),
        "rule_seq": (lambda: infini_attention_sequence(q, k, v, beta, SequenceOptions(N, "x")),
                     r"(?i)rule"),
        "rule_update": (lambda: update(st, k, v, "deltaa"), r"(?i)rule"),
        "mode": (lambda: infini_attention_sequence(q, k, v, beta, SequenceOptions(N, "linear", "sideways")),
                 r"(?i)mode"),
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
