"""Language modelling on books: infini (linear, delta) vs Transformer-XL vs local attention, plus full
attention at the training length, with equal parameters, data, tokens and steps (the books config).

    python experiments/books_lm.py --out runs/books                       # train every model, then evaluate
    python experiments/books_lm.py --out runs/books --eval_only \
        --config.data.data_dir=DIR --split test                           # any folder of books, trained models
    python experiments/books_lm.py --out runs/books --models xl --train_only   # train some, evaluate later

Evaluation (bits per byte, exact for byte tokens):
  * `whole book`: every book streamed window after window with the memory (XL: the cache) carried from its
    first byte to its last; full attention sees one training window at a time;
  * `32K windows`: the same books cut into independent 32,768-token windows (the paper's Table 2 setting),
    the memory reset at each window start.
Writes OUT/results.json, OUT/books_lm.md (the table, and bits per byte by offset within a segment: a
segment's first bytes have no local context, only the memory or XL's cache; and by segment position in the
book), OUT/segment_curves.png (loss by segment position in the document, all models in one figure) and
OUT/gates_<model>.png (the infini models' gates).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"infini_linear": "attention=infini,rule=linear", "infini_delta": "attention=infini,rule=delta",
          "xl": "attention=xl", "local": "attention=local", "full": "attention=full"}
WINDOW_32K = 32768


def config_for(name: str, overrides: list[str]):
    from infini_jax.configs.books import get_config

    from infini_jax.config import apply_overrides

    return apply_overrides(get_config(MODELS[name]), overrides)  # --config.section.key=value


def reset_every(batches, windows: int):
    """Marks a reset every `windows` windows of a document: independent chunks of windows × seq_len tokens."""
    count = None
    for batch in batches:
        reset = np.asarray(batch["reset"], bool)
        count = np.zeros(len(reset), int) if count is None else np.where(reset, 0, count + 1)
        yield dict(batch, reset=reset | (count % windows == 0))


def evaluate_model(config, workdir: Path, split: str, max_docs, batch_size: int) -> dict:
    from infini_jax import evals as ev
    from infini_jax.data import load_tokenizer, make_iterator
    from infini_jax.model import gate_values

    model, info = ev.load_model(config, workdir=workdir)
    tok = load_tokenizer(config.data.tokenizer)
    cfg = model.cfg
    out = {"step": info["step"]}

    def batches():
        it = make_iterator(config.data, seq_len=cfg.seq_len, batch_size=batch_size, split=split, train=False)
        return ev.limit_documents(it, max_docs)

    whole = ev.evaluate_perplexity(model, batches(), tokenizer=tok)
    chunked = ev.evaluate_perplexity(model, reset_every(batches(), max(1, WINDOW_32K // cfg.seq_len)), tokenizer=tok)
    out.update(whole_book=whole["bits_per_byte"], windows_32k=chunked["bits_per_byte"], bytes=whole["bytes"],
               documents=whole["documents"], segment_curve=whole["segment_curve"],
               segment_curve_32k=chunked["segment_curve"], offset_curve=whole["offset_curve"])
    if cfg.attention == "infini":
        out["gates"] = np.asarray(gate_values(model)).tolist()
    return out


def binned(curve: dict, n_bins: int = 24) -> dict:
    """Token-weighted mean loss in log-spaced bins of segment index (two books give a very noisy raw curve)."""
    seg, loss, tok = (np.asarray(curve[k], float) for k in ("segment", "loss", "tokens"))
    edges = np.unique(np.round(np.geomspace(1, seg.max() + 2, n_bins + 1)).astype(int)) - 1
    idx = np.clip(np.searchsorted(edges, seg, side="right") - 1, 0, len(edges) - 2)
    w = np.bincount(idx, tok, len(edges) - 1)
    keep = w > 0
    mean = np.bincount(idx, loss * tok, len(edges) - 1)[keep] / w[keep]
    mid = np.sqrt(np.maximum(edges[:-1], 1) * edges[1:])[keep]
    return {"segment": mid.tolist(), "loss": (mean / np.log(2)).tolist(), "tokens": w[keep].tolist()}


def offset_bins(curve: dict) -> list:
    """Bits per byte (byte tokens) at offsets 0, 1-3, 4-15 and 16-end within a segment (full attention: within
    each segment-sized slice of its window): token-weighted means of the offset curve."""
    loss, tok = np.asarray(curve["loss"]), np.asarray(curve["tokens"], float)
    edges = [0, 1, 4, 16, len(loss)]
    return [float((loss[a:b] * tok[a:b]).sum() / tok[a:b].sum() / np.log(2)) for a, b in zip(edges, edges[1:])]


POSITION_BINS = ((0, 1), (1, 10), (10, 100), (100, 1000), (1000, 5000), (5000, None))


def position_bins(curve: dict) -> list:
    """Bits per byte by segment position in the book (POSITION_BINS, segment indices; token-weighted), None for
    a bin no book reaches: whether a model's loss falls with position, next to the others'."""
    seg, loss, tok = (np.asarray(curve[k], float) for k in ("segment", "loss", "tokens"))
    out = []
    for a, b in POSITION_BINS:
        m = (seg >= a) & (seg < (np.inf if b is None else b))
        out.append(float((loss[m] * tok[m]).sum() / tok[m].sum() / np.log(2)) if tok[m].sum() else None)
    return out


def plot(results: dict, out: Path) -> None:
    from infini_jax import plots

    split0 = results["splits"][-1]
    names = [n for n in results["models"] if split0 in results["models"][n]]
    fig_path = plots.segment_curve_plot({n: binned(results["models"][n][split0]["segment_curve"]) for n in names},
                                        out / "segment_curves.png",
                                        title=f"Loss by segment position in the book ({split0}, log-spaced bins)",
                                        ylabel="bits per byte", log_x=True)
    for n in names:
        if "gates" in results["models"][n][split0]:
            plots.gate_plot(results["models"][n][split0]["gates"], out / f"gates_{n}.png", title=f"Gates, {n}")
    print(f"wrote {fig_path}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/books")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--split", default="validation,test")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--train_only", action="store_true", help="train the models, evaluate none (e.g. to train "
                   "them one invocation at a time, then evaluate all with --eval_only)")
    p.add_argument("--plot_only", action="store_true", help="redo the table and figures from OUT/results.json")
    p.add_argument("--max_docs", type=int, default=None)
    p.add_argument("--eval_batch", type=int, default=2, help="rows streamed at once (one book each); more rows "
                   "than books only adds padding")
    a, overrides = p.parse_known_args()
    from infini_jax.sharding import choose_platform

    choose_platform()  # no libtpu start-up noise on a CPU host
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unknown arguments {bad}")
    if a.train_only and a.eval_only:
        p.error("--train_only and --eval_only exclude each other: give one")
    from infini_jax.loop import train_and_evaluate

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.plot_only:
        return report(json.loads((out / "results.json").read_text()), out)
    names = a.models.split(",")
    results = {"models": {}, "overrides": overrides, "splits": a.split.split(",")}
    for name in names:
        config = config_for(name, overrides)
        if not a.eval_only:
            t0 = time.time()
            train_and_evaluate(config, out / name, progress=False)
            results["models"].setdefault(name, {})["train_seconds"] = round(time.time() - t0, 1)
            print(f"{name}: trained in {time.time() - t0:.0f} s", flush=True)
    if a.train_only:
        return
    for name in names:
        config = config_for(name, overrides)
        for split in results["splits"]:
            r = evaluate_model(config, out / name, split, a.max_docs, a.eval_batch)
            results["models"].setdefault(name, {})[split] = r
            print(f"{name} {split}: whole book {r['whole_book']:.4f} bits/byte, 32K windows {r['windows_32k']:.4f} "
                  f"({r['documents']} books, {r['bytes']:,} bytes)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, out)


def report(results: dict, out: Path) -> None:
    """Writes OUT/books_lm.md (printed too) and the figures from `results` (results.json's content)."""
    names, splits = list(results["models"]), results["splits"]
    lines = ["| model | " + " | ".join(f"{s} whole book | {s} 32K windows" for s in splits) + " |",
             "|---|" + "---:|---:|" * len(splits)]
    for name in names:
        m = results["models"][name]
        lines.append(f"| {name} | " + " | ".join(f"{m[s]['whole_book']:.4f} | {m[s]['windows_32k']:.4f}"
                                                 for s in splits) + " |")
    split = splits[-1]
    lines += ["", f"bits per byte by offset within a segment ({split}, whole book; full attention: within each "
              "segment-sized slice of its window, so only one offset-0 byte in n_segments starts a window)", "",
              "| model | 0 | 1-3 | 4-15 | 16-end |", "|---|---:|---:|---:|---:|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in
                                                 offset_bins(results["models"][name][split]["offset_curve"])) + " |")
    heads = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" if b else f"{a}+" for a, b in POSITION_BINS]
    lines += ["", f"bits per byte by segment position in the book ({split}, whole book)", "",
              "| model | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in
                                                 position_bins(results["models"][name][split]["segment_curve"])) + " |")
    table = "\n".join(lines)
    (out / "books_lm.md").write_text(f"bits per byte (lower is better); {','.join(splits)}\n\n{table}\n")
    print(table)
    plot(results, out)


if __name__ == "__main__":
    main()
