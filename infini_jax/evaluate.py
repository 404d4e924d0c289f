"""Evaluation: streamed perplexity over whole documents, the memory knock-out, passkey sweeps, footprint.

Perplexity (`evaluate_perplexity`)
    Batches come from infini_jax.data.make_iterator(..., train=False): every row streams one document window
    after window, `reset` True at a document's first window. The per-layer memory is carried from one batch to
    the next (the model clears a row's memory when its reset is True), so every segment of every document is
    scored with all of the document's earlier context in memory. The loss is token-weighted over EVERY scored
    token of every segment: ppl = exp(Σ NLL / Σ loss_mask) (never only the last segment).
    Besides the total it reports the per-segment-position curve: mean NLL by segment index within the document
    (index = window_index × n_segments + segment in window): does the loss fall as the memory fills up?

Bits per byte
    bpb = Σ NLL / ln 2 / Σ bytes(target), where bytes(v) is the number of UTF-8 bytes token v stands for
    (`byte_length_table`): ByteTokenizer → 1 for every byte token, 0 for pad/bos/eos (exact). SentencePiece →
    the UTF-8 length of the piece with '▁' read as a space, byte-fallback pieces '<0x..>' → 1, control/unknown
    pieces → 0: this counts the document's bytes up to the dummy-prefix space (one byte per document). Pass
    `byte_table=` (int [vocab]) to override, e.g. for a tokenizer with other conventions.

Knock-out (`knockout_model`): a copy of the model with every gate_logit = -1e9, so sigmoid(β) = 0 exactly and
    every head outputs its local attention only (tests/test_evaluate.py checks it equals attention='local').

Passkey (`passkey_sweep`): for each length, every depth × trial is one row of a batch (they share the length,
    so the answer sits at the same position in every row). The prompt is streamed through the model in chunks of
    `chunk_segments` segments; only the memory state is kept between chunks and only the argmax predictions and
    NLL of the answer positions leave the device, so a 1M-token prompt needs O(chunk × vocab) memory.
    Token accuracy = teacher-forced argmax match on the answer tokens (the paper's token-level accuracy);
    digit accuracy = the same on the answer tokens that hold digits (the leading space and any separator left
    out, so chance is ~10%, not the free 1/6 the space gives); exact match = every answer token right.
    `haystack` (data.passkey.Haystack) hides the key line in book prose instead of the paper's filler.

Jitted steps take (graphdef, params, state, ...) with graphdef static, so they compile once per model
structure and shape. Shapes are fixed per run (the batch shape, or [rows, chunk] for passkey).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infini_jax.config import defaults, with_defaults
from infini_jax.model import InfiniTransformer, ModelConfig

KNOCKOUT_GATE_LOGIT = -1e9  # sigmoid(-1e9) == 0.0 exactly in float32


# ------------------------------------------------------------------------------------------------------------
# Jitted steps
# ------------------------------------------------------------------------------------------------------------


def _token_nll(graphdef, params, state, tokens_bl, targets_bl, reset_b):
    """(nll [B, L], argmax [B, L], new_state): one forward over whole segments."""
    model = nnx.merge(graphdef, params)
    logits_blv, new_state = model(tokens_bl, state, reset_b)
    logp_blv = jax.nn.log_softmax(logits_blv, axis=-1)
    nll_bl = -jnp.take_along_axis(logp_blv, targets_bl[..., None], axis=-1)[..., 0]
    pred_bl = jnp.argmax(logits_blv, axis=-1).astype(jnp.int32)
    return nll_bl, pred_bl, new_state


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_step(graphdef, n_seg, params, state, tokens_bl, targets_bl, mask_bl, reset_b, byte_table_v):
    """Per-segment sums [B, n_seg] of NLL, scored tokens, correct argmax and bytes; and the new state."""
    nll_bl, pred_bl, new_state = _token_nll(graphdef, params, state, tokens_bl, targets_bl, reset_b)
    b, l = tokens_bl.shape
    shape_bsn = (b, n_seg, l // n_seg)
    mask_bl = mask_bl.astype(jnp.float32)
    correct_bl = (pred_bl == targets_bl).astype(jnp.float32) * mask_bl
    bytes_bl = byte_table_v[targets_bl].astype(jnp.float32) * mask_bl
    sums = {
        "nll": (nll_bl * mask_bl).reshape(shape_bsn).sum(-1),  # [B, n_seg]
        "tokens": mask_bl.reshape(shape_bsn).sum(-1),
        "correct": correct_bl.reshape(shape_bsn).sum(-1),
        "bytes": bytes_bl.reshape(shape_bsn).sum(-1),
    }
    return sums, new_state


@functools.partial(jax.jit, static_argnums=0)
def _stream_step(graphdef, params, state, tokens_bl, targets_bl, weight_bl):
    """Passkey / long-prompt chunk: new state, argmax [B, L], weighted NLL [B, L]."""
    nll_bl, pred_bl, new_state = _token_nll(graphdef, params, state, tokens_bl, targets_bl,
                                            jnp.zeros(tokens_bl.shape[:1], bool))
    return new_state, pred_bl, nll_bl * weight_bl


# ------------------------------------------------------------------------------------------------------------
# Perplexity
# ------------------------------------------------------------------------------------------------------------


def byte_length_table(tokenizer, vocab_size: Optional[int] = None) -> np.ndarray:
    """int32 [vocab]: UTF-8 bytes each token id stands for (see the module docstring)."""
    vocab = int(vocab_size or tokenizer.vocab_size)
    table_V = np.zeros(vocab, np.int32)
    if hasattr(tokenizer, "token_bytes"):  # a tokenizer may define its own table
        given = np.asarray(tokenizer.token_bytes(), np.int32)
        table_V[:len(given)] = given[:vocab]
        return table_V
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None:
        for i in range(min(vocab, sp.GetPieceSize())):
            if sp.IsControl(i) or sp.IsUnknown(i):
                continue
            piece = sp.IdToPiece(i)
            if sp.IsByte(i) or (piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6):
                table_V[i] = 1
            else:
                table_V[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return table_V
    offset = getattr(tokenizer, "offset", None)
    if offset is not None:  # ByteTokenizer: byte b -> b + offset
        table_V[offset:min(vocab, offset + 256)] = 1
        return table_V
    raise ValueError(f"cannot derive bytes per token for {tokenizer!r}; pass byte_table=")


def evaluate_perplexity(model: InfiniTransformer, batches: Iterable[dict], *, tokenizer=None,
                        byte_table: Optional[np.ndarray] = None, max_batches: Optional[int] = None,
                        progress: bool = False, desc: str = "perplexity") -> dict:
    """Streams `batches` (contract format, eval order) through the model carrying memory; see module doc.

    Returns {"loss", "perplexity", "accuracy", "tokens", "bits_per_byte" (or None), "bytes", "batches",
    "documents", "seconds", "segment_curve": {"segment", "loss", "tokens"}}.
    """
    cfg = model.cfg
    graphdef, params = nnx.split(model)
    if byte_table is None and tokenizer is not None:
        byte_table = byte_length_table(tokenizer, cfg.vocab_size)
    has_bytes = byte_table is not None
    table_V = jnp.asarray(byte_table if has_bytes else np.zeros(cfg.vocab_size), jnp.int32)
    if table_V.shape != (cfg.vocab_size,):
        raise ValueError(f"byte_table has shape {table_V.shape}, the model vocab is {cfg.vocab_size}")

    state = None
    window_B = None  # window index within its document, per row
    tot = dict(nll=0.0, tokens=0.0, correct=0.0, bytes=0.0)
    curve_nll, curve_tok = np.zeros(0), np.zeros(0)
    n_docs, n_batches, t0 = 0, 0, time.time()
    bar = _progress(progress, total=max_batches, desc=desc, unit="batch")
    for batch in batches:
        if max_batches is not None and n_batches >= max_batches:
            break
        tokens_BL = np.asarray(batch["tokens"], np.int32)
        B, L = tokens_BL.shape
        if L % cfg.segment_len and cfg.attention != "full":  # full attention scores the window as one segment
            raise ValueError(f"batch length {L} is not a multiple of segment_len {cfg.segment_len}")
        reset_B = np.asarray(batch["reset"], bool)
        mask_BL = np.asarray(batch["loss_mask"], np.float32)
        if state is None:
            state = model.init_state(B)
            window_B = np.zeros(B, np.int64)
        window_B = np.where(reset_B, 0, window_B + 1)
        n_docs += int(np.sum(reset_B & (mask_BL.sum(1) > 0)))
        n_seg = L // cfg.segment_len if L % cfg.segment_len == 0 else 1
        sums, state = _eval_step(graphdef, n_seg, params, state, jnp.asarray(tokens_BL),
                                 jnp.asarray(batch["targets"], jnp.int32), jnp.asarray(mask_BL),
                                 jnp.asarray(reset_B), table_V)
        sums = jax.device_get(sums)
        for k in tot:
            tot[k] += float(np.sum(sums[k], dtype=np.float64))
        n_seg = sums["nll"].shape[1]
        pos_BS = window_B[:, None] * n_seg + np.arange(n_seg)[None, :]
        need = int(pos_BS.max()) + 1
        if need > len(curve_nll):
            curve_nll = np.pad(curve_nll, (0, need - len(curve_nll)))
            curve_tok = np.pad(curve_tok, (0, need - len(curve_tok)))
        np.add.at(curve_nll, pos_BS.ravel(), sums["nll"].ravel().astype(np.float64))
        np.add.at(curve_tok, pos_BS.ravel(), sums["tokens"].ravel().astype(np.float64))
        n_batches += 1
        if bar is not None:
            bar.update(1)
            if tot["tokens"]:
                bar.set_postfix(loss=f"{tot['nll'] / tot['tokens']:.4f}")
    if bar is not None:
        bar.close()
    if tot["tokens"] == 0:
        raise ValueError("no scored tokens: the evaluation data is empty (check split, data_dir, max_docs)")
    loss = tot["nll"] / tot["tokens"]
    keep = curve_tok > 0
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": tot["correct"] / tot["tokens"],
        "tokens": int(tot["tokens"]),
        "bits_per_byte": (tot["nll"] / math.log(2) / tot["bytes"]) if has_bytes and tot["bytes"] else None,
        "bytes": int(tot["bytes"]) if has_bytes else None,
        "batches": n_batches,
        "documents": n_docs,
        "seconds": time.time() - t0,
        "segment_curve": {"segment": np.nonzero(keep)[0].tolist(),
                          "loss": (curve_nll[keep] / curve_tok[keep]).tolist(),
                          "tokens": curve_tok[keep].astype(int).tolist()},
    }


def knockout_model(model: InfiniTransformer) -> InfiniTransformer:
    """A copy of `model` whose memory read is disabled: every gate_logit = -1e9 (sigmoid = 0 exactly)."""
    if model.cfg.attention != "infini":
        raise ValueError(f"memory knock-out needs attention='infini', the model has {model.cfg.attention!r}")
    ko = nnx.clone(model)
    for block in ([ko.blocks] if model.cfg.scan_layers else ko.blocks):  # stacked: gate_logit [layers, heads]
        block.attn.gate_logit[...] = jnp.full_like(block.attn.gate_logit[...], KNOCKOUT_GATE_LOGIT)
    return ko


# ------------------------------------------------------------------------------------------------------------
# Passkey
# ------------------------------------------------------------------------------------------------------------


def passkey_length(model: InfiniTransformer, tokenizer, length: int, depths: Sequence[float], *, trials: int = 1,
                   seed: int = 0, chunk_segments: int = 16, n_digits: int = 5, progress: bool = False,
                   haystack=None) -> list[dict]:
    """One passkey length at every depth (× trials), batched as rows; returns one dict per depth."""
    from infini_jax.data.passkey import PasskeyStream

    cfg = model.cfg
    if cfg.attention == "full":
        raise ValueError("passkey streaming needs a model with segments (infini, xl or local), not 'full'")
    seg = cfg.segment_len
    C = seg * max(1, int(chunk_segments))
    rows = [(d, t) for d in depths for t in range(trials)]
    streams = [PasskeyStream(tokenizer, length, d, seed=seed + 7919 * t + 104729 * i, n_digits=n_digits,
                             chunk_tokens=C, include_answer=True, haystack=haystack)
               for i, (d, t) in enumerate(rows)]
    total, a0 = streams[0].total_len, streams[0].answer_start
    A = len(streams[0].answer_ids)
    if any(s.total_len != total or s.answer_start != a0 or len(s.answer_ids) != A for s in streams):
        raise AssertionError("passkey rows of one length must share the layout")
    R = len(rows)
    first, last = a0 - 1, a0 + A - 2  # positions whose next-token prediction is an answer token
    answers_RA = np.stack([s.answer_ids for s in streams]).astype(np.int32)
    digits_RA = np.array([[any(ch.isdigit() for ch in tokenizer.decode([int(t)])) for t in row] for row in answers_RA])
    graphdef, params = nnx.split(model)
    state = model.init_state(R)
    preds_RA = np.zeros((R, A), np.int32)
    nll_R = np.zeros(R)
    n_chunks = -(-total // C)
    bar = _progress(progress, total=n_chunks, desc=f"passkey {length}", unit="chunk")
    t0 = time.time()
    for c, chunks in enumerate(zip(*streams)):
        start = c * C
        tokens_RC = np.full((R, C), tokenizer.pad_id, np.int32)
        for r, chunk in enumerate(chunks):
            tokens_RC[r, :len(chunk)] = chunk
        lo, hi = max(first, start), min(last, start + C - 1)
        targets_RC = np.zeros((R, C), np.int32)
        weight_RC = np.zeros((R, C), np.float32)
        if lo <= hi:
            targets_RC[:, lo - start:hi - start + 1] = answers_RA[:, lo - first:hi - first + 1]
            weight_RC[:, lo - start:hi - start + 1] = 1.0
        state, pred_RC, nll_RC = _stream_step(graphdef, params, state, jnp.asarray(tokens_RC),
                                              jnp.asarray(targets_RC), jnp.asarray(weight_RC))
        if lo <= hi:  # only these leave the device
            preds_RA[:, lo - first:hi - first + 1] = np.asarray(pred_RC)[:, lo - start:hi - start + 1]
            nll_R += np.asarray(nll_RC, np.float64).sum(1)
        if bar is not None:
            bar.update(1)
    jax.block_until_ready(state)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    out = []
    for d in depths:
        idx = [r for r, (dd, _) in enumerate(rows) if dd == d]
        match = preds_RA[idx] == answers_RA[idx]
        out.append({"length": int(length), "tokens": int(total), "depth": float(d), "trials": int(trials),
                    "token_accuracy": float(match.mean()), "exact_match": float(match.all(1).mean()),
                    "digit_accuracy": float(match[digits_RA[idx]].mean()),
                    "answer_nll": float(nll_R[idx].mean() / A), "seconds": seconds,
                    "passkeys": [streams[r].passkey for r in idx]})
    return out


def passkey_sweep(model: InfiniTransformer, tokenizer, lengths: Sequence[int], depths: Sequence[float], *,
                  trials: int = 1, seed: int = 0, chunk_segments: int = 16, n_digits: int = 5,
                  progress: bool = False, haystack=None) -> dict:
    """Grid of lengths × depths: {"lengths", "depths", "digit_accuracy" and "accuracy" (token accuracy), each
    [n_depths][n_lengths], "cells": [...], "haystack": folder or None}."""
    cells = []
    for length in lengths:
        cells += passkey_length(model, tokenizer, int(length), depths, trials=trials, seed=seed,
                                chunk_segments=chunk_segments, n_digits=n_digits, progress=progress,
                                haystack=haystack)

    def grid(key):
        return [[next(c[key] for c in cells if c["length"] == L and c["depth"] == d) for L in lengths]
                for d in depths]

    return {"lengths": [int(x) for x in lengths], "depths": [float(x) for x in depths], "trials": trials,
            "digit_accuracy": grid("digit_accuracy"), "accuracy": grid("token_accuracy"), "cells": cells,
            "haystack": None if haystack is None else haystack.directory}


# ------------------------------------------------------------------------------------------------------------
# Memory footprint (paper Table 1)
# ------------------------------------------------------------------------------------------------------------


def memory_footprint(cfg: ModelConfig, input_lens: Sequence[int] | int | None = None) -> dict:
    """Numbers each design keeps per sequence (one batch row), summed over layers (paper Table 1).

    infini:   d_key × (d_value + 1) × H × layers (M and z), whatever the input length
    xl:       (d_key + d_value) × H × N × layers (keys and values of one segment of N tokens)
    full@T:   (d_key + d_value) × H × T × layers (keys and values of the whole input of T tokens)
    H counts key/value heads (= num_kv_heads under grouped-query attention: memory and caches are per KV head).
    """
    dk = dv = cfg.head_dim
    H, N, layers = cfg.kv_heads, cfg.segment_len, cfg.num_layers
    lens = [cfg.seq_len] if input_lens is None else ([input_lens] if isinstance(input_lens, int) else input_lens)
    infini = dk * (dv + 1) * H * layers
    rows = {
        "infini": {"numbers": infini, "formula": "d_key*(d_value+1)*H*layers"},
        "xl": {"numbers": (dk + dv) * H * N * layers, "formula": "(d_key+d_value)*H*N*layers"},
    }
    for T in lens:
        rows[f"full@{int(T)}"] = {"numbers": (dk + dv) * H * int(T) * layers,
                                  "formula": f"(d_key+d_value)*H*T*layers, T={int(T)}"}
    for row in rows.values():
        row["x_infini"] = row["numbers"] / infini
        row["mbytes_float32"] = row["numbers"] * 4 / 2**20
    return {"config": {"head_dim": dk, "num_heads": H, "segment_len": N, "num_layers": layers}, "rows": rows}


def format_footprint(fp: dict) -> str:
    c = fp["config"]
    lines = [f"Memory footprint per sequence (d_key=d_value={c['head_dim']}, H={c['num_heads']}, "
             f"N={c['segment_len']}, layers={c['num_layers']})",
             f"  {'model':<14}{'numbers':>16}{'MB (f32)':>11}{'x infini':>10}  formula"]
    for name, row in fp["rows"].items():
        lines.append(f"  {name:<14}{row['numbers']:>16,}{row['mbytes_float32']:>11.2f}"
                     f"{row['x_infini']:>10.1f}  {row['formula']}")
    return "\n".join(lines)


def _progress(enabled: bool, **kw) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(**kw)


# ------------------------------------------------------------------------------------------------------------
# Loading and the task runner behind eval.py
# ------------------------------------------------------------------------------------------------------------

TASKS = ("perplexity", "knockout", "passkey", "gates", "footprint", "generate", "summarize")


def load_model(config, *, workdir=None, checkpoint=None, init_random: bool = False):
    """(model, info) for `config` from the latest checkpoint in workdir, or a checkpoint path (a workdir, its
    checkpoints/ dir or one step dir). Mismatches raise ValueError / FileNotFoundError naming the fix, before
    anything compiles. init_random=True builds a freshly initialised model (smoke tests only)."""
    from infini_jax import paths
    from infini_jax.config import model_config

    cfg = model_config(config)
    if init_random:
        return InfiniTransformer(cfg, rngs=nnx.Rngs(int(config.train.seed))), {"source": "random init", "step": None}
    path = checkpoint or workdir
    if not path:
        raise ValueError("no model to evaluate: pass --workdir DIR (its latest checkpoint) or --checkpoint PATH")
    if not paths.resolve(path).exists():
        raise FileNotFoundError(f"{'--checkpoint' if checkpoint else '--workdir'} {path} does not exist; "
                                "pass the workdir train.py wrote, or a checkpoint step directory")
    from infini_jax import checkpoint as ckpt_lib

    step_dir = ckpt_lib.find_step_dir(path)  # FileNotFoundError "no checkpoint found at ..." when empty
    saved_cfg = step_dir / "config" / "metadata"
    if saved_cfg.exists():
        import json

        ckpt_lib.check_model_matches(json.loads(saved_cfg.read_text()), config.model, where=str(step_dir))
    params = ckpt_lib.restore_params(step_dir, cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: InfiniTransformer(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(abstract, params)
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    return nnx.merge(graphdef, abstract), {"source": str(step_dir), "step": step}


def limit_documents(batches: Iterable[dict], max_docs: Optional[int]):
    """Only the first `max_docs` documents (in the order rows start them) are scored; stops once they end."""
    if not max_docs:
        yield from batches
        return
    started, active = 0, None
    for batch in batches:
        reset_B, mask_BL = np.asarray(batch["reset"], bool), np.asarray(batch["loss_mask"])
        active = np.zeros(len(reset_B), bool) if active is None else active
        for b in np.nonzero(reset_B)[0]:
            active[b] = started < max_docs and mask_BL[b].sum() > 0
            started += int(active[b])
        if not active.any():
            return
        yield dict(batch, loss_mask=mask_BL * active[:, None])


def run(config, model: InfiniTransformer, tokenizer, *, tasks: Sequence[str] = TASKS, split: str = "validation",
        batch_size: Optional[int] = None, max_docs: Optional[int] = None, max_batches: Optional[int] = None,
        passkey_lengths: Sequence[int] = (1024, 4096, 32768), passkey_depths: Sequence[float] = (0, .25, .5, .75, 1),
        passkey_trials: int = 1, chunk_segments: int = 16, prompt: Optional[str] = None, max_new_tokens: int = 32,
        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress: bool = True, log=print,
        passkey_haystack=None) -> dict:
    """Runs the tasks; returns a JSON-able dict (see eval.py). Tasks needing memory skip non-infini models."""
    from infini_jax.model import gate_values

    cfg, out = model.cfg, {}
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; valid: {list(TASKS)}")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} != model vocab {cfg.vocab_size}: set "
                         "config.model.vocab_size to the tokenizer's, or config.data.tokenizer to the model's")
    needs_memory = {"knockout", "gates"} & set(tasks)
    if cfg.attention != "infini" and needs_memory:
        log(f"skipping {sorted(needs_memory)}: attention={cfg.attention!r} has no memory gates")
        tasks = [t for t in tasks if t not in needs_memory]
    if "footprint" in tasks:
        out["footprint"] = memory_footprint(cfg, sorted({cfg.seq_len, *map(int, passkey_lengths)}))
        log(format_footprint(out["footprint"]))
    if "gates" in tasks:
        out["gates"] = np.asarray(gate_values(model)).tolist()
        log("gates sigmoid(beta) [layer][head]: " + "; ".join(" ".join(f"{g:.2f}" for g in row)
                                                             for row in out["gates"]))
    for task, m in (("perplexity", model), ("knockout", None)):
        if task not in tasks:
            continue
        from infini_jax.data import make_iterator

        m = m or knockout_model(model)
        it = make_iterator(config.data, seq_len=cfg.seq_len, batch_size=batch_size or int(config.train.batch_size),
                           split=split, train=False)
        res = evaluate_perplexity(m, limit_documents(it, max_docs), tokenizer=tokenizer, max_batches=max_batches,
                                  progress=progress, desc=task)
        out[task] = res
        bpb = f", {res['bits_per_byte']:.4f} bits/byte" if res["bits_per_byte"] is not None else ""
        log(f"{task}: loss {res['loss']:.4f} (ppl {res['perplexity']:.3f}{bpb}), accuracy {res['accuracy']:.4f} "
            f"over {res['tokens']:,} tokens of {res['documents']} documents, every segment scored")
    if "perplexity" in out and "knockout" in out:
        out["knockout_delta_loss"] = out["knockout"]["loss"] - out["perplexity"]["loss"]
        log(f"memory knock-out raises the loss by {out['knockout_delta_loss']:+.4f} nats/token")
    if "passkey" in tasks:
        out["passkey"] = passkey_sweep(model, tokenizer, passkey_lengths, passkey_depths, trials=passkey_trials,
                                       seed=seed, chunk_segments=chunk_segments, progress=progress,
                                       haystack=passkey_haystack)
        log(format_passkey(out["passkey"]))
    if "generate" in tasks:
        out["generate"] = _generate_task(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, seed=seed)
        log(f"generate ({'greedy' if temperature <= 0 else f'T={temperature}, top_p={top_p}'}): "
            f"...{out['generate']['prompt'][-60:]!r} -> {out['generate']['output']!r}")
    if "summarize" in tasks:
        from infini_jax.summarize import summarize_and_score

        out["summarize"] = summarize_and_score(model, tokenizer, config.data, split=split, max_docs=max_docs,
                                               max_new_tokens=max_new_tokens, temperature=temperature,
                                               top_p=top_p, seed=seed, log=log)
        log("summarize ROUGE F1: " + ", ".join(f"{k} {v:.2f}" for k, v in out["summarize"]["rouge"].items()))
    return out


EVALS_DEFAULTS = defaults("evals")  # every config.evals key (infini_jax/configs/base.py)


def passkey_report(model: InfiniTransformer, tokenizer, evals_cfg, *, log=print) -> dict:
    """The passkey evaluator of `config.evals` (run by train.py at the end of training): digit accuracy at
    passkey_x × the training length (model.cfg.seq_len), at passkey_depths, passkey_trials passkeys per cell,
    with the memory and (passkey_knockout, infini only) without it. Returns {"passkey", "passkey_knockout"}."""
    e = with_defaults("evals", evals_cfg, EVALS_DEFAULTS)
    lengths = [int(x * model.cfg.seq_len) for x in e["passkey_x"]]
    if not lengths:
        return {}
    kw = dict(trials=int(e["passkey_trials"]), seed=int(e["passkey_seed"]))
    out = {"passkey": passkey_sweep(model, tokenizer, lengths, list(e["passkey_depths"]), **kw)}
    log(format_passkey(out["passkey"]))
    if e["passkey_knockout"] and model.cfg.attention == "infini":
        out["passkey_knockout"] = passkey_sweep(knockout_model(model), tokenizer, lengths, list(e["passkey_depths"]),
                                                **kw)
        log("memory knocked out (every gate 0): " + format_passkey(out["passkey_knockout"]))
    return out


def format_passkey(sweep: dict) -> str:
    where = f" in the prose of {sweep['haystack']}" if sweep.get("haystack") else ""
    lines = [f"passkey digit accuracy (%){where}, {sweep['trials']} passkeys per cell, rows = depth, columns = length:",
             "  depth " + "".join(f"{n:>10}" for n in sweep["lengths"])]
    for d, row in zip(sweep["depths"], sweep["digit_accuracy"]):
        lines.append(f"  {d:>5.0%} " + "".join(f"{100 * a:>10.1f}" for a in row))
    secs = {c["length"]: c["seconds"] for c in sweep["cells"]}
    lines.append("  seconds per length (all depths batched): " + ", ".join(f"{n}: {s:.1f}" for n, s in secs.items()))
    return "\n".join(lines)


def _generate_task(model, tokenizer, prompt, **kw) -> dict:
    from infini_jax.generate import generate

    answer = None
    if prompt is None:  # a passkey prompt of about one training input, answer withheld
        from infini_jax.data.passkey import PasskeyStream

        stream = PasskeyStream(tokenizer, max(model.cfg.seq_len, 400), 0.5, seed=kw["seed"], include_answer=False)
        ids = np.concatenate(list(stream))
        answer = tokenizer.decode(stream.answer_ids.tolist())
    else:
        ids = np.asarray([tokenizer.bos_id] + list(tokenizer.encode(prompt)), np.int32)
    t0 = time.time()
    out_ids = generate(model, ids, kw["max_new_tokens"], temperature=kw["temperature"], top_p=kw["top_p"],
                       seed=kw["seed"], eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    ids_out = [int(t) for t in out_ids]
    if tokenizer.eos_id in ids_out:
        ids_out = ids_out[:ids_out.index(tokenizer.eos_id)]
    res = {"prompt": tokenizer.decode(ids.tolist()), "prompt_tokens": int(len(ids)),
           "output": tokenizer.decode(ids_out), "output_ids": ids_out, "seconds": time.time() - t0}
    if answer is not None:
        res["expected"] = answer
    return res
