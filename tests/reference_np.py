"""Independent NumPy float64 reference for Infini-attention (arXiv 2404.07143 v2, eqs. 6-10).

Written from the paper's equations and the project decisions, NOT from infini_jax/attention.py.
Everything is done per (batch row, head) with plain 2-D matrix algebra so that each line can be
checked against the paper by eye:

    eq. 6   A_dot = softmax(Q K^T / sqrt(d_key) + causal mask) V          (RoPE on this path only)
    eq. 7   A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})                   sigma(x) = ELU(x) + 1
    eq. 8   M_s = M_{s-1} + sigma(K)^T V
    eq. 9   M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))
            z_s = z_{s-1} + sum_t sigma(K_t)                                 (both rules)
    eq. 10  A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot       (one beta per head)

Project decisions encoded here:
  * a (row, head) whose z is all zeros is "empty": it retrieves exactly 0, its segment output is
    exactly A_dot (no gate), and its delta update equals the linear one;
  * the retrieval denominators are guarded by max(denominator, 1e-6);
  * retrieval happens with the memory from BEFORE the segment, then the memory is updated.

Shapes: q, k [B, N, H, d_key]; v [B, N, H, d_value]; M [B, H, d_key, d_value]; z [B, H, d_key];
beta [H]. All computation is float64.
"""

from __future__ import annotations

import numpy as np

DENOM_EPS = 1e-6


def sigma(x_any: np.ndarray) -> np.ndarray:
    """ELU(x) + 1 elementwise: x + 1 for x > 0, exp(x) for x <= 0 (always > 0)."""
    x_any = np.asarray(x_any, np.float64)
    return np.where(x_any > 0, x_any + 1.0, np.exp(np.minimum(x_any, 0.0)))


def sigmoid(x_any: np.ndarray) -> np.ndarray:
    x_any = np.asarray(x_any, np.float64)
    return 1.0 / (1.0 + np.exp(-x_any))


def rope_2d(x_nd: np.ndarray, base: float) -> np.ndarray:
    """RoPE on one head's [N, d] matrix, positions 0..N-1, Llama rotate_half pairing.

    Pair i is (x[:, i], x[:, i + d/2]); it is rotated by the angle pos * base^(-2i/d):
        x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin
    (this is x * cos + rotate_half(x) * sin with rotate_half(x) = concat(-x2, x1)).
    """
    x_nd = np.asarray(x_nd, np.float64)
    n_tokens, d = x_nd.shape
    assert d % 2 == 0, "RoPE needs an even head dimension"
    half = d // 2
    inv_freq_h = float(base) ** (-2.0 * np.arange(half, dtype=np.float64) / d)  # [d/2]
    angle_nh = np.arange(n_tokens, dtype=np.float64)[:, None] * inv_freq_h[None, :]  # [N, d/2]
    cos_nh, sin_nh = np.cos(angle_nh), np.sin(angle_nh)
    x1_nh, x2_nh = x_nd[:, :half], x_nd[:, half:]
    out_nd = np.empty_like(x_nd)
    out_nd[:, :half] = x1_nh * cos_nh - x2_nh * sin_nh
    out_nd[:, half:] = x2_nh * cos_nh + x1_nh * sin_nh
    return out_nd


def is_empty(z_bhk: np.ndarray) -> np.ndarray:
    """[B, H] bool: True where the memory normaliser z is all zeros."""
    return np.all(np.asarray(z_bhk) == 0, axis=-1)


def _retrieve_2d(m_kv: np.ndarray, z_k: np.ndarray, sq_nk: np.ndarray, empty: bool) -> np.ndarray:
    """eq. 7 for one (row, head): sigma(Q) M / (sigma(Q) z), rows of sq_nk already sigma'd."""
    if empty:
        return np.zeros((sq_nk.shape[0], m_kv.shape[1]), np.float64)
    num_nv = sq_nk @ m_kv  # [N, dk] @ [dk, dv] -> [N, dv]
    den_n = np.maximum(sq_nk @ z_k, DENOM_EPS)  # [N, dk] @ [dk] -> [N]
    return num_nv / den_n[:, None]


def retrieve_ref(m_bhkv, z_bhk, q_bnhk) -> np.ndarray:
    """eq. 7 -> [B, N, H, d_value]."""
    m_bhkv = np.asarray(m_bhkv, np.float64)
    z_bhk = np.asarray(z_bhk, np.float64)
    q_bnhk = np.asarray(q_bnhk, np.float64)
    b_size, n_tokens, n_heads, _ = q_bnhk.shape
    empty_bh = is_empty(z_bhk)
    out = np.zeros((b_size, n_tokens, n_heads, m_bhkv.shape[-1]), np.float64)
    for b in range(b_size):
        for h in range(n_heads):
            sq_nk = sigma(q_bnhk[b, :, h, :])
            out[b, :, h, :] = _retrieve_2d(m_bhkv[b, h], z_bhk[b, h], sq_nk, empty_bh[b, h])
    return out


def update_ref(m_bhkv, z_bhk, k_bnhk, v_bnhv, rule: str):
    """eq. 8 ("linear") or eq. 9 ("delta"); z_s = z + sum_t sigma(K_t) for both. -> (M_s, z_s)."""
    if rule not in ("linear", "delta"):
        raise ValueError(f"unknown rule {rule!r}")
    m_bhkv = np.asarray(m_bhkv, np.float64)
    z_bhk = np.asarray(z_bhk, np.float64)
    k_bnhk = np.asarray(k_bnhk, np.float64)
    v_bnhv = np.asarray(v_bnhv, np.float64)
    b_size, _, n_heads, _ = k_bnhk.shape
    empty_bh = is_empty(z_bhk)
    m_new = m_bhkv.copy()
    z_new = z_bhk.copy()
    for b in range(b_size):
        for h in range(n_heads):
            sk_nk = sigma(k_bnhk[b, :, h, :])  # sigma(K): [N, dk]
            v_nv = v_bnhv[b, :, h, :]  # V: [N, dv]
            if rule == "linear":
                write_nv = v_nv
            else:  # delta: subtract what the memory already returns for these keys (uses M_{s-1}, z_{s-1})
                write_nv = v_nv - _retrieve_2d(m_bhkv[b, h], z_bhk[b, h], sk_nk, empty_bh[b, h])
            m_new[b, h] = m_bhkv[b, h] + sk_nk.T @ write_nv  # [dk, N] @ [N, dv]
            z_new[b, h] = z_bhk[b, h] + sk_nk.sum(axis=0)  # [dk]
    return m_new, z_new


def local_attention_ref(q_bnhk, k_bnhk, v_bnhv, rope_base=None) -> np.ndarray:
    """eq. 6: causal softmax attention inside the segment, scale 1/sqrt(d_key). -> [B, N, H, dv]."""
    q_bnhk = np.asarray(q_bnhk, np.float64)
    k_bnhk = np.asarray(k_bnhk, np.float64)
    v_bnhv = np.asarray(v_bnhv, np.float64)
    b_size, n_tokens, n_heads, d_key = q_bnhk.shape
    out = np.zeros((b_size, n_tokens, n_heads, v_bnhv.shape[-1]), np.float64)
    future_nn = np.triu(np.ones((n_tokens, n_tokens), bool), k=1)  # True where key j > query i
    for b in range(b_size):
        for h in range(n_heads):
            q_nk = q_bnhk[b, :, h, :]
            k_nk = k_bnhk[b, :, h, :]
            if rope_base is not None:
                q_nk, k_nk = rope_2d(q_nk, rope_base), rope_2d(k_nk, rope_base)
            scores_nn = (q_nk @ k_nk.T) / np.sqrt(d_key)
            scores_nn = np.where(future_nn, -np.inf, scores_nn)
            scores_nn = scores_nn - scores_nn.max(axis=1, keepdims=True)
            p_nn = np.exp(scores_nn)
            p_nn /= p_nn.sum(axis=1, keepdims=True)
            out[b, :, h, :] = p_nn @ v_bnhv[b, :, h, :]
    return out


def infini_attention_ref(q, k, v, m_bhkv, z_bhk, beta_h, rule: str, rope_base=None):
    """One segment: local (eq. 6) + retrieval from the OLD memory (eq. 7), gate (eq. 10), then update.

    Returns (out [B, N, H, dv], M_s, z_s).
    """
    a_dot = local_attention_ref(q, k, v, rope_base)
    a_mem = retrieve_ref(m_bhkv, z_bhk, q)
    g_h = sigmoid(beta_h)  # [H]
    mixed = g_h[None, None, :, None] * a_mem + (1.0 - g_h[None, None, :, None]) * a_dot
    empty_b1h1 = is_empty(z_bhk)[:, None, :, None]
    out = np.where(empty_b1h1, a_dot, mixed)
    m_new, z_new = update_ref(m_bhkv, z_bhk, k, v, rule)
    return out, m_new, z_new


def infini_attention_sequence_ref(q, k, v, beta_h, segment_len: int, rule: str,
                                  m_bhkv=None, z_bhk=None, rope_base=None):
    """Segments in order; M, z = 0 when not given. Returns (out [B, L, H, dv], M_final, z_final)."""
    q = np.asarray(q, np.float64)
    b_size, seq_len, n_heads, d_key = q.shape
    d_value = np.shape(v)[-1]
    assert seq_len % segment_len == 0
    if m_bhkv is None:
        m_bhkv = np.zeros((b_size, n_heads, d_key, d_value), np.float64)
        z_bhk = np.zeros((b_size, n_heads, d_key), np.float64)
    outs = []
    for start in range(0, seq_len, segment_len):
        sl = slice(start, start + segment_len)
        out, m_bhkv, z_bhk = infini_attention_ref(
            q[:, sl], np.asarray(k)[:, sl], np.asarray(v)[:, sl], m_bhkv, z_bhk, beta_h, rule, rope_base)
        outs.append(out)
    return np.concatenate(outs, axis=1), m_bhkv, z_bhk


def _self_check() -> None:
    """Tiny sanity checks of the reference itself (run by the tests)."""
    rng = np.random.default_rng(0)
    # sigma is ELU + 1: continuous at 0, positive, slope 1 for x > 0.
    xs = np.array([-30.0, -1.0, 0.0, 1e-9, 2.0])
    np.testing.assert_allclose(sigma(xs), [np.exp(-30.0), np.exp(-1.0), 1.0, 1.0 + 1e-9, 3.0])
    # rope pair form equals x*cos + rotate_half(x)*sin with duplicated cos/sin.
    x = rng.normal(size=(7, 6))
    base = 500.0
    inv = base ** (-np.arange(0, 6, 2) / 6.0)
    ang = np.arange(7)[:, None] * inv[None, :]
    cos, sin = np.concatenate([np.cos(ang)] * 2, 1), np.concatenate([np.sin(ang)] * 2, 1)
    rot_half = np.concatenate([-x[:, 3:], x[:, :3]], 1)
    np.testing.assert_allclose(rope_2d(x, base), x * cos + rot_half * sin, rtol=1e-12, atol=1e-12)
    # RoPE makes scores depend on relative position only.
    qv, kv = rng.normal(size=6), rng.normal(size=6)
    qm, km = np.tile(qv, (9, 1)), np.tile(kv, (9, 1))
    s = rope_2d(qm, base) @ rope_2d(km, base).T
    np.testing.assert_allclose(s[5, 2], s[8, 5], rtol=1e-10)
    # eq. 8 written as a sum of outer products.
    kk = rng.normal(size=(1, 5, 1, 3))
    vv = rng.normal(size=(1, 5, 1, 2))
    m0, z0 = np.zeros((1, 1, 3, 2)), np.zeros((1, 1, 3))
    m1, z1 = update_ref(m0, z0, kk, vv, "linear")
    outer = sum(np.outer(sigma(kk[0, t, 0]), vv[0, t, 0]) for t in range(5))
    np.testing.assert_allclose(m1[0, 0], outer, rtol=1e-12)
    np.testing.assert_allclose(z1[0, 0], sigma(kk[0, :, 0]).sum(0), rtol=1e-12)
    # delta from empty memory == linear.
    m1d, z1d = update_ref(m0, z0, kk, vv, "delta")
    np.testing.assert_array_equal(m1d, m1)
    np.testing.assert_array_equal(z1d, z1)
    # delta: writing the same (k, v) twice with a single key leaves M fixed after the first write
    # when that key is the only one stored (retrieval then returns exactly v).
    k1, v1 = kk[:, :1], vv[:, :1]
    m_a, z_a = update_ref(m0, z0, k1, v1, "delta")
    np.testing.assert_allclose(retrieve_ref(m_a, z_a, k1), v1, rtol=1e-12)
    m_b, _ = update_ref(m_a, z_a, k1, v1, "delta")
    np.testing.assert_allclose(m_b, m_a, rtol=1e-12, atol=1e-12)


if __name__ == "__main__":
    _self_check()
    print("reference self-check ok")
