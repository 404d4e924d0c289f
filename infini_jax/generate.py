"""Streaming generation with bounded memory: greedy or temperature / top-p sampling from a prompt of any length.

    prefill       the prompt's whole segments before the last go through the model's own segment forward,
                  `chunk_segments` at a time (memory only); the last 1 .. segment_len tokens fill the KV cache
                  of the decode cache (infini_jax/decode.py) and give the first token's logits
    decode_step   one jitted call per token: the token's keys/values join the cache, its logits come out,
                  and a full segment is written into the memory
    generate      prefill, then one compiled jax.lax.while_loop for all the new tokens (stops early once
                  every row has emitted eos)

Space is O(segment_len × (layers × kv heads × head_dim) + chunk + the memory) however long the prompt or the
output; each new token costs one token's forward against the cache. attention='full' carries no memory
between calls and cannot be streamed: it is rejected.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infini_jax import decode
from infini_jax.model import InfiniTransformer


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How `generate` picks each new token: argmax at temperature <= 0, else temperature / nucleus (top_p)
    sampling seeded by `seed`; a row that emits `eos_id` (None: none) keeps emitting it."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_id: Optional[int] = None

    def __post_init__(self):
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@functools.partial(jax.jit, static_argnums=0)
def _advance(graphdef, params, memory, tokens_bl):
    """The memory after whole segments (the logits are dropped; XLA removes the unembedding)."""
    model = nnx.merge(graphdef, params)
    _, new_memory = model(tokens_bl, memory)
    return new_memory


@functools.partial(jax.jit, static_argnums=0)
def _prefill_tail(graphdef, params, memory, tail_bn, n_tail):
    """Decode cache and first logits from the model's memory at a segment boundary and the last prompt segment."""
    model = nnx.merge(graphdef, params)
    cache = decode.from_memory(model, memory, tail_bn.shape[0])
    return decode.forward(model, cache, tail_bn, n_tail)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, params, cache, token_b):
    return decode.forward(nnx.merge(graphdef, params), cache, token_b[:, None], 1)


@functools.partial(jax.jit, static_argnums=0)
def _argmax_forward(graphdef, params, tokens_bl):
    logits_blV, _ = nnx.merge(graphdef, params)(tokens_bl)
    return jnp.argmax(logits_blV, axis=-1)


def sample_logits(logits_bV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Temperature / nucleus sampling of one token per row, [B] int32. temperature <= 0 → argmax."""
    if temperature <= 0:
        return jnp.argmax(logits_bV, axis=-1).astype(jnp.int32)
    logits_bV = logits_bV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_bV = jnp.sort(logits_bV, axis=-1)[:, ::-1]
        probs_bV = jax.nn.softmax(sorted_bV, axis=-1)
        before_bV = jnp.cumsum(probs_bV, axis=-1) - probs_bV  # mass of strictly better tokens
        keep_bV = before_bV < top_p  # the top token is always kept
        cutoff_b = jnp.min(jnp.where(keep_bV, sorted_bV, jnp.inf), axis=-1)
        logits_bV = jnp.where(logits_bV >= cutoff_b[:, None], logits_bV, -jnp.inf)
    return jax.random.categorical(key, logits_bV, axis=-1).astype(jnp.int32)


def prefill(model: InfiniTransformer, prompt_ids, *, chunk_segments: int = 16, pad_id: int = 0,
            progress: bool = False) -> tuple[jax.Array, decode.DecodeCache]:
    """Reads a prompt ([l] or [b, l] ints, l >= 1; rows share l) with bounded memory.

    Returns (float32 logits [b, V] of the token after the prompt, the DecodeCache after it)."""
    cfg = model.cfg
    decode.check_streamable(cfg)
    prompt_bl = np.atleast_2d(np.asarray(prompt_ids, np.int32))
    b, l = prompt_bl.shape
    if l < 1:
        raise ValueError("the prompt needs at least one token (e.g. the tokenizer's bos_id)")
    n = cfg.segment_len
    graphdef, params = nnx.split(model)
    memory = model.init_memory(b)
    n_full = (l - 1) // n  # whole segments through the model; 1..n prompt tokens go to the KV cache
    k = max(1, int(chunk_segments))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=l, desc="prefill", unit="tok", unit_scale=True)
    s = 0
    while s < n_full:
        take = k if n_full - s >= k else 1  # two compiled shapes only
        memory = _advance(graphdef, params, memory, jnp.asarray(prompt_bl[:, s * n:(s + take) * n]))
        s += take
        if bar is not None:
            bar.update(take * n)
    tail_bn = np.full((b, n), pad_id, np.int32)
    n_tail = l - n_full * n
    tail_bn[:, :n_tail] = prompt_bl[:, n_full * n:]
    logits_bV, cache = _prefill_tail(graphdef, params, memory, jnp.asarray(tail_bn), jnp.int32(n_tail))
    if bar is not None:
        bar.update(n_tail)
        bar.close()
    return logits_bV, cache


def decode_step(model: InfiniTransformer, cache: decode.DecodeCache, token_ids) -> tuple[jax.Array, decode.DecodeCache]:
    """One jitted step: token_ids [B] join the decode cache; returns (float32 logits [B, V] of the next token,
    the new cache)."""
    graphdef, params = nnx.split(model)
    return _step(graphdef, params, cache, jnp.asarray(token_ids, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _decode_loop(graphdef, params, cache, logits_bV, key, plan: tuple):
    """plan = (t, temperature, top_p, eos_id, return_logits), static: t new tokens in one jax.lax.while_loop,
    token i sampled from logits_i with fold_in(key, i), then fed. Returns (tokens [b, t], how many were
    emitted, logits [b, t, V] or None)."""
    t, temperature, top_p, eos_id, return_logits = plan
    model = nnx.merge(graphdef, params)
    b, vocab = logits_bV.shape

    def pick(i, logits_bV, done_b, out_bt, lg_btV):
        token_b = sample_logits(logits_bV, jax.random.fold_in(key, i), temperature, top_p)
        if eos_id is not None:  # a row that emitted eos keeps emitting it
            token_b = jnp.where(done_b, eos_id, token_b)
            done_b = done_b | (token_b == eos_id)
        out_bt = jax.lax.dynamic_update_index_in_dim(out_bt, token_b, i, axis=1)
        if return_logits:
            lg_btV = jax.lax.dynamic_update_index_in_dim(lg_btV, logits_bV, i, axis=1)
        return token_b, done_b, out_bt, lg_btV

    lg_btV = jnp.zeros((b, t, vocab), jnp.float32) if return_logits else None
    first = pick(0, logits_bV, jnp.zeros((b,), bool), jnp.zeros((b, t), jnp.int32), lg_btV)

    def cond(carry):
        i, _, _, done_b, _, _ = carry
        return (i < t) & ~jnp.all(done_b)

    def body(carry):
        i, cache, token_b, done_b, out_bt, lg_btV = carry
        logits_bV, cache = decode.forward(model, cache, token_b[:, None], 1)
        return (i + 1, cache) + pick(i, logits_bV, done_b, out_bt, lg_btV)

    i, _, _, _, out_bt, lg_btV = jax.lax.while_loop(cond, body, (jnp.int32(1), cache) + first)
    return out_bt, i, lg_btV


def generate(model: InfiniTransformer, prompt_ids, max_new_tokens: int, sampling: Sampling = Sampling(), *,
             return_logits: bool = False, **prefill_options):
    """Continues `prompt_ids` ([l] or [b, l] ints, l >= 1; rows share l) by t = `max_new_tokens` tokens, each
    picked as `sampling` says; `prefill_options` go to `prefill` (chunk_segments, pad_id, progress).

    Returns int32 [b, t] (or [t] for a 1-D prompt); with return_logits also the
    float32 logits [b, t, V] each token was chosen from. After a row emits sampling.eos_id it keeps emitting it;
    decoding stops early once every row has. Same seed and settings → same tokens. `progress`: a bar over the
    prompt's prefill (the new tokens come from one compiled loop).
    """
    decode.check_streamable(model.cfg)
    squeeze = np.ndim(prompt_ids) == 1
    logits_bV, cache = prefill(model, prompt_ids, **prefill_options)
    b, vocab = logits_bV.shape
    t = int(max_new_tokens)
    if t <= 0:
        out, logits = np.zeros((b, 0), np.int32), np.zeros((b, 0, vocab), np.float32)
    else:
        graphdef, params = nnx.split(model)
        plan = (t, float(sampling.temperature), float(sampling.top_p), sampling.eos_id, bool(return_logits))
        out, count, logits = _decode_loop(graphdef, params, cache, logits_bV, jax.random.PRNGKey(sampling.seed), plan)
        count = int(count)
        out = np.asarray(out)[:, :count]
        logits = np.asarray(logits)[:, :count] if return_logits else None
    out = out[0] if squeeze else out
    if return_logits:
        return out, (logits[0] if squeeze else logits)
    return out


def generate_text(model: InfiniTransformer, tokenizer, prompt: str, max_new_tokens: int,
                  sampling: Optional[Sampling] = None, *, add_bos: bool = True) -> str:
    """Encodes `prompt` (bos first), generates, and decodes the new tokens (up to sampling.eos_id when set).
    sampling None: greedy, stopping at the tokenizer's eos."""
    from infini_jax.data.tokenizers import check_vocab

    check_vocab(tokenizer, model.cfg.vocab_size)
    sampling = Sampling(eos_id=tokenizer.eos_id) if sampling is None else sampling
    ids = ([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(prompt))
    out_t = generate(model, np.asarray(ids, np.int32), max_new_tokens, sampling, pad_id=tokenizer.pad_id)
    ids_out = [int(t) for t in out_t]
    if sampling.eos_id is not None and sampling.eos_id in ids_out:
        ids_out = ids_out[:ids_out.index(sampling.eos_id)]
    return tokenizer.decode(ids_out)


def teacher_forced_argmax(model: InfiniTransformer, ids: Sequence[int] | np.ndarray, pad_id: int = 0) -> np.ndarray:
    """Argmax next-token predictions of one forward over the whole sequence (padded to whole segments);
    used to check decoding. [b, l] or [l] → same shape."""
    ids_bl = np.atleast_2d(np.asarray(ids, np.int32))
    n = model.cfg.segment_len
    l = ids_bl.shape[1]
    padded_bl = np.full((ids_bl.shape[0], -(-l // n) * n), pad_id, np.int32)
    padded_bl[:, :l] = ids_bl
    graphdef, params = nnx.split(model)
    pred = np.asarray(_argmax_forward(graphdef, params, jnp.asarray(padded_bl)))[:, :l]
    return pred[0] if np.ndim(ids) == 1 else pred
