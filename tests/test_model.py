"""InfiniTransformer: modes agree, streaming equals one call, reset mask, per-layer memory, variants, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infini_jax import attention as attn
from infini_jax.model import InfiniTransformer, ModelConfig, count_params, gate_values

SMALL = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, head_dim=8, d_ff=64,
             segment_len=8, n_segments=4)


def make(**kw):
    cfg = ModelConfig(**{**SMALL, **kw})
    return InfiniTransformer(cfg, rngs=nnx.Rngs(0))


def randomize_gates(model, seed=3):
    """Move the gates away from 0.5 so that a mix-up of memory and local terms would show."""
    rng = np.random.default_rng(seed)
    for block in model.blocks:
        h = block.attn.gate_logit[...].shape[0]
        block.attn.gate_logit[...] = jnp.asarray(rng.normal(0, 2, h), jnp.float32)


def tokens(b=2, l=32, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, SMALL["vocab_size"])


@pytest.mark.parametrize("rule", attn.RULES)
def test_scan_and_parallel_modes_agree(rule):
    m_scan, m_par = make(rule=rule, mode="scan"), make(rule=rule, mode="parallel")  # same seed: same weights
    randomize_gates(m_scan)
    randomize_gates(m_par)
    toks = tokens()
    lg_s, st_s = m_scan(toks)
    lg_p, st_p = m_par(toks)
    np.testing.assert_allclose(lg_s, lg_p, atol=2e-5, rtol=1e-5)
    for a, b in zip(st_s, st_p):
        np.testing.assert_allclose(a.M, b.M, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(a.z, b.z, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("attention,rule", [("infini", "linear"), ("infini", "delta"), ("xl", "linear"),
                                            ("local", "linear")])
def test_one_call_equals_streamed_calls(attention, rule):
    model = make(attention=attention, rule=rule)
    if attention == "infini":
        randomize_gates(model)
    toks = tokens()
    full, _ = model(toks)
    state = model.init_memory(2)
    pieces = []
    for start, stop in ((0, 8), (8, 24), (24, 32)):  # 1, 2 and 1 segments per call
        lg, state = model(toks[:, start:stop], state)
        pieces.append(lg)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["infini", "xl"])
def test_reset_clears_only_that_row(attention):
    model = make(attention=attention)
    if attention == "infini":
        randomize_gates(model)
    toks = tokens()
    _, state = model(toks[:, :16])
    after, _ = model(toks[:, 16:], state, reset_b=jnp.array([True, False]))
    fresh, _ = model(toks[:, 16:])  # no memory at all
    carried, _ = model(toks[:, 16:], state)
    np.testing.assert_allclose(after[0], fresh[0], atol=1e-6)
    np.testing.assert_allclose(after[1], carried[1], atol=1e-6)
    assert not np.allclose(carried[0], fresh[0], atol=1e-4), "memory should matter for row 0 without reset"


def test_each_layer_has_its_own_memory():
    model = make(num_layers=3)
    randomize_gates(model)
    _, state = model(tokens())
    assert len(state) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.allclose(state[i].M, state[j].M), f"layers {i} and {j} share a memory"
    assert all(s.M.dtype == jnp.float32 for s in state)


def test_memory_changes_later_segments_only():
    """Perturbing segment 0 changes segment 1+ logits (through memory) but not segment 0's own past."""
    model = make(attention="local")
    toks = tokens()
    toks2 = toks.at[:, 3].set((toks[:, 3] + 1) % SMALL["vocab_size"])
    a, _ = model(toks)
    b, _ = model(toks2)
    np.testing.assert_allclose(a[:, 8:], b[:, 8:], atol=1e-6)  # local: nothing crosses segments
    inf = make(attention="infini")
    randomize_gates(inf)
    a, _ = inf(toks)
    b, _ = inf(toks2)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)  # causal
    assert not np.allclose(a[:, 8:], b[:, 8:], atol=1e-5)  # memory carries segment 0 forward


@pytest.mark.parametrize("attention", ["infini", "xl", "local", "full"])
@pytest.mark.parametrize("mlp,tie,kv", [("gated", True, None), ("plain", False, 2)])
def test_every_variant_runs_and_trains(attention, mlp, tie, kv):
    model = make(attention=attention, mlp=mlp, tie_embeddings=tie, num_kv_heads=kv)
    toks = tokens()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p, rest)(toks)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    if attention == "infini":
        assert gate_values(model).shape == (2, 4)
        np.testing.assert_allclose(gate_values(model), 0.5)


def test_bf16_activations_keep_f32_memory():
    model = make(dtype="bfloat16")
    logits, state = model(tokens())
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
    assert all(s.M.dtype == jnp.float32 and s.z.dtype == jnp.float32 for s in state)


def test_gqa_param_count():
    m_mha, m_gqa = make(), make(num_kv_heads=1)
    count = lambda m: count_params(nnx.state(m, nnx.Param))  # noqa: E731
    d, h, k = SMALL["d_model"], SMALL["num_heads"], SMALL["head_dim"]
    assert count(m_mha) - count(m_gqa) == SMALL["num_layers"] * 2 * d * (h - 1) * k


def test_bad_input_errors():
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(**{**SMALL, "attention": "sparse"})
    with pytest.raises(ValueError, match="rule"):
        ModelConfig(**{**SMALL, "rule": "hebbian"})
    with pytest.raises(ValueError, match="mode"):
        ModelConfig(**{**SMALL, "mode": "loop"})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(**{**SMALL, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**SMALL, "n_layers": 3})
    model = make()
    with pytest.raises(ValueError, match="multiple of segment_len"):
        model(tokens(l=12))
    with pytest.raises(ValueError, match="batch, length"):
        model(jnp.zeros((2, 4, 8), jnp.int32))
    with pytest.raises(ValueError, match="reset"):
        model(tokens(), reset_b=jnp.zeros((3,), bool))
    with pytest.raises(ValueError, match="layers"):
        model(tokens(), memory=model.init_memory(2)[:1])


def test_blocked_local_attention_equals_unblocked():
    """Long segments run query blocks under jax.checkpoint; the result and gradients are unchanged."""
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    q, k, v = (jax.random.normal(kk, (2, 32, 3, 8)) for kk in keys)
    whole = attn.local_attention(q, k, v, rope_base=100.0, query_block=64)
    blocked = attn.local_attention(q, k, v, rope_base=100.0, query_block=8)
    np.testing.assert_allclose(blocked, whole, atol=1e-6, rtol=1e-6)
    g = lambda blk: jax.grad(lambda q: attn.local_attention(q, k, v, query_block=blk).sum())(q)  # noqa: E731
    np.testing.assert_allclose(g(8), g(64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["infini", "xl", "local"])
def test_scan_over_layers_equals_python_loop(attention):
    """scan_layers stacks the blocks' params and scans; with the same weights the logits and state agree."""
    loop, scanned = make(attention=attention, num_layers=3), make(attention=attention, num_layers=3,
                                                                  scan_layers=True)
    if attention == "infini":
        randomize_gates(loop)
    p_loop = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
    blocks = [p_loop["blocks"][i] for i in range(3)]
    p_scan = dict(p_loop, blocks=jax.tree.map(lambda *xs: jnp.stack(xs), *blocks))
    nnx.replace_by_pure_dict(state := nnx.state(scanned, nnx.Param), p_scan)
    nnx.update(scanned, state)
    axes = scanned.blocks.attn.wq_dhk.get_metadata()["axes"]
    assert axes == ("layers", "embed", "heads", "head_dim")
    toks = tokens()
    a, st_a = loop(toks[:, :16])
    b, st_b = scanned(toks[:, :16])
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)
    a2, _ = loop(toks[:, 16:], st_a, reset_b=jnp.array([True, False]))
    b2, _ = scanned(toks[:, 16:], st_b, reset_b=jnp.array([True, False]))
    np.testing.assert_allclose(b2, a2, atol=2e-5, rtol=1e-5)
    if attention == "infini":
        np.testing.assert_allclose(gate_values(scanned), gate_values(loop), atol=1e-7)
        np.testing.assert_allclose(st_b.M, jnp.stack([s.M for s in st_a]), atol=1e-4, rtol=1e-5)
