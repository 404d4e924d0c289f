"""Passkey retrieval sweep (`type="passkey"`): digit accuracy over prompt lengths × key depths, with the
memory and (knockout=True) without it. The prompts come from infini_jax.data.passkey.

For each length, every depth × trial is one row of a batch (they share the length, so the answer sits at the
same position in every row; rows are padded to a multiple of the mesh's batch devices). The prompt is streamed
through the model in chunks of `chunk_segments` segments; only the memory is kept between chunks, and the
loss (step.token_losses, through the Subject's token step) is read at the answer positions only, so a
1M-token prompt needs O(chunk × V) memory.
Token accuracy = teacher-forced argmax match on the answer tokens (the paper's token-level accuracy); digit
accuracy = the same on the answer tokens that hold digits (the leading space and any separator left out, so
chance is ~10%, not the free 1/6 the space gives); exact match = every answer token right. `haystack`
(data.passkey.Haystack) hides the key line in book prose instead of the paper's filler.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from infini_jax.evals.core import Evaluator, Subject, as_subject, global_rows, progress_bar


def answer_losses(steps: dict, params, memory, batch):
    """({"nll", "correct"} [rows, chunk] × loss_mask, memory) of one chunk: the Subject's token step."""
    return steps["token"](params, memory, batch)


@dataclasses.dataclass(frozen=True)
class PasskeyOptions:
    """How the cells of a sweep are built and run: `trials` passkeys of `n_digits` digits per (length, depth),
    seeded from `seed`; the prompt streamed `chunk_segments` segments at a time; the key line in the filler
    or (haystack: a data.passkey.Haystack) in book prose; `progress`: a bar per length."""

    trials: int = 1
    seed: int = 0
    chunk_segments: int = 16
    n_digits: int = 5
    haystack: Any = None
    progress: bool = False


def passkey_length(model_or_subject, tokenizer, length: int, depths: Sequence[float],
                   options: PasskeyOptions = PasskeyOptions()) -> list[dict]:
    """One passkey length at every depth (× options.trials), batched as rows; returns one dict per depth."""
    from infini_jax.data.passkey import PasskeyStream

    trials, seed = options.trials, options.seed
    subject = as_subject(model_or_subject, tokenizer)
    cfg = subject.model_cfg
    if cfg.attention == "full":
        raise ValueError("passkey streaming needs a model with segments (infini, xl or local), not 'full'")
    c = cfg.segment_len * max(1, int(options.chunk_segments))
    rows = [(d, t) for d in depths for t in range(trials)]
    streams = [PasskeyStream(tokenizer, length, d, seed=seed + 7919 * t + 104729 * i, n_digits=options.n_digits,
                             chunk_tokens=c, include_answer=True, haystack=options.haystack)
               for i, (d, t) in enumerate(rows)]
    total, a0 = streams[0].total_len, streams[0].answer_start
    n_ans = len(streams[0].answer_ids)
    if any(s.total_len != total or s.answer_start != a0 or len(s.answer_ids) != n_ans for s in streams):
        raise AssertionError("passkey rows of one length must share the layout")
    r = len(rows)
    r_pad = -(-r // subject.rows_multiple) * subject.rows_multiple  # padding rows: copies of row 0, ignored
    first, last = a0 - 1, a0 + n_ans - 2  # positions whose next-token prediction is an answer token
    answers_RA = np.stack([s.answer_ids for s in streams]).astype(np.int32)
    digits_RA = np.array([[any(ch.isdigit() for ch in tokenizer.decode([int(t)])) for t in row] for row in answers_RA])
    steps = subject.steps(r_pad)
    memory = steps["init_memory"]()
    match_RA = np.zeros((r, n_ans), bool)
    nll_R = np.zeros(r)
    bar = progress_bar(options.progress, total=-(-total // c), desc=f"passkey {length}", unit="chunk")
    t0 = time.time()
    for i, chunks in enumerate(zip(*streams)):
        start = i * c
        tokens_RC = np.full((r_pad, c), tokenizer.pad_id, np.int32)
        for row, chunk in enumerate(chunks):
            tokens_RC[row, :len(chunk)] = chunk
        tokens_RC[r:] = tokens_RC[0]
        lo, hi = max(first, start), min(last, start + c - 1)
        targets_RC = np.zeros((r_pad, c), np.int32)
        weight_RC = np.zeros((r_pad, c), np.float32)
        if lo <= hi:
            targets_RC[:r, lo - start:hi - start + 1] = answers_RA[:, lo - first:hi - first + 1]
            weight_RC[:r, lo - start:hi - start + 1] = 1.0
        batch = global_rows(dict(tokens=tokens_RC, targets=targets_RC, loss_mask=weight_RC,
                                 reset=np.zeros(r_pad, bool)), subject.mesh)
        losses, memory = answer_losses(steps, subject.params, memory, batch)
        if lo <= hi:  # only these positions leave the device
            got = jax.device_get(losses)
            match_RA[:, lo - first:hi - first + 1] = got["correct"][:r, lo - start:hi - start + 1] > 0
            nll_R += np.asarray(got["nll"][:r], np.float64).sum(1)
        if bar is not None:
            bar.update(1)
    jax.block_until_ready(memory)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    out = []
    for d in depths:
        idx = [i for i, (dd, _) in enumerate(rows) if dd == d]
        match = match_RA[idx]
        out.append({"length": int(length), "tokens": int(total), "depth": float(d), "trials": int(trials),
                    "token_accuracy": float(match.mean()), "exact_match": float(match.all(1).mean()),
                    "digit_accuracy": float(match[digits_RA[idx]].mean()),
                    "answer_token_accuracy": [float(a) for a in match.mean(0)],  # per answer position
                    "answer_nll": float(nll_R[idx].mean() / n_ans), "seconds": seconds,
                    "passkeys": [streams[i].passkey for i in idx]})
    return out


def passkey_sweep(model_or_subject, tokenizer, lengths: Sequence[int], depths: Sequence[float], **options) -> dict:
    """Grid of lengths × depths: {"lengths", "depths", "digit_accuracy" and "accuracy" (token accuracy), each
    [n_depths][n_lengths], "cells": [...], "haystack": folder or None}. options: PasskeyOptions's fields."""
    opts = PasskeyOptions(**options)
    subject = as_subject(model_or_subject, tokenizer)
    cells = []
    for length in lengths:
        cells += passkey_length(subject, tokenizer, int(length), depths, opts)

    def grid(key):
        return [[next(c[key] for c in cells if c["length"] == n and c["depth"] == d) for n in lengths]
                for d in depths]

    return {"lengths": [int(x) for x in lengths], "depths": [float(x) for x in depths], "trials": opts.trials,
            "digit_accuracy": grid("digit_accuracy"), "accuracy": grid("token_accuracy"), "cells": cells,
            "haystack": None if opts.haystack is None else opts.haystack.directory}


def format_passkey(sweep: dict) -> str:
    where = f" in the prose of {sweep['haystack']}" if sweep.get("haystack") else ""
    lines = [f"passkey digit accuracy (%){where}, {sweep['trials']} passkeys per cell, rows = depth, columns = length:",
             "  depth " + "".join(f"{n:>10}" for n in sweep["lengths"])]
    for d, row in zip(sweep["depths"], sweep["digit_accuracy"]):
        lines.append(f"  {d:>5.0%} " + "".join(f"{100 * a:>10.1f}" for a in row))
    secs = {c["length"]: c["seconds"] for c in sweep["cells"]}
    lines.append("  seconds per length (all depths batched): " + ", ".join(f"{n}: {s:.1f}" for n, s in secs.items()))
    return "\n".join(lines)


class Passkey(Evaluator):
    """Passkey digit accuracy at `lengths` tokens and at `x` × the training length (model seq_len), at
    `depths`, `trials` passkeys per cell (seed `seed`), streamed `chunk_segments` segments at a time, in the
    filler or in the prose of the books under `haystack`; `knockout` (attention='infini' only): also with
    the memory knocked out (every gate 0). Results: {name: sweep, name + "_knockout": sweep}."""

    type = "passkey"
    OPTIONS = dict(x=(), lengths=(), depths=(0.0, 0.5, 1.0), trials=10, knockout=True, seed=12345,
                   chunk_segments=16, haystack="")

    def lengths(self, model_cfg) -> list[int]:
        return [int(x * model_cfg.seq_len) for x in self.options["x"]] + [int(n) for n in self.options["lengths"]]

    def run(self, subject: Subject, log=print) -> dict:
        o, tok = self.options, subject.tokenizer
        lengths = self.lengths(subject.model_cfg)
        if not lengths:
            return {}
        haystack = o["haystack"] or None  # a folder of books, or a data.passkey.Haystack already read
        if isinstance(haystack, str):
            from infini_jax.data.passkey import Haystack

            haystack = Haystack(tok, haystack)
        kw = dict(trials=int(o["trials"]), seed=int(o["seed"]), chunk_segments=int(o["chunk_segments"]),
                  progress=subject.progress, haystack=haystack)
        depths = [float(d) for d in o["depths"]]
        out = {self.name: passkey_sweep(subject, tok, lengths, depths, **kw)}
        log(format_passkey(out[self.name]))
        if o["knockout"] and subject.model_cfg.attention == "infini":
            out[f"{self.name}_knockout"] = passkey_sweep(subject.knocked_out(), tok, lengths, depths, **kw)
            log("memory knocked out (every gate 0): " + format_passkey(out[f"{self.name}_knockout"]))
        return out

    def scalars(self, results: dict) -> dict:
        """Digit accuracy per length, averaged over depths: digits@LENGTH (and knockout_digits@LENGTH)."""
        out = {}
        for key, tag in ((self.name, "digits"), (f"{self.name}_knockout", "knockout_digits")):
            if key in results:
                sweep = results[key]
                acc = np.mean(np.asarray(sweep["digit_accuracy"]), axis=0)
                out.update({f"{tag}@{n}": float(a) for n, a in zip(sweep["lengths"], acc)})
        return out


def passkey_report(model_or_subject, tokenizer, options, *, log=print) -> dict:
    """A Passkey evaluator with `options` (the keys of config.evals.passkey) run on a model: the table train.py
    prints at the end of training. Returns {"passkey", "passkey_knockout"} ({} when no length is asked for)."""
    opts = dict(options.to_dict() if hasattr(options, "to_dict") else options)
    opts.pop("type", None)
    subject = dataclasses.replace(as_subject(model_or_subject, tokenizer), tokenizer=tokenizer)
    return Passkey("passkey", **opts).run(subject, log)
