"""Grouped-query attention: the memory is kept per key/value head and read by the query heads of its group.

The reference semantics is multi-head attention on K/V repeated for every query head (each query head then
holds a copy of its group's memory); the grouped computation must equal it without the copies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infini_jax import attention as A
from infini_jax import baselines
from infini_jax.model import InfiniTransformer, ModelConfig

B, L, H, G, K, V, N = 2, 24, 6, 2, 4, 5, 8


def _inputs(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, L, H, K))
    k = jax.random.normal(ks[1], (B, L, G, K))
    v = jax.random.normal(ks[2], (B, L, G, V))
    beta = jnp.linspace(-3.0, 3.0, H)  # gates far from 0.5, different per head
    return q, k, v, beta


@pytest.mark.parametrize("rule", A.RULES)
@pytest.mark.parametrize("mode", A.MODES)
def test_grouped_memory_equals_repeated_kv(rule, mode):
    q, k, v, beta = _inputs()
    opts = A.SequenceOptions(N, rule, mode, rope_base=100.0)
    out_g, st_g = A.infini_attention_sequence(q, k, v, beta, opts)
    k_rep, v_rep = A.repeat_heads(k, H), A.repeat_heads(v, H)
    out_r, st_r = A.infini_attention_sequence(q, k_rep, v_rep, beta, opts)
    assert st_g.M.shape == (B, G, K, V) and st_g.z.shape == (B, G, K)
    np.testing.assert_allclose(out_g, out_r, atol=1e-5, rtol=1e-5)
    # every query head of a group held the same memory: the group's
    np.testing.assert_allclose(A.repeat_heads(jnp.swapaxes(st_g.M, 1, 2), H).swapaxes(1, 2), st_r.M,
                               atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(A.retrieve(st_g, q[:, :N]), A.retrieve(st_r, q[:, :N]), atol=1e-5, rtol=1e-5)


def test_grouped_xl_and_local_equal_repeated_kv():
    q, k, v, _ = _inputs(1)
    k_rep, v_rep = A.repeat_heads(k, H), A.repeat_heads(v, H)
    kp, vp = jnp.roll(k, N, axis=1), jnp.roll(v, N, axis=1)  # any previous-segment keys/values will do
    valid = jnp.array([True, False])
    out_g = baselines.xl_attention_sequence(q, k, v, baselines.PrevKV(kp, vp, valid), segment_len=N, rope_base=100.0)
    out_r = baselines.xl_attention_sequence(q, k_rep, v_rep,
                                            baselines.PrevKV(A.repeat_heads(kp, H), A.repeat_heads(vp, H), valid),
                                            segment_len=N, rope_base=100.0)
    np.testing.assert_allclose(out_g, out_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(baselines.local_attention_sequence(q, k, v, segment_len=N),
                               baselines.local_attention_sequence(q, k_rep, v_rep, segment_len=N), atol=1e-6)


def test_heads_must_be_a_multiple_of_kv_heads():
    q, k, v, beta = _inputs()
    with pytest.raises(ValueError, match="multiple of k's"):
        A.infini_attention_sequence(q[:, :, :5], k, v, beta[:5], A.SequenceOptions(N, "linear"))


def test_gqa_model_keeps_one_memory_per_kv_head():
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      d_ff=64, segment_len=8, n_segments=2)
    model = InfiniTransformer(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 50)
    logits, state = model(toks)
    assert state[0].M.shape == (2, 2, 8, 8)  # [B, kv_heads, d_key, d_value]
    a, st = model(toks[:, :8])
    b, _ = model(toks[:, 8:], st)
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), logits, atol=2e-5, rtol=1e-5)
