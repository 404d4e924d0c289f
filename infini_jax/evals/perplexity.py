"""Perplexity over whole documents with the memory streamed across windows, the per-segment-position curve
and bits per byte (`type="perplexity"`; `knockout=True`: the same with the memory read disabled).

Batches come from infini_jax.data.make_iterator(..., train=False): every row streams one document window
after window, `reset` True at a document's first window. The per-layer memory is carried from one batch to
the next (the model clears a row's memory when its reset is True), so every segment of every document is
scored with all of the document's earlier context in memory. The loss is token-weighted over EVERY scored
token of every segment: ppl = exp(Σ NLL / Σ loss_mask) (never only the last segment). The sums come from
step.segment_sums (the training loss, chunked and sharded like the train step).

The per-segment-position curve: mean NLL by segment index within the document (index = window_index ×
n_segments + segment in window): does the loss fall as the memory fills up? The offset curve: mean NLL by
position within a segment (0 .. segment_len − 1; full attention's window is cut into the same segments, so
only one of its offset-0 tokens in n_segments lacks context): a segment's first tokens have no local context,
and only the memory (XL: the cache) can stand in for it.

Bits per byte: bpb = Σ NLL / ln 2 / Σ bytes(target), where bytes(v) is the number of UTF-8 bytes token v
stands for (`byte_length_table`): ByteTokenizer → 1 for every byte token, 0 for pad/bos/eos (exact).
SentencePiece → the UTF-8 length of the piece with '▁' read as a space, byte-fallback pieces '<0x..>' → 1,
control/unknown pieces → 0: this counts the document's bytes up to the dummy-prefix space (one byte per
document). A tokenizer may define `token_bytes()` (the Hugging Face one does).

Multi-process: every process feeds its rows of each batch; a process whose data ends first feeds empty rows
(loss_mask 0) until every process is done, so all take the same number of steps without being told.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from infini_jax import sharding as shd
from infini_jax.evals.core import Evaluator, Subject, as_subject, progress_bar

CONTRACT = dict(tokens=np.int32, targets=np.int32, loss_mask=np.float32, reset=bool)  # the batch fields read
LOSS_CLAMP = 700.0  # exp(700) is finite in float64: perplexity of a diverged model is huge, not inf


def byte_length_table(tokenizer, vocab_size: Optional[int] = None) -> np.ndarray:
    """int32 [V]: UTF-8 bytes each token id stands for (see the module docstring)."""
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
    raise ValueError(f"cannot derive bytes per token for {tokenizer!r}; give it a token_bytes() method")


def limit_documents(batches: Iterable[dict], max_docs: Optional[int]):
    """Only the first `max_docs` documents (in the order rows start them) are scored; stops once they end."""
    if not max_docs:
        yield from batches
        return
    started, active = 0, None
    for batch in batches:
        reset_b, mask_bl = np.asarray(batch["reset"], bool), np.asarray(batch["loss_mask"])
        active = np.zeros(len(reset_b), bool) if active is None else active
        for b in np.nonzero(reset_b)[0]:
            active[b] = started < max_docs and mask_bl[b].sum() > 0
            started += int(active[b])
        if not active.any():
            return
        yield dict(batch, loss_mask=mask_bl * active[:, None])


def same_count_everywhere(batches: Iterable[dict]):
    """One process: `batches`. Several: each keeps yielding empty rows (loss_mask 0, reset) after its own data
    ends until every process's has (one tiny all-gather per batch), so every process takes the same steps."""
    if jax.process_count() == 1:
        yield from batches
        return
    from jax.experimental import multihost_utils

    it, last = iter(batches), None
    while True:
        batch = next(it, None)
        if bool(np.all(multihost_utils.process_allgather(np.asarray(batch is None)))):
            return
        if batch is None:
            if last is None:
                raise ValueError("a process has no evaluation data at all; give every process some rows")
            batch = dict(last, loss_mask=np.zeros_like(last["loss_mask"]), reset=np.ones_like(last["reset"]))
        last = batch
        yield batch


class _Totals:
    """Host-side sums over batches: totals, the per-segment-position curve and documents."""

    def __init__(self):
        self.tot = dict(nll=0.0, tokens=0.0, correct=0.0, bytes=0.0, rows=0.0, rows_correct=0.0)
        self.curve_nll, self.curve_tok = np.zeros(0), np.zeros(0)
        self.offset_nll = self.offset_tok = 0.0  # [segment_len] once a batch is added
        self.window_b = None  # window index within its document, per row
        self.documents = self.batches = 0

    def add(self, sums: dict) -> None:
        s = {k: np.asarray(v, np.float64) for k, v in sums.items() if k != "reset"}
        reset_b = np.asarray(sums["reset"], bool)
        self.window_b = np.zeros(len(reset_b), np.int64) if self.window_b is None else self.window_b
        self.window_b = np.where(reset_b, 0, self.window_b + 1)
        tokens_b, correct_b = s["tokens"].sum(1), s["correct"].sum(1)
        self.documents += int(np.sum(reset_b & (tokens_b > 0)))
        for k in ("nll", "tokens", "correct", "bytes"):
            self.tot[k] += float(s[k].sum())
        self.tot["rows"] += float(np.sum(tokens_b > 0))
        self.tot["rows_correct"] += float(np.sum((tokens_b > 0) & (correct_b == tokens_b)))
        n_seg = s["nll"].shape[1]
        pos_bs = self.window_b[:, None] * n_seg + np.arange(n_seg)[None, :]
        need = int(pos_bs.max()) + 1
        if need > len(self.curve_nll):
            self.curve_nll = np.pad(self.curve_nll, (0, need - len(self.curve_nll)))
            self.curve_tok = np.pad(self.curve_tok, (0, need - len(self.curve_tok)))
        np.add.at(self.curve_nll, pos_bs.ravel(), s["nll"].ravel())
        np.add.at(self.curve_tok, pos_bs.ravel(), s["tokens"].ravel())
        self.offset_nll, self.offset_tok = self.offset_nll + s["offset_nll"], self.offset_tok + s["offset_tokens"]
        self.batches += 1

    def result(self, has_bytes: bool) -> dict:
        t = self.tot
        if t["tokens"] == 0:
            raise ValueError("no scored tokens: the evaluation data is empty (check split, data_dir, max_docs)")
        loss = t["nll"] / t["tokens"]
        ppl = math.exp(min(loss, LOSS_CLAMP))
        keep = self.curve_tok > 0
        return {
            "loss": loss, "ppl": ppl, "perplexity": ppl, "accuracy": t["correct"] / t["tokens"],
            "seq_accuracy": t["rows_correct"] / max(t["rows"], 1.0), "tokens": int(t["tokens"]),
            "bits_per_byte": (t["nll"] / math.log(2) / t["bytes"]) if has_bytes and t["bytes"] else None,
            "bytes": int(t["bytes"]) if has_bytes else None, "batches": self.batches, "documents": self.documents,
            "segment_curve": {"segment": np.nonzero(keep)[0].tolist(),
                              "loss": (self.curve_nll[keep] / self.curve_tok[keep]).tolist(),
                              "tokens": self.curve_tok[keep].astype(int).tolist()},
            "offset_curve": {"loss": (self.offset_nll / np.maximum(self.offset_tok, 1.0)).tolist(),
                             "tokens": np.asarray(self.offset_tok).astype(int).tolist()},
        }


def evaluate_perplexity(model_or_subject, batches: Iterable[dict], *, tokenizer=None,
                        max_batches: Optional[int] = None, progress: bool = False, desc: str = "perplexity") -> dict:
    """Streams `batches` (this process's rows, contract format, eval order) through the model carrying memory.
    Bits per byte when the tokenizer fits the model's vocabulary (byte_length_table).

    Returns {"loss", "ppl" (= "perplexity"), "accuracy", "seq_accuracy" (rows all right), "tokens",
    "bits_per_byte" (or None), "bytes", "batches", "documents", "segment_curve": {"segment", "loss", "tokens"},
    "offset_curve": {"loss", "tokens"} (one entry per offset within a segment)}.
    """
    subject = as_subject(model_or_subject, tokenizer)
    cfg, mesh, tokenizer = subject.model_cfg, subject.mesh, tokenizer or subject.tokenizer
    has_bytes = tokenizer is not None and tokenizer.vocab_size == cfg.vocab_size
    table_V = byte_length_table(tokenizer, cfg.vocab_size) if has_bytes else np.zeros(cfg.vocab_size, np.int32)
    table_V = jax.device_put(jnp.asarray(table_V), shd.replicated(mesh))
    totals, memory, steps = _Totals(), None, None
    bar = progress_bar(progress, total=max_batches, desc=desc, unit="batch")
    for local in same_count_everywhere(batches):
        if max_batches is not None and totals.batches >= max_batches:
            break
        batch = shd.global_batch({k: np.asarray(local[k], dt) for k, dt in CONTRACT.items()}, mesh)
        b, l = batch["tokens"].shape
        if memory is None:
            if cfg.attention != "full" and l % cfg.segment_len:
                raise ValueError(f"batch length {l} is not a multiple of segment_len {cfg.segment_len}")
            shd.check_divisibility(mesh, num_heads=cfg.num_heads, batch_size=b)
            steps = subject.steps(b)
            memory = steps["init_memory"]()
        sums, memory = steps["eval"](subject.params, memory, batch, table_V)
        totals.add(jax.device_get(sums))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{totals.tot['nll'] / max(totals.tot['tokens'], 1):.4f}")
    if bar is not None:
        bar.close()
    return totals.result(has_bytes)


class Perplexity(Evaluator):
    """Streamed perplexity of `split` (see the module docstring): `batches` batches (None: until the data
    ends) of `batch_size` rows (None: train.batch_size), only the first `max_docs` documents (None: all);
    `knockout`: with every gate 0 (the memory read disabled)."""

    type = "perplexity"
    OPTIONS = dict(split="validation", batches=None, batch_size=None, max_docs=None, knockout=False)

    def run(self, subject: Subject, log=print) -> dict:
        from infini_jax.data import make_iterator

        o, config = self.options, subject.config
        bs = int(o["batch_size"] or config.train.batch_size)
        cfg = subject.model_cfg
        shd.check_divisibility(subject.mesh, num_heads=cfg.num_heads, batch_size=bs)
        data = dict(config.data.to_dict() if hasattr(config.data, "to_dict") else config.data)
        if o["batches"] is not None:  # every process exactly this many batches (padding after the data ends)
            data["num_batches"] = data["eval_batches"] = int(o["batches"])
        it = (subject.make_iterator or make_iterator)(
            data, seq_len=cfg.seq_len, batch_size=bs, split=o["split"], train=False,
            shard=shd.data_shard(subject.mesh, bs), segment_len=cfg.segment_len)
        target = subject.knocked_out() if o["knockout"] else subject
        res = evaluate_perplexity(target, limit_documents(it, o["max_docs"]), max_batches=o["batches"],
                                  progress=subject.progress, desc=self.name)
        bpb = f", {res['bits_per_byte']:.4f} bits/byte" if res["bits_per_byte"] is not None else ""
        log(f"{self.name}: loss {res['loss']:.4f} (ppl {res['ppl']:.3f}{bpb}), accuracy {res['accuracy']:.4f} "
            f"over {res['tokens']:,} tokens of {res['documents']} documents, every segment scored")
        return {self.name: res}

    def scalars(self, results: dict) -> dict:
        r = results[self.name]
        return {k: r[k] for k in ("loss", "ppl", "accuracy", "seq_accuracy", "tokens", "bits_per_byte")
                if r.get(k) is not None}
