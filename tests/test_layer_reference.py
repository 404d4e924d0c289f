"""One model attention layer (model.Attention) against independent references, through several segments:

* infini: the layer's own projections of x, then tests/reference_np.py (float64) with RoPE on the local path only;
* xl: Transformer-XL as Dai et al. define it, written here with absolute positions (query t of segment s attends
  keys max(0, (s−1)N) .. t), float64; and its gradients: the stop-gradient sits at the cached hidden states, so
  W_K and W_V learn from the cached half too while no gradient reaches the cached inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference_np as ref
from infini_jax.model import Attention, ModelConfig

D, H, HD, N, S, B = 16, 2, 8, 6, 4, 2
ROPE = 50.0


def layer(attention, rule="linear"):
    cfg = ModelConfig(vocab_size=11, d_model=D, num_layers=1, num_heads=H, head_dim=HD, d_ff=8, segment_len=N,
                      n_segments=S, attention=attention, rule=rule, rope_base=ROPE, init_std=0.3)
    m = Attention(cfg, rngs=nnx.Rngs(4))
    if attention == "infini":
        m.gate_logit[...] = jnp.array([-1.5, 2.0])
    return m


def weights(m):
    return [np.asarray(w[...], np.float64) for w in (m.wq_dhk, m.wk_dgk, m.wv_dgk, m.wo_hkd)]


def inputs(seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, S * N, D))


def run_in_two_calls(m, x, state):
    """Segment 0 in one call, segments 1.. in another, the state carried: the layer's streaming path."""
    reset = jnp.zeros((B,), bool)
    y1, state = m(x[:, :N], state, reset)
    y2, state = m(x[:, N:], state, reset)
    return np.concatenate([y1, y2], 1)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_infini_layer_matches_float64_reference(rule):
    m = layer("infini", rule)
    x = inputs()
    wq, wk, wv, wo = weights(m)
    x64 = np.asarray(x, np.float64)
    q, k, v = (np.einsum("bld,dhk->blhk", x64, w) for w in (wq, wk, wv))
    out, _, _ = ref.infini_attention_sequence_ref(q, k, v, np.asarray(m.gate_logit[...], np.float64), N, rule,
                                                  rope_base=ROPE)
    want = np.einsum("blhk,hkd->bld", out, wo)
    from infini_jax import attention as A
    from infini_jax import baselines
    from infini_jax.rope import apply_rope
    got = run_in_two_calls(m, x, A.init_memory(B, H, HD, HD))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def xl_reference(x64, wq, wk, wv, wo):
    """Absolute positions 0..L-1; RoPE at those positions; query t of segment s sees keys max(0,(s-1)N)..t."""
    b, l, _ = x64.shape
    q, k, v = (np.einsum("bld,dhk->blhk", x64, w) for w in (wq, wk, wv))
    out = np.zeros((b, l, H, HD))
    for bi in range(b):
        for h in range(H):
            qr, kr = ref.rope_2d(q[bi, :, h], ROPE), ref.rope_2d(k[bi, :, h], ROPE)
            for t in range(l):
                lo = max(0, (t // N - 1) * N)
                sc = kr[lo:t + 1] @ qr[t] / np.sqrt(HD)
                p = np.exp(sc - sc.max())
                out[bi, t, h] = (p / p.sum()) @ v[bi, lo:t + 1, h]
    return np.einsum("blhk,hkd->bld", out, wo)


def test_xl_layer_matches_float64_reference():
    m = layer("xl")
    x = inputs(1)
    from infini_jax import attention as A
    from infini_jax import baselines
    from infini_jax.rope import apply_rope
    got = run_in_two_calls(m, x, baselines.init_xl_cache(B, N, D))
    np.testing.assert_allclose(got, xl_reference(np.asarray(x, np.float64), *weights(m)), rtol=2e-4, atol=2e-5)


def test_xl_gradients_stop_at_the_cached_hidden_states():
    """Against a plain JAX XL whose cached half uses stop_gradient(x_prev) @ W: gradients w.r.t. W_Q, W_K,
    W_V, W_O and x must agree. Stopping at the projected K/V instead changes dW_K and dW_V."""
    m = layer("xl")
    x = inputs(2)
    from infini_jax import attention as A
    from infini_jax import baselines
    from infini_jax.rope import apply_rope

    graphdef, params = nnx.split(m)

    def model_loss(params, x):
        mm = nnx.merge(graphdef, params)
        y, _ = mm(x, baselines.init_xl_cache(B, N, D), jnp.zeros((B,), bool))
        return jnp.sum(jnp.sin(y))

    def plain_loss(w, x):
        wq, wk, wv, wo = w
        l = x.shape[1]
        pos = jnp.arange(l)
        seg = pos // N
        q = apply_rope(jnp.einsum("bld,dhk->blhk", x, wq), pos, ROPE)
        k_cur = apply_rope(jnp.einsum("bld,dhk->blhk", x, wk), pos, ROPE)
        k_sg = apply_rope(jnp.einsum("bld,dhk->blhk", jax.lax.stop_gradient(x), wk), pos, ROPE)
        v_cur = jnp.einsum("bld,dhk->blhk", x, wv)
        v_sg = jnp.einsum("bld,dhk->blhk", jax.lax.stop_gradient(x), wv)
        causal = pos[:, None] >= pos[None, :]
        same = causal & (seg[:, None] == seg[None, :])
        prev = seg[:, None] == seg[None, :] + 1
        s_cur = jnp.einsum("bthk,bjhk->bhtj", q, k_cur) / np.sqrt(HD)
        s_prev = jnp.einsum("bthk,bjhk->bhtj", q, k_sg) / np.sqrt(HD)
        scores = jnp.concatenate([jnp.where(same, s_cur, -1e30), jnp.where(prev, s_prev, -1e30)], -1)
        p = jax.nn.softmax(scores, -1)
        o = jnp.einsum("bhtj,bjhk->bthk", p[..., :l], v_cur) + jnp.einsum("bhtj,bjhk->bthk", p[..., l:], v_sg)
        return jnp.sum(jnp.sin(jnp.einsum("blhk,hkd->bld", o, wo)))

    w = (m.wq_dhk[...], m.wk_dgk[...], m.wv_dgk[...], m.wo_hkd[...])
    np.testing.assert_allclose(model_loss(params, x), plain_loss(w, x), rtol=1e-5)
    g_params, g_x = jax.grad(model_loss, argnums=(0, 1))(params, x)
    g_w, g_x_ref = jax.grad(plain_loss, argnums=(0, 1))(w, x)
    for name, want in zip(("wq_dhk", "wk_dgk", "wv_dgk", "wo_hkd"), g_w):
        np.testing.assert_allclose(g_params[name][...], want, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-5)
