"""Infini-attention: the pure math (Munkhdalai, Faruqui, Gopal 2024, arXiv 2404.07143, v2 equations).

Everything here is a plain function of arrays; Flax modules only hold the parameters. Shapes:

    q : [B, N, H, d_key]   k : [B, N, G, d_key]   v : [B, N, G, d_value]   (one segment of N tokens)
    M : [B, G, d_key, d_value]     z : [B, G, d_key]    (compressive memory, always float32)
    gate_logit (β) : [H]

G = H is ordinary multi-head attention; G < H (G dividing H) is grouped-query attention: the memory is kept
once per key/value head and the R = H / G query heads of a group read the same memory (exactly what a
per-query-head memory of repeated keys/values would hold, without the copies).

Equations:
    σ(x)   = ELU(x) + 1
    A_dot  = softmax(Q Kᵀ / sqrt(d_key) + causal) V            (eq. 6, RoPE on this path only)
    A_mem  = σ(Q) M / (σ(Q) z)                                 (eq. 7)
    linear : M ← M + σ(K)ᵀ V                                   (eq. 8)
    delta  : M ← M + σ(K)ᵀ (V − σ(K) M / (σ(K) z))             (eq. 9)
    z      ← z + Σ_t σ(K_t)                                    (both rules)
    A      = sigmoid(β) A_mem + (1 − sigmoid(β)) A_dot         (eq. 10)

Decisions the paper leaves open (fixed here, tested in tests/test_attention.py):
  * Memory starts at zero (`init_memory`). A (batch row, head) whose z is all zeros is *empty*: it reads
    nothing, its output is exactly A_dot with no gate applied, and the delta update equals the linear one.
  * The only guard is max(denominator, 1e-6) in eq. 7/9. σ(·) > 0 and z ≥ 0, so the denominator is 0
    only for empty memory (where the numerator is 0 too) or when σ(q) underflows; the guard never touches
    a denominator of ordinary size.
  * M and z are accumulated in float32 whatever the activation dtype; local softmax runs in float32.
  * Retrieval happens before the update (read the memory of earlier segments, then write this one).
  * Every product that touches M, z or the delta read runs at `precision=HIGHEST` (MEMORY_PRECISION):
    on TPU the default rounds float32 operands to bfloat16 and on recent GPUs to TF32, which at 2^20
    tokens buries one passkey's contribution to the read. The local softmax path keeps the default.
  * Optional write scale c per (row, segment): the segment is written as if it had been seen c times
    (linear: exactly; delta: c × the delta write). Used for memory-mass augmentation in training; 1 = the paper.
    A real long haystack *interleaves* its repeats (segments 1..S, 1..S, ...), which for the delta rule leaves a
    different memory than c × one write per segment (each write corrects what the others left); with
    `mass_passes` P > 1 the leading run of scaled segments is written in P interleaved passes of c / P each
    (mass.interleaved_passes), which approaches the interleaved memory as P grows. A haystack of book prose does
    not repeat at all: with `mass_source="batch"` (linear rule) a scaled segment writes c × the mean write of
    every scaled segment in the batch (mass.batch_mass), varied prose, instead of c copies of itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from infini_jax.prefix import DENOM_EPS, MEMORY_PRECISION, memory_before_segments
from infini_jax.rope import apply_rope

RULES = ("linear", "delta")
MODES = ("scan", "parallel")
MASS_SOURCES = ("own", "batch")  # what a write-scaled segment writes: c copies of itself, or of the batch's mean


class MemoryState(NamedTuple):
    """Per-layer compressive memory. M: [B, H, d_key, d_value], z: [B, H, d_key], both float32."""

    M: jax.Array
    z: jax.Array


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
    """Infini-attention's static settings (hashable, so jit treats them as constants; the model's come from
    model.ModelConfig.infini_options). A bad rule or mode fails here, before anything is traced."""

    segment_len: int  # N: tokens per segment (the local attention span, the memory update interval)
    rule: str  # memory update: "linear" (eq. 8) or "delta" (eq. 9)
    mode: str = "scan"  # over segments: "scan" (sequential) or "parallel" (prefix sums; infini_attention_sequence)
    rope_base: Any = None  # RoPE on the local path: a base, or (base, *scaling) (rope.apply_rope); None: none
    remat: bool = True  # scan mode: jax.checkpoint on each segment (see infini_attention_sequence)
    mass_passes: int = 1  # delta rule with a write scale: passes over the leading scaled run (mass.py)
    mass_source: str = "own"  # with a write scale: "own" (c copies of the segment) or "batch" (mass.py)

    def __post_init__(self):
        _check_rule(self.rule)
        _check_mode(self.mode)
        if int(self.mass_passes) != self.mass_passes or self.mass_passes < 1:
            raise ValueError(f"mass_passes must be an integer >= 1, got {self.mass_passes}")
        if self.mass_source not in MASS_SOURCES:
            raise ValueError(f"unknown mass_source {self.mass_source!r}: use one of {MASS_SOURCES}")
        if self.mass_source == "batch" and (self.rule, self.mode) != ("linear", "scan"):
            raise ValueError(f"mass_source='batch' is built for the linear rule in scan mode, got rule={self.rule!r}, "
                             f"mode={self.mode!r}: use mass_source='own' or rule='linear', mode='scan'")


# ----------------------------------------------------------------------------------------------------
# Input checks: plain Python on static shapes, so they raise before anything is traced or computed.
# ----------------------------------------------------------------------------------------------------


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown memory update rule {rule!r}: use one of {RULES}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, length, heads, dim], got shape {jnp.shape(x)}"
            )
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"q and k must have the same shape [B, N, ., d_key]: q {q.shape}, k {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} heads, not a multiple of k's {k.shape[2]} key/value heads "
                         f"(grouped-query attention needs G dividing H): q {q.shape}, k {k.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must match k in [batch, length, heads]: k {k.shape}, v {v.shape}"
        )


def _check_memory(memory: MemoryState, batch: int, heads: int, d_key: int, d_value: int) -> None:
    want_m, want_z = (batch, heads, d_key, d_value), (batch, heads, d_key)
    if tuple(memory.M.shape) != want_m or tuple(memory.z.shape) != want_z:
        raise ValueError(
            f"memory shape mismatch: expected M {want_m} and z {want_z} "
            f"(from q/k/v), got M {tuple(memory.M.shape)} and z {tuple(memory.z.shape)}"
        )


def _check_gate(gate_logit, heads: int) -> None:
    if tuple(jnp.shape(gate_logit)) != (heads,):
        raise ValueError(f"gate_logit must have shape [heads] = ({heads},), got {jnp.shape(gate_logit)}")


def _check_segments(length: int, segment_len: int) -> int:
    if segment_len <= 0:
        raise ValueError(f"segment_len must be positive, got {segment_len}")
    if length % segment_len:
        raise ValueError(
            f"sequence length {length} is not a multiple of segment_len {segment_len}: "
            f"pad or trim the input to n_segments * segment_len"
        )
    return length // segment_len


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def sigma(x: jax.Array) -> jax.Array:
    """The feature map σ(x) = ELU(x) + 1 in float32: x + 1 for x > 0, exp(x) otherwise (always > 0).

    Written out rather than `elu(x) + 1`: that computes expm1(x) + 1, which is 6% off at x = -16 and exactly 0
    below -17.4, while exp(x) stays exact down to float32's smallest normal numbers."""
    x = x.astype(jnp.float32)
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.where(x > 0, 0.0, x)))  # inner where: no inf in the unused branch


def init_memory(batch: int, num_heads: int, d_key: int, d_value: int) -> MemoryState:
    """An empty memory: zeros, float32 regardless of the compute dtype."""
    return MemoryState(
        M=jnp.zeros((batch, num_heads, d_key, d_value), jnp.float32),
        z=jnp.zeros((batch, num_heads, d_key), jnp.float32),
    )


def is_empty(memory: MemoryState) -> jax.Array:
    """[B, H] bool: True where nothing has been written yet (z all zeros)."""
    return jnp.all(memory.z == 0, axis=-1)


def reset_memory(memory: MemoryState, reset_b: jax.Array) -> MemoryState:
    """Clears the memory of the batch rows where reset_b [B] is True (start of a new document)."""
    reset_b = reset_b.astype(bool)  # `where`, not a multiply by 0: inf * 0 would leave NaN behind
    return MemoryState(
        M=jnp.where(reset_b[:, None, None, None], jnp.zeros((), memory.M.dtype), memory.M),
        z=jnp.where(reset_b[:, None, None], jnp.zeros((), memory.z.dtype), memory.z),
    )


def _softmax_attention(q_bnhk, k_bmhk, v_bmhv, mask_bnm) -> jax.Array:
    """softmax(q kᵀ / sqrt(d_key) + mask) v in float32. mask_bnm broadcastable to [B, N, M], True = attend."""
    d_key = q_bnhk.shape[-1]
    # [B, N, H, K] x [B, M, H, K] -> [B, H, N, M]
    logits_bhnm = jnp.einsum(
        "bnhk,bmhk->bhnm", q_bnhk, k_bmhk, preferred_element_type=jnp.float32
    ) / math.sqrt(d_key)
    logits_bhnm = jnp.where(mask_bnm[:, None], logits_bhnm, -1e30)
    probs_bhnm = jax.nn.softmax(logits_bhnm, axis=-1)
    # [B, H, N, M] x [B, M, H, V] -> [B, N, H, V]
    return jnp.einsum("bhnm,bmhv->bnhv", probs_bhnm, v_bmhv.astype(jnp.float32))


QUERY_BLOCK = 512  # local attention handles queries this many at a time when the segment is longer


def local_attention(q_bnhk, k_bnhk, v_bnhv, *, rope_base: Optional[float] = None,
                    query_block: int = QUERY_BLOCK) -> jax.Array:
    """Causal softmax attention inside one segment (eq. 6), float32 output [B, N, H, d_value].

    Segments longer than `query_block` (the paper's are 2048) are processed one block of queries at a time
    under `jax.checkpoint`, so the [B, H, N, N] scores never exist whole: at most [B, H, query_block, N].
    """
    n, h = q_bnhk.shape[1], q_bnhk.shape[2]
    k_bnhk, v_bnhv = repeat_heads(k_bnhk, h), repeat_heads(v_bnhv, h)  # grouped-query: K/V per query head
    if rope_base is not None:
        pos_n = jnp.arange(n)
        q_bnhk, k_bnhk = apply_rope(q_bnhk, pos_n, rope_base), apply_rope(k_bnhk, pos_n, rope_base)
    if n <= query_block or n % query_block:
        causal_1nn = jnp.tril(jnp.ones((n, n), bool))[None]
        return _softmax_attention(q_bnhk, k_bnhk, v_bnhv, causal_1nn)
    b, _, h, d_key = q_bnhk.shape
    n_blocks = n // query_block
    # [B, N, H, K] -> [n_blocks, B, query_block, H, K]
    q_xbqhk = q_bnhk.reshape(b, n_blocks, query_block, h, d_key).swapaxes(0, 1)

    @jax.checkpoint
    def one_block(args):
        i, q_bqhk = args
        pos_q = i * query_block + jnp.arange(query_block)
        mask_1qn = (pos_q[:, None] >= jnp.arange(n)[None, :])[None]
        return _softmax_attention(q_bqhk, k_bnhk, v_bnhv, mask_1qn)

    out_xbqhv = jax.lax.map(one_block, (jnp.arange(n_blocks), q_xbqhk))
    return out_xbqhv.swapaxes(0, 1).reshape(b, n, h, -1)


def repeat_heads(x_bngd: jax.Array, heads: int) -> jax.Array:
    """[..., G, D] -> [..., H, D]: each key/value head repeated for the H / G query heads of its group."""
    g = x_bngd.shape[-2]
    return x_bngd if g == heads else jnp.repeat(x_bngd, heads // g, axis=-2)


def _read(M_bgkv, z_bgk, sq_bnhk) -> jax.Array:
    """σ(q) M / max(σ(q) z, eps) for already-featurised queries; float32 [B, N, H, d_value].

    The H query heads read the G memories in groups of R = H / G."""
    b, n, h, d_key = sq_bnhk.shape
    g = M_bgkv.shape[1]
    sq_bngrk = sq_bnhk.reshape(b, n, g, h // g, d_key)
    # [B,N,G,R,K] x [B,G,K,V] -> [B,N,G,R,V]
    num_bngrv = jnp.einsum("bngrk,bgkv->bngrv", sq_bngrk, M_bgkv, precision=MEMORY_PRECISION)
    # [B,N,G,R,K] x [B,G,K] -> [B,N,G,R]
    den_bngr = jnp.einsum("bngrk,bgk->bngr", sq_bngrk, z_bgk, precision=MEMORY_PRECISION)
    out_bngrv = num_bngrv / jnp.maximum(den_bngr, DENOM_EPS)[..., None]
    return out_bngrv.reshape(b, n, h, -1)


def retrieve(memory: MemoryState, q_bnhk: jax.Array) -> jax.Array:
    """Memory read, eq. 7: σ(Q) M / (σ(Q) z). Float32 [B, N, H, d_value]; exactly 0 for empty memory."""
    if jnp.ndim(q_bnhk) != 4:
        raise ValueError(f"q must have rank 4 [batch, length, heads, d_key], got shape {jnp.shape(q_bnhk)}")
    b, _, h, d_key = q_bnhk.shape
    g = memory.M.shape[1] if jnp.ndim(memory.M) == 4 else 0
    if g == 0 or h % g:
        raise ValueError(f"memory shape mismatch: M {tuple(memory.M.shape)} must be [B, G, d_key, d_value] "
                         f"with G key/value heads dividing q's {h} heads")
    _check_memory(memory, b, g, d_key, memory.M.shape[-1])
    return _read(memory.M, memory.z, sigma(q_bnhk))


def update(memory: MemoryState, k_bnhk: jax.Array, v_bnhv: jax.Array, rule: str,
           write_scale_b: Optional[jax.Array] = None) -> MemoryState:
    """Memory write: eq. 8 ("linear") or eq. 9 ("delta"); z ← z + Σ_t σ(K_t). Float32 throughout.

    write_scale_b [B] (optional, default 1): both writes of a row are multiplied by it (see the module doc)."""
    _check_rule(rule)
    _check_qkv(k_bnhk, k_bnhk, v_bnhv)
    b, _, h, d_key = k_bnhk.shape
    _check_memory(memory, b, h, d_key, v_bnhv.shape[-1])
    sk_bnhk = sigma(k_bnhk)
    v_bnhv = v_bnhv.astype(jnp.float32)
    if rule == "delta":  # write only what the memory does not already return for these keys
        v_bnhv = v_bnhv - _read(memory.M, memory.z, sk_bnhk)
    # [B, N, H, K] x [B, N, H, V] -> [B, H, K, V]
    dM_bhkv = jnp.einsum("bnhk,bnhv->bhkv", sk_bnhk, v_bnhv, precision=MEMORY_PRECISION)
    dz_bhk = jnp.sum(sk_bnhk, axis=1)  # [B, N, H, K] -> [B, H, K]
    if write_scale_b is not None:
        c_b = write_scale_b.astype(jnp.float32)
        dM_bhkv, dz_bhk = dM_bhkv * c_b[:, None, None, None], dz_bhk * c_b[:, None, None]
    return MemoryState(memory.M + dM_bhkv, memory.z + dz_bhk)


def _gate(a_mem_bnhv, a_dot_bnhv, gate_logit_h, empty_bg) -> jax.Array:
    """Eq. 10, with empty memory reading nothing: those (row, head) pairs get A_dot exactly.
    empty_bg: [B, G] per memory; query heads inherit their group's."""
    empty_bh = repeat_heads(empty_bg[..., None], gate_logit_h.shape[0])[..., 0]
    g_h = jax.nn.sigmoid(gate_logit_h.astype(jnp.float32))[None, None, :, None]  # [1, 1, H, 1]
    mixed_bnhv = g_h * a_mem_bnhv + (1.0 - g_h) * a_dot_bnhv
    return jnp.where(empty_bh[:, None, :, None], a_dot_bnhv, mixed_bnhv)


# ----------------------------------------------------------------------------------------------------
# One segment, and a sequence of segments
# ----------------------------------------------------------------------------------------------------


def infini_attention(q_bnhk, k_bnhk, v_bnhv, memory: MemoryState, gate_logit_h, opts: SequenceOptions,
                     write_scale_b: Optional[jax.Array] = None) -> tuple[jax.Array, MemoryState]:
    """One segment of Infini-attention: local causal attention, memory read, gate, then memory write.

    opts.rule: eq. 8 or 9. opts.rope_base: when given, RoPE (positions 0..N-1 within the segment) rotates q/k
    of the local path only; the memory path always sees the unrotated q/k, as in the paper.
    write_scale_b [B]: optional write scale (see `update`).
    Returns (out [B, N, H, d_value] in q's dtype, new MemoryState).
    """
    _check_qkv(q_bnhk, k_bnhk, v_bnhv)
    b, _, h, d_key = q_bnhk.shape
    _check_memory(memory, b, k_bnhk.shape[2], d_key, v_bnhv.shape[-1])
    _check_gate(gate_logit_h, h)
    a_dot_bnhv = local_attention(q_bnhk, k_bnhk, v_bnhv, rope_base=opts.rope_base)
    a_mem_bnhv = _read(memory.M, memory.z, sigma(q_bnhk))
    out_bnhv = _gate(a_mem_bnhv, a_dot_bnhv, gate_logit_h, is_empty(memory))
    return out_bnhv.astype(q_bnhk.dtype), update(memory, k_bnhk, v_bnhv, opts.rule, write_scale_b)


def _to_segments(x_blhd: jax.Array, n_seg: int) -> jax.Array:
    """[B, S*N, H, D] -> [B, S, N, H, D]."""
    b, l, h, d = x_blhd.shape
    return x_blhd.reshape(b, n_seg, l // n_seg, h, d)


def infini_attention_sequence(q_blhk, k_blhk, v_blhv, gate_logit_h, opts: SequenceOptions,
                              memory: Optional[MemoryState] = None,
                              write_scale_bs: Optional[jax.Array] = None) -> tuple[jax.Array, MemoryState]:
    """Infini-attention over L = S × opts.segment_len tokens, carrying the memory from `memory` (default empty).

    opts.remat (scan mode): `jax.checkpoint` on the segment body, so the backward pass keeps one segment's
    activations at a time and recomputes the rest (bounded memory at long inputs; costs one extra forward of
    the layer's attention). False keeps them all (faster for small inputs).

    write_scale_bs [B, S]: optional per-(row, segment) write scale (memory-mass augmentation; see `update`).

    opts.mode="scan": `jax.lax.scan` over segments with `jax.checkpoint` on the body, so activation memory is
        bounded by one segment (plus the carried memory per segment for the backward pass).
    opts.mode="parallel": no sequential loop. Linear rule: memories are exclusive prefix sums over segments.
        Delta rule: the update is the affine map M ↦ A_s M + B_s with A_s = I − σ(K_s)ᵀ D_s σ(K_s),
        D_s = diag(1 / σ(K_s) z_{s-1}) (z does not depend on M, so D_s is known up front) and
        B_s = σ(K_s)ᵀ V_s; the prefix compositions come from `jax.lax.associative_scan` (prefix.py).
    The two modes agree to float32 round-off.
    """
    n_seg = check_sequence(q_blhk, k_blhk, v_blhv, gate_logit_h, opts)
    memory, scale_bs = sequence_start(memory, write_scale_bs, k_blhk, v_blhv, n_seg)
    if scale_bs is not None and opts.rule == "delta" and opts.mass_passes > 1:
        from infini_jax.mass import interleaved_passes  # built on this module's update: imported when used

        memory, scale_bs = interleaved_passes(memory, k_blhk, v_blhv, scale_bs, opts.mass_passes)
    if scale_bs is not None and opts.mass_source == "batch":  # scan mode (SequenceOptions checks)
        from infini_jax.mass import batch_mass

        own_bs, mean_bs, mean_write = batch_mass(k_blhk, v_blhv, scale_bs)
        return _sequence_scan((q_blhk, k_blhk, v_blhv), gate_logit_h, memory, opts, own_bs, mean_bs, mean_write)
    run = _sequence_scan if opts.mode == "scan" else _sequence_parallel
    return run((q_blhk, k_blhk, v_blhv), gate_logit_h, memory, opts, scale_bs)


def check_sequence(q_blhk, k_blhk, v_blhv, gate_logit_h, opts: SequenceOptions) -> int:
    """The shape checks of `infini_attention_sequence`, plain Python before anything is traced: the number of
    segments."""
    _check_qkv(q_blhk, k_blhk, v_blhv)
    n_seg = _check_segments(q_blhk.shape[1], opts.segment_len)
    _check_gate(gate_logit_h, q_blhk.shape[2])
    return n_seg


def sequence_start(memory: Optional[MemoryState], write_scale_bs, k_blgk, v_blgv, n_seg: int):
    """(the incoming memory in float32 (empty if None), write scale [B, S] float32 or None), both checked
    against the keys/values of `infini_attention_sequence`."""
    b, _, g, d_key = k_blgk.shape
    d_value = v_blgv.shape[-1]
    if memory is None:
        memory = init_memory(b, g, d_key, d_value)
    _check_memory(memory, b, g, d_key, d_value)
    memory = MemoryState(memory.M.astype(jnp.float32), memory.z.astype(jnp.float32))
    scale_bs = None  # no scale: nothing is multiplied in the segment loop
    if write_scale_bs is not None:
        scale_bs = jnp.asarray(write_scale_bs, jnp.float32)
        if scale_bs.shape != (b, n_seg):
            raise ValueError(f"write_scale must have shape [batch, segments] = {(b, n_seg)}, got {scale_bs.shape}")
    return memory, scale_bs


def _sequence_scan(qkv, gate_logit_h, memory: MemoryState, opts: SequenceOptions, scale_bs, mean_scale_bs=None,
                   mean_write=None):
    """mean_scale_bs, mean_write: mass.batch_mass's; each segment then also writes mean_scale × mean_write."""
    b, l, h, _ = qkv[0].shape
    n_seg = l // opts.segment_len
    # [B, S, N, H, D] -> [S, B, N, H, D]: scan runs over the leading axis.
    xs = tuple(jnp.swapaxes(_to_segments(x, n_seg), 0, 1) for x in qkv)

    def body(carry: MemoryState, seg):
        q_bnhk, k_bnhk, v_bnhv, scale_b, mean_b = seg
        out_bnhv, new = infini_attention(q_bnhk, k_bnhk, v_bnhv, carry, gate_logit_h, opts, write_scale_b=scale_b)
        if mean_b is not None:
            new = MemoryState(new.M + mean_b[:, None, None, None] * mean_write[0][None],
                              new.z + mean_b[:, None, None] * mean_write[1][None])
        return new, out_bnhv

    scale_sb = None if scale_bs is None else scale_bs.T  # None: an empty pytree, so the body gets None
    mean_sb = None if mean_scale_bs is None else mean_scale_bs.T
    final, out_sbnhv = jax.lax.scan(jax.checkpoint(body) if opts.remat else body, memory, xs + (scale_sb, mean_sb))
    return jnp.swapaxes(out_sbnhv, 0, 1).reshape(b, l, h, -1), final


def _sequence_parallel(qkv, gate_logit_h, memory: MemoryState, opts: SequenceOptions, scale_bs):
    b, l, h, _ = qkv[0].shape
    n_seg = l // opts.segment_len
    q_bsnhk, k_bsnhk, v_bsnhv = (_to_segments(x, n_seg) for x in qkv)
    sq_bsnhk, sk_bsnhk = sigma(q_bsnhk), sigma(k_bsnhk)
    c_bs = jnp.ones((b, n_seg), jnp.float32) if scale_bs is None else scale_bs
    # the memory each segment reads (M_{s-1}, z_{s-1}) and the memory after the last segment
    m_prev_bshkv, z_prev_bshk, final = memory_before_segments(memory.M, memory.z, sk_bsnhk,
                                                               v_bsnhv.astype(jnp.float32), c_bs, opts.rule)

    # Segments folded into the batch: [B, S, ...] -> [B*S, ...]; the memory (G heads) before each segment
    fold = lambda x: x.reshape((b * n_seg,) + x.shape[2:])  # noqa: E731
    a_mem = _read(fold(m_prev_bshkv), fold(z_prev_bshk), fold(sq_bsnhk))  # memory read of every segment
    a_dot = local_attention(fold(q_bsnhk), fold(k_bsnhk), fold(v_bsnhv), rope_base=opts.rope_base)
    empty = jnp.all(fold(z_prev_bshk) == 0, axis=-1)  # [B*S, G]
    out = _gate(a_mem, a_dot, gate_logit_h, empty)
    out_blhv = out.reshape(b, l, h, -1).astype(qkv[0].dtype)
    return out_blhv, MemoryState(*final)
