"""The Infini-Transformer decoder-only LM (Flax NNX). Modules hold parameters; the math is in attention.py.

    tokens [B, L] → embed → num_layers × (RMSNorm → attention → +, RMSNorm → MLP → +) → RMSNorm → logits

`attention` selects the paper's model or one of its baselines, in the same code:
    "infini"  compressive memory per layer (attention.infini_attention_sequence)
    "xl"      Transformer-XL: attends to the cached keys/values of the previous segment
    "local"   segment-local causal attention only
    "full"    ordinary causal attention over the whole call (no memory carried between calls)

Streaming: `memory = model.init_memory(B)`; `logits, memory = model(tokens, memory, reset)` with tokens of
shape [B, n × segment_len]. One call over a sequence and several calls with the carried memory give the
same logits. `reset` [B] bool clears that row's memory first (start of a new document).

Every parameter carries `axes` metadata: one logical axis name per dimension (infini_jax/sharding.py maps
them to mesh axes). Grouped-query attention (num_kv_heads < num_heads): the memory is kept per key/value
head and read by the query heads of its group; each query head has its own gate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from infini_jax import attention as attn
from infini_jax import baselines
from infini_jax import context
from infini_jax.axes import active_axis, constrain

ATTENTIONS = ("infini", "xl", "local", "full")
MLPS = ("gated", "plain")
ACTIVATIONS = ("silu", "gelu")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """config.model: the model's shape. Each field's comment is its row in the README's config table."""

    vocab_size: int = 259  # embedding rows; must equal the tokenizer's vocabulary (259 for 'byte')
    d_model: int = 128  # residual stream width
    num_layers: int = 2  # decoder blocks
    num_heads: int = 4  # query heads per layer
    num_kv_heads: Optional[int] = None  # key/value heads (GQA); None: = num_heads, 1: multi-query
    head_dim: int = 32  # d_key = d_value per head
    d_ff: int = 512  # hidden width of the MLP
    segment_len: int = 64  # N: tokens per segment (local attention span, memory update interval)
    n_segments: int = 4  # segments per training input; seq_len = n_segments * segment_len
    attention: str = "infini"  # 'infini' (compressive memory) or a baseline: 'xl', 'local', 'full'
    rule: str = "linear"  # memory update rule: 'linear' or 'delta'
    mode: str = "scan"  # memory over segments: 'scan' (sequential) or 'parallel' (prefix sums, no loop)
    mlp: str = "gated"  # 'gated' (3 matrices, GLU) or 'plain' (2 matrices)
    activation: str = "silu"  # MLP activation: 'silu' or 'gelu'
    tie_embeddings: bool = True  # output projection = input embedding transposed
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (Gemma)
    rope_base: Optional[float] = 10000.0  # RoPE base on the local attention; None: no RoPE
    rope_scaling: tuple = ()  # Llama 3.1/3.2 RoPE scaling (factor, low_freq, high_freq, original_len); (): none
    gate_init: float = 0.0  # initial gate logit β: sigmoid(0) = 0.5 memory / 0.5 local
    norm_eps: float = 1e-6  # RMSNorm epsilon
    dtype: str = "float32"  # activation / compute dtype: 'float32' or 'bfloat16'
    param_dtype: str = "float32"  # parameter (and optimizer state) dtype
    remat: bool = True  # jax.checkpoint around each block
    remat_segments: bool = True  # jax.checkpoint around each segment of the infini scan (False: faster, more memory)
    mass_passes: int = 1  # delta rule + mass augmentation: the haystack before the key in P interleaved passes
    mass_source: str = "own"  # mass augmentation's scaled writes: 'own' (c copies) or 'batch' (c x the batch's mean)
    scan_layers: bool = False  # stack the blocks' params [layers, ...] and jax.lax.scan over them
    init_std: float = 0.02  # std of the normal initialisation of every matrix

    @property
    def seq_len(self) -> int:
        return self.n_segments * self.segment_len

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def rope(self):
        """RoPE as attention.apply_rope takes it: rope_base, or rope_base and rope_scaling in one tuple."""
        return (self.rope_base, *self.rope_scaling) if self.rope_scaling else self.rope_base

    @property
    def infini_options(self) -> attn.SequenceOptions:
        """The static settings of the layers' Infini-attention (attention.infini_attention_sequence)."""
        return attn.SequenceOptions(segment_len=self.segment_len, rule=self.rule, mode=self.mode,
                                    rope_base=self.rope, remat=self.remat_segments,
                                    mass_passes=self.mass_passes, mass_source=self.mass_source)

    def __post_init__(self):
        checks = [
            (self.attention in ATTENTIONS, f"unknown attention {self.attention!r}: use one of {ATTENTIONS}"),
            (self.rule in attn.RULES, f"unknown memory update rule {self.rule!r}: use one of {attn.RULES}"),
            (self.mode in attn.MODES, f"unknown mode {self.mode!r}: use one of {attn.MODES}"),
            (self.mass_source in attn.MASS_SOURCES,
             f"unknown model.mass_source {self.mass_source!r}: use one of {attn.MASS_SOURCES}"),
            (self.mass_source == "own" or (self.rule, self.mode) == ("linear", "scan"),
             f"model.mass_source='batch' needs rule='linear' and mode='scan', got {self.rule!r}, {self.mode!r}"),
            (self.mlp in MLPS, f"unknown mlp {self.mlp!r}: use one of {MLPS}"),
            (self.activation in ACTIVATIONS, f"unknown activation {self.activation!r}: use one of {ACTIVATIONS}"),
            (self.dtype in DTYPES, f"unknown dtype {self.dtype!r}: use one of {DTYPES}"),
            (self.param_dtype in DTYPES, f"unknown param_dtype {self.param_dtype!r}: use one of {DTYPES}"),
        ]
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "d_ff",
                     "segment_len", "n_segments", "mass_passes"):
            checks.append((int(getattr(self, name)) > 0, f"model.{name} must be positive, got {getattr(self, name)}"))
        checks.append((self.num_heads % self.kv_heads == 0,
                       f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.kv_heads}"))
        checks.append((self.rope_base is None or self.head_dim % 2 == 0,
                       f"RoPE needs an even head_dim, got {self.head_dim}"))
        object.__setattr__(self, "rope_scaling", tuple(float(x) for x in self.rope_scaling))  # JSON gives a list
        checks.append((not self.rope_scaling or (len(self.rope_scaling) == 4 and self.rope_base is not None),
                       f"model.rope_scaling {self.rope_scaling} must be () or (factor, low_freq_factor, "
                       "high_freq_factor, original_max_positions) with a rope_base"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @classmethod
    def from_dict(cls, d: Any) -> "ModelConfig":
        """From a dict or ConfigDict; unknown keys are an error that lists the valid ones."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


def dense(x, w, n_in: int = 1, **kw) -> jax.Array:
    """x [B, L, *in] · w [*in, *out] -> [B, L, *out], contracting x's last `n_in` axes with w's first `n_in`
    (ranks vary by caller, so the names carry no shape suffix).

    Written as one 2-D matmul [B·L, in] × [in, out] unless the length axis is sharded (context parallelism,
    where merging B and L would reshard). Measured on XLA:CPU: the 3-D einsum's weight gradient, which
    contracts over both B and L, made XLA emit transposing copies of every [B, L, F] activation gradient
    (~1/5 of the tiny config's step); with the 2-D form issue 8's train step went from 0.76× to 0.91× the
    PyTorch peer's speed (benchmarks/train_throughput.py). On TPU the reshape is free.
    """
    lead, ins, outs = x.shape[:2], x.shape[2:], w.shape[n_in:]
    if active_axis("length")[1] > 1:
        return jnp.tensordot(x, w, axes=n_in, **kw)  # [B,L,*in] x [*in,*out] -> [B,L,*out]
    size = math.prod(ins)
    y = jnp.matmul(x.reshape(-1, size), w.reshape(size, -1), **kw)  # [B·L, in] x [in, out] -> [B·L, out]
    return y.reshape(lead + outs)


def _param(rngs: nnx.Rngs, shape, axes, std, dtype) -> nnx.Param:
    init = jax.nn.initializers.normal(std) if std else jax.nn.initializers.ones
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), ("embed",), None, param_dtype)
        self.eps = eps

    def __call__(self, x_bld):
        x = x_bld.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(x_bld.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        pdt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.cfg = cfg
        self.wq_dhk = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, pdt)
        self.wk_dgk = _param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), std, pdt)
        self.wv_dgk = _param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), std, pdt)
        self.wo_hkd = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                             std / (2 * cfg.num_layers) ** 0.5, pdt)
        if cfg.attention == "infini":
            self.gate_logit = nnx.Param(jnp.full((h,), cfg.gate_init, jnp.float32), axes=("heads",))

    def __call__(self, x_bld, memory, reset_b, write_scale_bs=None):
        """(y [B, L, D], the layer's new memory: MemoryState (infini), XLCache (xl) or () (local, full))."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = x_bld.astype(dt)
        wk_dgk, wv_dgk = self.wk_dgk[...].astype(dt), self.wv_dgk[...].astype(dt)
        q_blhk = dense(x, self.wq_dhk[...].astype(dt))  # [B,L,D] x [D,H,K] -> [B,L,H,K]
        k_blgk = dense(x, wk_dgk)  # [B,L,D] x [D,G,K] -> [B,L,G,K]
        v_blgk = dense(x, wv_dgk)  # [B,L,D] x [D,G,K] -> [B,L,G,K]
        if cfg.attention == "infini":
            memory = attn.reset_memory(memory, reset_b)
            out_blhk, memory = context.infini_attention_sequence(  # split over the context axis if any
                q_blhk, k_blgk, v_blgk, self.gate_logit[...], cfg.infini_options, memory, write_scale_bs)
        elif cfg.attention == "xl":  # the cached half's K/V: current weights on stop-gradient previous inputs
            cache = baselines.reset_xl_cache(memory, reset_b)
            xp_bld = baselines.xl_previous_inputs(x, cache, cfg.segment_len)
            kp_blgk = dense(xp_bld, wk_dgk)  # [B,L,D] x [D,G,K] -> [B,L,G,K]
            vp_blgk = dense(xp_bld, wv_dgk)  # [B,L,D] x [D,G,K] -> [B,L,G,K]
            out_blhk = baselines.xl_attention_sequence(q_blhk, k_blgk, v_blgk,
                                                       baselines.PrevKV(kp_blgk, vp_blgk, cache.valid),
                                                       segment_len=cfg.segment_len, rope_base=cfg.rope)
            memory = baselines.XLCache(x=x[:, -cfg.segment_len:].astype(cache.x.dtype),
                                       valid=jnp.ones_like(cache.valid))
        elif cfg.attention == "local":
            out_blhk = baselines.local_attention_sequence(
                q_blhk, k_blgk, v_blgk, segment_len=cfg.segment_len, rope_base=cfg.rope)
        else:
            out_blhk = baselines.full_attention(q_blhk, k_blgk, v_blgk, rope_base=cfg.rope)
        y_bld = dense(out_blhk.astype(dt), self.wo_hkd[...].astype(dt), n_in=2)  # [B,L,H,K] x [H,K,D] -> [B,L,D]
        return y_bld, memory


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pdt, std = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype), cfg.init_std
        self.cfg = cfg
        if cfg.mlp == "gated":
            self.w_gate_df = _param(rngs, (d, f), ("embed", "mlp"), std, pdt)
        self.w_up_df = _param(rngs, (d, f), ("embed", "mlp"), std, pdt)
        self.w_down_fd = _param(rngs, (f, d), ("mlp", "embed"), std / (2 * cfg.num_layers) ** 0.5, pdt)

    def __call__(self, x_bld):
        dt = jnp.dtype(self.cfg.dtype)
        act = jax.nn.silu if self.cfg.activation == "silu" else jax.nn.gelu
        x = x_bld.astype(dt)
        h_blf = dense(x, self.w_up_df[...].astype(dt))  # [B,L,D] x [D,F] -> [B,L,F]
        if self.cfg.mlp == "gated":
            h_blf = act(dense(x, self.w_gate_df[...].astype(dt))) * h_blf  # [B,L,D] x [D,F] -> [B,L,F]
        else:
            h_blf = act(h_blf)
        return dense(h_blf, self.w_down_fd[...].astype(dt))  # [B,L,F] x [F,D] -> [B,L,D]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_bld, memory, reset_b, write_scale_bs=None):
        y_bld, memory = self.attn(self.attn_norm(x_bld), memory, reset_b, write_scale_bs)
        x_bld = x_bld + y_bld
        x_bld = x_bld + self.mlp(self.mlp_norm(x_bld))
        return x_bld, memory


def _block_forward(block: Block, x_bld, memory, reset_b, write_scale_bs=None):
    return block(x_bld, memory, reset_b, write_scale_bs)


def _memory_layers(memory, cfg: ModelConfig) -> int:
    """How many layers a memory holds: a tuple per layer, or (scan_layers) a leading axis on every leaf."""
    if not cfg.scan_layers:
        return len(memory)
    leaves = jax.tree.leaves(memory)
    return leaves[0].shape[0] if leaves else cfg.num_layers  # local/full: nothing to count


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """num_layers Blocks as one Block whose params have a leading [layers] axis (for scan over layers)."""
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(cfg, rngs=rngs)

    blocks = make(rngs)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Param):
            var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))
    return blocks


class InfiniTransformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed_vd = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt)
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, rngs=rngs)
        if not cfg.tie_embeddings:
            self.unembed_dv = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)

    def init_memory(self, batch: int) -> tuple:
        """The empty per-layer memory for `batch` rows: one MemoryState (infini, attention.init_memory) or
        XLCache (xl) per layer; () per layer for "local" and "full", which carry nothing between calls."""
        cfg = self.cfg
        if cfg.attention == "infini":
            make = lambda: attn.init_memory(batch, cfg.kv_heads, cfg.head_dim, cfg.head_dim)  # noqa: E731
        elif cfg.attention == "xl":
            make = functools.partial(baselines.init_xl_cache, batch, cfg.segment_len, cfg.d_model, jnp.dtype(cfg.dtype))
        else:
            make = lambda: ()  # noqa: E731
        layers = tuple(make() for _ in range(cfg.num_layers))
        if cfg.scan_layers:  # one pytree with a leading [layers] axis
            return jax.tree.map(lambda *xs: jnp.stack(xs), *layers) if layers[0] != () else ()
        return layers

    def hidden(self, tokens_bl, memory: Optional[tuple] = None, reset_b=None, write_scale_bs=None):
        """tokens [B, L] int → (final-normed hidden states [B, L, D], new per-layer memory).

        write_scale_bs [B, L / segment_len] (infini only, optional): memory-write scale per row and segment
        (memory-mass augmentation in training; attention.update). None = 1 everywhere, as in the paper."""
        cfg = self.cfg
        if jnp.ndim(tokens_bl) != 2:
            raise ValueError(f"tokens must have shape [batch, length], got {jnp.shape(tokens_bl)}")
        b, l = tokens_bl.shape
        if cfg.attention != "full" and l % cfg.segment_len:
            raise ValueError(
                f"input length {l} is not a multiple of segment_len {cfg.segment_len}: "
                "feed whole segments (pad the last one and mask its loss)")
        if memory is None:
            memory = self.init_memory(b)
        n_layers = _memory_layers(memory, cfg)
        if n_layers != cfg.num_layers:
            raise ValueError(f"memory has {n_layers} layers, the model has {cfg.num_layers}: "
                             "build it with model.init_memory(batch)")
        reset_b = jnp.zeros((b,), bool) if reset_b is None else jnp.asarray(reset_b, bool)
        if reset_b.shape != (b,):
            raise ValueError(f"reset must have shape [batch] = ({b},), got {reset_b.shape}")
        if write_scale_bs is not None and cfg.attention != "infini":
            write_scale_bs = None  # only a compressive memory has writes to scale
        dt = jnp.dtype(cfg.dtype)
        x_bld = jnp.take(self.embed_vd[...], tokens_bl, axis=0).astype(dt)
        if cfg.embed_scale:
            x_bld = x_bld * jnp.asarray(cfg.d_model ** 0.5, dt)
        forward = nnx.remat(_block_forward) if cfg.remat else _block_forward
        if cfg.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, 0, None, None), out_axes=(nnx.Carry, 0))
            def over_layers(block, x_bld, layer_memory, reset_b, write_scale_bs):
                return forward(block, constrain(x_bld, ACT_AXES), layer_memory, reset_b, write_scale_bs)

            x_bld, new_memory = over_layers(self.blocks, x_bld, memory, reset_b, write_scale_bs)
            return constrain(self.final_norm(x_bld), ACT_AXES), new_memory
        new_memory = []
        for block, layer_memory in zip(self.blocks, memory):
            x_bld = constrain(x_bld, ACT_AXES)
            x_bld, layer_memory = forward(block, x_bld, layer_memory, reset_b, write_scale_bs)
            new_memory.append(layer_memory)
        return constrain(self.final_norm(x_bld), ACT_AXES), tuple(new_memory)

    def output_embedding(self) -> jax.Array:
        """The unembedding matrix [D, V] (the transposed input embedding when tied)."""
        return self.embed_vd[...].T if self.cfg.tie_embeddings else self.unembed_dv[...]

    def __call__(self, tokens_bl, memory: Optional[tuple] = None, reset_b=None):
        """tokens [B, L] int → (logits [B, L, vocab] float32, new per-layer memory)."""
        x_bld, new_memory = self.hidden(tokens_bl, memory, reset_b)
        return logits_from_hidden(x_bld, self.output_embedding(), self.cfg.dtype), new_memory


ACT_AXES = ("batch", "length", "act_embed")


def logits_from_hidden(x_bld: jax.Array, w_dV: jax.Array, dtype: str) -> jax.Array:
    """[B, L, D] x [D, V] -> [B, L, V] logits, computed in `dtype` and accumulated in float32.

    A function of its own so that the loss can apply it chunk by chunk (train.py never builds the whole
    [B, L, V] logits of a long input).
    """
    dt = jnp.dtype(dtype)
    logits_blV = dense(x_bld.astype(dt), w_dV.astype(dt),  # [B,L,D] x [D,V] -> [B,L,V]
                       preferred_element_type=jnp.float32)
    return constrain(logits_blV, ("batch", "length", "vocab"))


GATE_PARAM = "gate_logit"  # Infini-attention's β, one per query head: [heads], or [layers, heads] stacked
KNOCKOUT_GATE_LOGIT = -1e9  # sigmoid(-1e9) == 0.0 exactly in float32: every head reads its local attention only


def key_path(path) -> str:
    """A jax.tree key path as 'blocks/0/attn/gate_logit' (the one key-path helper of the package)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def is_gate_path(path) -> bool:
    return key_path(path).rsplit("/", 1)[-1] == GATE_PARAM


def gate_values(params) -> Optional[jax.Array]:
    """sigmoid(β) [num_layers, num_heads] (the paper's Figure 3) from a params pure dict or a model
    (jittable), or None when the model has no Infini-attention gates. The one gate readout."""
    if isinstance(params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(params, nnx.Param))
    found = [(key_path(p), g) for p, g in jax.tree_util.tree_flatten_with_path(params)[0] if is_gate_path(p)]
    if not found:
        return None
    # stacked blocks hold one [layers, heads] leaf; a list of blocks one [heads] leaf per layer: layer order is
    # the number in the path (a restored checkpoint may key layers by strings, where "10" sorts before "2")
    order = lambda item: [int(k) if k.isdigit() else 0 for k in item[0].split("/")]  # noqa: E731
    gates = [g for _, g in sorted(found, key=order)]
    stacked = gates[0] if gates[0].ndim == 2 else jnp.stack(gates)
    return jax.nn.sigmoid(stacked.astype(jnp.float32))


def knockout_params(params):
    """The memory knock-out as a change of parameters: every gate logit β = -1e9, so sigmoid(β) = 0 exactly
    and each head outputs its local attention (equals attention='local'); a new tree, `params` untouched."""
    if gate_values(params) is None:
        raise ValueError("memory knock-out needs attention='infini' (the model has no gates)")
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, KNOCKOUT_GATE_LOGIT) if is_gate_path(p) else x, params)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
