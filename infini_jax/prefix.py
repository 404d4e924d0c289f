"""The memory updates of a whole sequence as prefix sums and affine maps, for the parallel mode of
attention.infini_attention_sequence and for context parallelism (context.py).

Over segments s = 1..S with write scale c_s (1 in the paper):
    z_s = z_0 + Σ_{r≤s} c_r Σ_t σ(K_{r,t})                            (exclusive prefix: what segment s reads)
    linear (eq. 8):  M_s = M_0 + Σ_{r≤s} B_r,   B_r = c_r σ(K_r)ᵀ V_r
    delta  (eq. 9):  M_s = A_s M_{s-1} + B_s,   A_s = I − c_s σ(K_s)ᵀ D_s σ(K_s),  D_s = diag(1 / σ(K_s) z_{s-1})
z does not depend on M, so every D_s is known up front and the delta rule's M_s are compositions of affine
maps (`compose`), which jax.lax.associative_scan evaluates in O(log S) depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DENOM_EPS = 1e-6
MEMORY_PRECISION = jax.lax.Precision.HIGHEST  # every einsum touching M, z or the delta read (attention.py)


def exclusive_cumsum(x_bs, axis: int = 1):
    """Sum of the elements strictly before each position along `axis` (segment s sees segments < s)."""
    inclusive = jnp.cumsum(x_bs, axis=axis)
    return inclusive - x_bs, inclusive


def compose(earlier, later):
    """(A2, B2) ∘ (A1, B1) = (A2 A1, A2 B1 + B2): the affine map M ↦ A M + B of two consecutive spans."""
    a1, b1 = earlier
    a2, b2 = later
    hp = MEMORY_PRECISION  # [.., K, J] x [.., J, X] -> [.., K, X]
    return jnp.matmul(a2, a1, precision=hp), jnp.matmul(a2, b1, precision=hp) + b2


def segment_writes(sk_bsnhk, v32_bsnhv, c_bs):
    """Per segment, what eq. 8 adds: Δz_s = c_s Σ_t σ(K_t) [B, S, H, K], B_s = c_s σ(K_s)ᵀ V_s [B, S, H, K, V]."""
    dz_bshk = jnp.sum(sk_bsnhk, axis=2) * c_bs[:, :, None, None]  # [B, S, N, H, K] -> [B, S, H, K]
    # [B,S,N,H,K] x [B,S,N,H,V] -> [B,S,H,K,V]
    write_bshkv = jnp.einsum("bsnhk,bsnhv->bshkv", sk_bsnhk, v32_bsnhv, precision=MEMORY_PRECISION) \
        * c_bs[:, :, None, None, None]
    return dz_bshk, write_bshkv


def delta_transitions(sk_bsnhk, z_prev_bshk, c_bs):
    """Eq. 9 as the affine map M ↦ A_s M + B_s (B_s from `segment_writes`): A_s = I − c_s σ(K_s)ᵀ D_s σ(K_s),
    D_s = diag(1 / max(σ(K_t) z_{s-1}, eps)), and A_s = I where z_{s-1} is empty. [B, S, H, K, K]."""
    hp, d_key = MEMORY_PRECISION, sk_bsnhk.shape[-1]
    # [B,S,N,H,K] x [B,S,H,K] -> [B,S,N,H]
    den_bsnh = jnp.einsum("bsnhk,bshk->bsnh", sk_bsnhk, z_prev_bshk, precision=hp)
    empty_bsh = jnp.all(z_prev_bshk == 0, axis=-1)
    inv_bsnh = jnp.where(empty_bsh[:, :, None], 0.0, 1.0 / jnp.maximum(den_bsnh, DENOM_EPS))
    inv_bsnh = inv_bsnh * c_bs[:, :, None, None]
    eye_kj = jnp.eye(d_key, dtype=jnp.float32)
    # [B,S,N,H,K] x [B,S,N,H] x [B,S,N,H,J] -> [B,S,H,K,J]
    return eye_kj - jnp.einsum("bsnhk,bsnh,bsnhj->bshkj", sk_bsnhk, inv_bsnh, sk_bsnhk, precision=hp)


def memory_before_segments(m0_bhkv, z0_bhk, sk_bsnhk, v32_bsnhv, c_bs, rule: str):
    """From M_0, z_0: the memory each segment reads, (M_{s-1} [B, S, H, K, V], z_{s-1} [B, S, H, K]), and the
    memory after the last segment, (M_S, z_S) (the formulas above; the delta rule by associative_scan)."""
    dz_bshk, write_bshkv = segment_writes(sk_bsnhk, v32_bsnhv, c_bs)
    zx_bshk, zi_bshk = exclusive_cumsum(dz_bshk)
    z_prev_bshk = z0_bhk[:, None] + zx_bshk
    if rule == "linear":
        mx_bshkv, mi_bshkv = exclusive_cumsum(write_bshkv)
        m_prev_bshkv = m0_bhkv[:, None] + mx_bshkv
        m_final_bhkv = m0_bhkv + mi_bshkv[:, -1]
    else:
        a_bshkj = delta_transitions(sk_bsnhk, z_prev_bshk, c_bs)
        pa_bshkj, pb_bshkv = jax.lax.associative_scan(compose, (a_bshkj, write_bshkv), axis=1)
        # M_s = P_A(s) M_0 + P_B(s); [B,S,H,K,J] x [B,H,J,V] -> [B,S,H,K,V]
        mi_bshkv = jnp.einsum("bshkj,bhjv->bshkv", pa_bshkj, m0_bhkv, precision=MEMORY_PRECISION) + pb_bshkv
        m_prev_bshkv = jnp.concatenate([m0_bhkv[:, None], mi_bshkv[:, :-1]], axis=1)
        m_final_bhkv = mi_bshkv[:, -1]
    return m_prev_bshkv, z_prev_bshk, (m_final_bhkv, z0_bhk + zi_bshk[:, -1])
