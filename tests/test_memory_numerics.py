"""Numerics of the memory the passkey evidence depends on: full float32 precision on every memory product,
σ exact for very negative inputs, resets that clear non-finite memory, and the write scale (mass augmentation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infini_jax import attention as A
from infini_jax import context as C
from infini_jax import sharding as shd

B, S, N, H, K, V = 2, 3, 12, 2, 4, 5  # N is unique among the sizes: local-attention dots are the [.., N, N] ones


def _qkv(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, S * N, H, K)), jax.random.normal(ks[1], (B, S * N, H, K)),
            jax.random.normal(ks[2], (B, S * N, H, V)))


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _dots(jaxpr):
    """Every dot_general in a jaxpr and its sub-jaxprs (scan, checkpoint, pjit, custom_jvp, ...)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = [tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars)]
            yield eqn.params["precision"], shapes
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from _dots(sub)


def _is_local(shapes):  # softmax attention inside a segment: scores or probabilities [.., N, N]
    return any(sum(d == N for d in s) >= 2 for s in shapes)


@pytest.mark.parametrize("rule", A.RULES)
@pytest.mark.parametrize("mode", A.MODES)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("context", [1, S])
def test_every_memory_dot_runs_at_highest_precision(rule, mode, grad, context):
    """On TPU the default rounds float32 to bfloat16 (GPU: TF32): at 2^20 tokens that buries one passkey's
    share of the read (benchmarks/memory_precision.py). Only the local softmax may keep the default.
    context=S: the segments split over a context mesh axis of S devices (infini_jax/context.py)."""
    q, k, v = _qkv()

    def f(q, k, v):
        out, st = C.infini_attention_sequence(q, k, v, jnp.zeros(H), A.SequenceOptions(N, rule, mode, rope_base=100.0))
        return jnp.sum(out ** 2) + jnp.sum(st.M) + jnp.sum(st.z)

    fn = jax.grad(f, argnums=(0, 1, 2)) if grad else f
    mesh = shd.make_mesh(dict(data=1, fsdp=1, context=context, tensor=1), jax.devices()[:context])
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(fn)(q, k, v).jaxpr
    assert (context > 1) == ("shard_map" in str(jaxpr))
    dots = list(_dots(jaxpr))
    memory = [(p, s) for p, s in dots if not _is_local(s)]
    local = [(p, s) for p, s in dots if _is_local(s)]
    assert memory and local, "expected both memory and local-attention products"
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    bad = [s for p, s in memory if p != highest]
    assert not bad, f"memory products at default precision: {bad}"


def test_retrieve_and_update_alone_are_highest():
    q, k, v = _qkv()
    st = A.init_memory(B, H, K, V)
    for fn in (lambda: A.retrieve(st, q), lambda: A.update(st, k, v, "delta")):
        dots = list(_dots(jax.make_jaxpr(fn)().jaxpr))
        assert dots and all(p == (jax.lax.Precision.HIGHEST,) * 2 for p, _ in dots)


@pytest.mark.parametrize("rule", A.RULES)
@pytest.mark.parametrize("t", [1, 6])
def test_decode_memory_dots_are_highest(rule, t):
    """The streaming decoder (infini_jax/decode.py) reads and writes the memory at HIGHEST too: a decode step
    (t = 1) and a prompt's last segment (t = N), both with the segment-full write traced. Memory products are
    the dots with an operand or result shaped like M [B, G, K, V] or z [B, G, K] (sizes chosen unique)."""
    from flax import nnx

    from infini_jax import decode
    from infini_jax.model import InfiniTransformer, ModelConfig

    cfg = ModelConfig(vocab_size=37, d_model=24, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=40,
                      segment_len=6, rule=rule)
    model = InfiniTransformer(cfg, rngs=nnx.Rngs(0))
    state = decode.from_memory(model, model.init_memory(2), 2)

    def f(state, tokens):
        return decode.forward(model, state, tokens, t)

    dots = list(_dots(jax.make_jaxpr(f)(state, jnp.zeros((2, t), jnp.int32)).jaxpr))
    memory = [(p, s) for p, s in dots if {(2, 2, 8, 8), (2, 2, 8)} & set(s)]
    assert len(memory) == (3 if rule == "linear" else 5), dots  # read (2) + write (1) [+ delta read (2)]
    assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p, _ in memory), memory

def test_sigma_is_exact_for_very_negative_inputs():
    x = np.array([-80.0, -30.0, -17.5, -16.0, -1.0, 0.0, 0.5, 3.0], np.float32)
    got = np.asarray(A.sigma(jnp.asarray(x)), np.float64)
    want = np.where(x > 0, x + 1.0, np.exp(x.astype(np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all(got > 0)  # expm1(x) + 1 is exactly 0 below -17.4 and 6% off at -16
    g = jax.grad(lambda x: jnp.sum(A.sigma(x)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), np.where(x > 0, 1.0, np.exp(x.astype(np.float64))), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda x: jnp.sum(A.sigma(x)))(jnp.asarray([1e30, -1e30])))))


def test_reset_clears_non_finite_memory():
    st = A.MemoryState(M=jnp.full((3, H, K, V), jnp.inf).at[1].set(jnp.nan).at[2].set(2.0),
                       z=jnp.full((3, H, K), jnp.nan).at[2].set(1.0))
    out = A.reset_memory(st, jnp.array([True, True, False]))
    assert np.all(np.asarray(out.M[:2]) == 0) and np.all(np.asarray(out.z[:2]) == 0)  # inf * 0 would be NaN
    np.testing.assert_array_equal(out.M[2], st.M[2])
    np.testing.assert_array_equal(out.z[2], st.z[2])


def test_linear_write_scale_equals_writing_the_segment_c_times():
    _, k, v = _qkv(1)
    k, v = k[:, :N], v[:, :N]
    st = A.update(A.init_memory(B, H, K, V), k * 0.5, v, "linear")  # a non-empty memory
    scaled = A.update(st, k, v, "linear", write_scale_b=jnp.array([3.0, 1.0]))
    thrice = st
    for _ in range(3):
        thrice = A.update(thrice, k, v, "linear")
    once = A.update(st, k, v, "linear")
    np.testing.assert_allclose(scaled.M[0], thrice.M[0], rtol=1e-5)
    np.testing.assert_allclose(scaled.z[0], thrice.z[0], rtol=1e-5)
    np.testing.assert_allclose(scaled.M[1], once.M[1], rtol=1e-6)


@pytest.mark.parametrize("rule", A.RULES)
def test_write_scale_scan_equals_parallel_and_ones_equal_none(rule):
    q, k, v = _qkv(2)
    beta = jnp.array([-1.0, 1.0])
    scale = jnp.array([[1.0, 7.0, 2.0], [30.0, 1.0, 1.0]])
    outs = [A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, rule, m), write_scale_bs=scale)
            for m in A.MODES]
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(outs[0][1].M, outs[1][1].M, rtol=2e-4, atol=2e-4)
    plain = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, rule))
    ones = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, rule), write_scale_bs=jnp.ones((B, S)))
    np.testing.assert_array_equal(plain[0], ones[0])
    assert not np.allclose(outs[0][0], plain[0])  # the scale changes what later segments read
    with pytest.raises(ValueError, match="write_scale must have shape"):
        A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, rule), write_scale_bs=jnp.ones((B, 2)))


def _scaled_write_ref(m, z, k, v, c_b):
    """float64: the delta write (eq. 9) of one segment, scaled per row by c_b (tests/reference_np.update_ref)."""
    from reference_np import update_ref

    m_new, z_new = update_ref(m, z, k, v, "delta")
    c_b = np.asarray(c_b, np.float64)
    return m + c_b[:, None, None, None] * (m_new - m), z + c_b[:, None, None] * (z_new - z)


def test_delta_mass_passes_match_a_float64_reference():
    """P passes: the leading scaled run (row 0: segments 0-1; row 1: none, its first segment is unscaled) written
    P - 1 times with c / P, then the sequence with c / P on that run and c elsewhere."""
    _, k, v = _qkv(3)
    q = _qkv(4)[0]
    beta = jnp.array([0.5, -0.5])
    scale = np.array([[6.0, 6.0, 1.0], [1.0, 4.0, 4.0]])
    P = 3
    got = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "delta", mass_passes=P),
                                      write_scale_bs=jnp.asarray(scale))
    lead = np.cumprod(scale != 1.0, axis=1).astype(bool)
    m, z = np.zeros((B, H, K, V)), np.zeros((B, H, K))
    seg = lambda x, s: np.asarray(x)[:, s * N:(s + 1) * N]  # noqa: E731
    for _ in range(P - 1):
        for s in range(S):
            m, z = _scaled_write_ref(m, z, seg(k, s), seg(v, s), np.where(lead[:, s], scale[:, s] / P, 0.0))
    for s in range(S):
        m, z = _scaled_write_ref(m, z, seg(k, s), seg(v, s), np.where(lead[:, s], scale[:, s] / P, scale[:, s]))
    np.testing.assert_allclose(got[1].M, m, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1].z, z, rtol=1e-5)
    one = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "delta"), write_scale_bs=jnp.asarray(scale))
    np.testing.assert_array_equal(got[0][1], one[0][1])  # row 1 has no leading run: nothing changes
    assert not np.allclose(got[1].M[0], one[1].M[0], rtol=1e-3)
    # a batch without any scaled leading run (before the augmentation starts) skips the passes: plain outputs
    plain = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "delta"))
    opts = A.SequenceOptions(N, "delta", mass_passes=P)
    unscaled = jax.jit(lambda s: A.infini_attention_sequence(q, k, v, beta, opts, write_scale_bs=s))(jnp.ones((B, S)))
    np.testing.assert_allclose(unscaled[0], plain[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", A.MODES)
def test_delta_mass_passes_equal_an_interleaved_haystack_when_each_pass_writes_once(mode):
    """A whole-row scaled run with c = P: the P passes are exactly P interleaved repeats of the row's segments,
    the memory a haystack of the row written P times over leaves; one c-fold write per segment does not."""
    q, k, v = _qkv(5)
    beta = jnp.zeros((H,))
    c = 4
    scale = jnp.full((B, S), float(c))
    passes = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "delta", mode, mass_passes=c),
                                         write_scale_bs=scale)[1]
    tile = lambda x: jnp.concatenate([x] * c, axis=1)  # noqa: E731
    haystack = A.infini_attention_sequence(tile(q), tile(k), tile(v), beta, A.SequenceOptions(N, "delta", mode))[1]
    np.testing.assert_allclose(passes.M, haystack.M, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(passes.z, haystack.z, rtol=1e-5)
    single = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "delta", mode), write_scale_bs=scale)[1]
    assert np.abs(np.asarray(single.M - haystack.M)).max() > 100 * np.abs(np.asarray(passes.M - haystack.M)).max()


def test_mass_passes_leave_the_linear_rule_alone_and_are_checked():
    q, k, v = _qkv(6)
    beta = jnp.zeros((H,))
    scale = jnp.array([[5.0, 5.0, 1.0], [2.0, 1.0, 3.0]])
    runs = [A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "linear", mass_passes=p),
                                        write_scale_bs=scale) for p in (1, 4)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])  # linear: every split of c is the same memory
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="mass_passes must be an integer >= 1"):
            A.SequenceOptions(N, "delta", mass_passes=bad)
    from infini_jax.model import ModelConfig

    with pytest.raises(ValueError, match="model.mass_passes must be positive"):
        ModelConfig(mass_passes=0)


def test_batch_mass_source_writes_c_times_the_batch_mean_of_scaled_segments():
    """mass_source='batch': a segment with c ≠ 1 writes c × the mean write of every such segment of the batch
    (other rows' too), a segment with c = 1 itself; the outputs read that memory; no scaled segment: unchanged."""
    from reference_np import sigma as sigma_ref

    q, k, v = _qkv(7)
    beta = jnp.array([0.3, -0.3])
    scale = np.array([[5.0, 5.0, 1.0], [1.0, 3.0, 1.0]])
    opts = A.SequenceOptions(N, "linear", mass_source="batch")
    out, final = A.infini_attention_sequence(q, k, v, beta, opts, write_scale_bs=jnp.asarray(scale))
    seg = lambda x, b, s: np.asarray(x, np.float64)[b, s * N:(s + 1) * N]  # noqa: E731  [N, H, D]
    write = lambda b, s: np.einsum("nhk,nhv->hkv", sigma_ref(seg(k, b, s)), seg(v, b, s))  # noqa: E731
    mass = lambda b, s: sigma_ref(seg(k, b, s)).sum(0)  # noqa: E731
    pooled = [(b, s) for b in range(B) for s in range(S) if scale[b, s] != 1]
    mean_m, mean_z = (np.mean([f(b, s) for b, s in pooled], axis=0) for f in (write, mass))
    for b in range(B):
        m = sum(scale[b, s] * mean_m if scale[b, s] != 1 else write(b, s) for s in range(S))
        z = sum(scale[b, s] * mean_z if scale[b, s] != 1 else mass(b, s) for s in range(S))
        np.testing.assert_allclose(final.M[b], m, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(final.z[b], z, rtol=1e-5)
    own = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "linear"), write_scale_bs=jnp.asarray(scale))
    np.testing.assert_array_equal(out[:, :N], own[0][:, :N])  # the first segment reads an empty memory either way
    assert not np.allclose(out[:, N:], own[0][:, N:], rtol=1e-3)  # later ones read the batch's mass
    ones = A.infini_attention_sequence(q, k, v, beta, opts, write_scale_bs=jnp.ones((B, S)))
    plain = A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "linear"))
    np.testing.assert_allclose(ones[0], plain[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule, mode", [("delta", "scan"), ("linear", "parallel")])
def test_batch_mass_source_is_refused_outside_linear_scan(rule, mode):
    with pytest.raises(ValueError, match="mass_source='batch' is built for the linear rule in scan mode"):
        A.SequenceOptions(N, rule, mode, mass_source="batch")
    from infini_jax.model import ModelConfig

    with pytest.raises(ValueError, match="model.mass_source='batch' needs rule='linear' and mode='scan'"):
        ModelConfig(rule=rule, mode=mode, mass_source="batch")
    with pytest.raises(ValueError, match="unknown mass_source 'rows'"):
        A.SequenceOptions(N, "linear", mass_source="rows")
