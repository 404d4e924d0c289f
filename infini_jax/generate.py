"""Streaming decode with bounded memory: greedy or temperature / top-p sampling from a prompt of any length.

The model only accepts whole segments (model(tokens [B, n × segment_len], state, reset)). Decoding keeps:
    seg_state   the per-layer state at the start of the current segment (memory of everything before it)
    cur         the tokens of the current, partial segment (1 ... segment_len of them)
Each step runs the model on `cur` padded to segment_len from seg_state and reads the logits at the last real
position: the causal mask makes the padding invisible to it, and the memory only holds whole earlier
segments, exactly as in a teacher-forced forward over the whole sequence. When `cur` is full, the state that
the same call returned (the segment was unpadded then) becomes seg_state and `cur` restarts with the new
token. The prompt's whole segments before the last are consumed `chunk_segments` at a time (state only).
Memory is O(segment_len × vocab + state) however long the prompt or the output; each new token costs one
segment forward (segment_len tokens), the price of never caching partial-segment keys.

attention='full' carries no state between calls and cannot be streamed: it is rejected.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infini_jax.model import InfiniTransformer


@functools.partial(jax.jit, static_argnums=0)
def _advance(graphdef, params, state, tokens_bl):
    """State after whole segments (the logits are dropped; XLA removes the unembedding)."""
    model = nnx.merge(graphdef, params)
    _, new_state = model(tokens_bl, state)
    return new_state


@functools.partial(jax.jit, static_argnums=0)
def _argmax_forward(graphdef, params, tokens_bl):
    logits_blv, _ = nnx.merge(graphdef, params)(tokens_bl)
    return jnp.argmax(logits_blv, axis=-1)


def sample_logits(logits_bv: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Temperature / nucleus sampling of one token per row, [B] int32. temperature <= 0 → argmax."""
    if temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass of strictly better tokens
        keep_bv = before_bv < top_p  # the top token is always kept
        cutoff_b = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1)
        logits_bv = jnp.where(logits_bv >= cutoff_b[:, None], logits_bv, -jnp.inf)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _decode_step(graphdef, params, state, segment_bs, pos, key, step, temperature, top_p):
    """(next token [B], logits at pos [B, V], state after the whole (possibly padded) segment)."""
    model = nnx.merge(graphdef, params)
    logits_bsv, new_state = model(segment_bs, state)
    logits_bv = jax.lax.dynamic_index_in_dim(logits_bsv, pos, axis=1, keepdims=False)
    token_b = sample_logits(logits_bv, jax.random.fold_in(key, step), temperature, top_p)
    return token_b, logits_bv, new_state


def generate(model: InfiniTransformer, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None, pad_id: int = 0,
             chunk_segments: int = 16, return_logits: bool = False, progress: bool = False):
    """Continues `prompt_ids` ([T] or [B, T] ints, T >= 1; rows share T) by `max_new_tokens` tokens.

    Returns int32 [B, max_new_tokens] (or [max_new_tokens] for a 1-D prompt); with return_logits also the
    float32 logits [B, n, V] each token was chosen from. After a row emits eos_id it keeps emitting eos_id;
    decoding stops early once every row has. Same seed and settings → same tokens.
    """
    cfg = model.cfg
    if cfg.attention == "full":
        raise ValueError("attention='full' keeps no state between calls, so it cannot decode with bounded memory; "
                         "use an infini, xl or local model")
    prompt_BT = np.asarray(prompt_ids, np.int32)
    squeeze = prompt_BT.ndim == 1
    prompt_BT = np.atleast_2d(prompt_BT)
    B, T = prompt_BT.shape
    if T < 1:
        raise ValueError("the prompt needs at least one token (e.g. the tokenizer's bos_id)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    S = cfg.segment_len
    graphdef, params = nnx.split(model)
    state = model.init_state(B)

    n_full = (T - 1) // S  # whole segments consumed before decoding; 1..S prompt tokens stay in `cur`
    k = max(1, int(chunk_segments))
    s = 0
    while s < n_full:
        take = k if n_full - s >= k else 1
        state = _advance(graphdef, params, state, jnp.asarray(prompt_BT[:, s * S:(s + take) * S]))
        s += take
    cur_BS = np.full((B, S), pad_id, np.int32)
    n_cur = T - n_full * S
    cur_BS[:, :n_cur] = prompt_BT[:, n_full * S:]

    key = jax.random.PRNGKey(seed)
    out_BN = np.full((B, max_new_tokens), eos_id if eos_id is not None else pad_id, np.int32)
    logits_out = []
    done_B = np.zeros(B, bool)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok")
    for i in range(max_new_tokens):
        token_B, logits_BV, seg_end_state = _decode_step(graphdef, params, state, jnp.asarray(cur_BS),
                                                         jnp.int32(n_cur - 1), key, jnp.int32(i),
                                                         float(temperature), float(top_p))
        token_B = np.asarray(token_B)
        if eos_id is not None:
            token_B = np.where(done_B, eos_id, token_B)
            done_B |= token_B == eos_id
        out_BN[:, i] = token_B
        if return_logits:
            logits_out.append(np.asarray(logits_BV))
        if n_cur == S:  # the segment was whole: its end state is the next segment's start state
            state = seg_end_state
            cur_BS = np.full((B, S), pad_id, np.int32)
            n_cur = 0
        cur_BS[:, n_cur] = token_B
        n_cur += 1
        if bar is not None:
            bar.update(1)
        if eos_id is not None and done_B.all():
            out_BN = out_BN[:, :i + 1]
            break
    if bar is not None:
        bar.close()
    out = out_BN[0] if squeeze else out_BN
    if return_logits:
        logits = np.stack(logits_out, axis=1) if logits_out else np.zeros((B, 0, cfg.vocab_size), np.float32)
        return out, (logits[0] if squeeze else logits)
    return out


def generate_text(model: InfiniTransformer, tokenizer, prompt: str, max_new_tokens: int, *, add_bos: bool = True,
                  stop_at_eos: bool = True, **kw) -> str:
    """Encodes `prompt` (bos first), generates, and decodes the new tokens (up to eos)."""
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} != model vocab {model.cfg.vocab_size}")
    ids = ([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(prompt))
    out_N = generate(model, np.asarray(ids, np.int32), max_new_tokens, pad_id=tokenizer.pad_id,
                     eos_id=tokenizer.eos_id if stop_at_eos else None, **kw)
    ids_out = [int(t) for t in out_N]
    if stop_at_eos and tokenizer.eos_id in ids_out:
        ids_out = ids_out[:ids_out.index(tokenizer.eos_id)]
    return tokenizer.decode(ids_out)


def teacher_forced_argmax(model: InfiniTransformer, ids: Sequence[int] | np.ndarray, pad_id: int = 0) -> np.ndarray:
    """Argmax next-token predictions of one forward over the whole sequence (padded to whole segments);
    used to check decoding. [B, T] or [T] → same shape."""
    ids_BT = np.atleast_2d(np.asarray(ids, np.int32))
    S = model.cfg.segment_len
    T = ids_BT.shape[1]
    padded = np.full((ids_BT.shape[0], -(-T // S) * S), pad_id, np.int32)
    padded[:, :T] = ids_BT
    graphdef, params = nnx.split(model)
    pred = np.asarray(_argmax_forward(graphdef, params, jnp.asarray(padded)))[:, :T]
    return pred[0] if np.ndim(ids) == 1 else pred
