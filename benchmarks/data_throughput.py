"""Train steps/s fed from books vs from synthetic tokens, with and without the prefetch thread (data.prefetch).

    python benchmarks/data_throughput.py [--config books] [--data_dir ../shared/corpus/pg19] [--tokenizer T.model]
        [--steps 30] [--config.section.key=value ...]
    python benchmarks/data_throughput.py --config tiny --config.data.passkey_haystack=../shared/corpus/pg19 \
        --config.data.passkey_shift=0                 # the passkey hidden in book prose

Runs the config's real jitted train step (one device) for --steps steps after a warm-up, fed by (a) one fixed
synthetic batch (no host work), (b) the real text pipeline on the training thread (prefetch 0) and (c) the same
pipeline prefetched on Grain's background thread (prefetch 2). Also times the pipeline alone (host ms per
batch). A SentencePiece --tokenizer makes the host work realistic (PG19 books take ~0.27 s each to tokenise);
the model's vocab_size follows the tokenizer. All rows come from one process, so their ratios are the result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infini_jax import optim as optim_lib  # noqa: E402
from infini_jax import sharding as shd  # noqa: E402
from infini_jax import step as T  # noqa: E402
from infini_jax.config import apply_overrides, load_config  # noqa: E402
from infini_jax.data import load_tokenizer, make_iterator  # noqa: E402
from infini_jax.model import ModelConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="books")
    p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pg19"))
    p.add_argument("--tokenizer", default="", help="default: the config's")
    p.add_argument("--steps", type=int, default=30)
    a, overrides = p.parse_known_args()
    shd.choose_platform()  # no libtpu start-up noise on a CPU host
    config = load_config(a.config)
    config.data.data_dir = a.data_dir
    config = apply_overrides(config, overrides)  # --config.section.key=value, one-line errors
    if a.tokenizer:
        config.data.tokenizer = a.tokenizer
        config.model.vocab_size = load_tokenizer(a.tokenizer).vocab_size
    model_cfg = ModelConfig.from_dict(config.model)
    bs, L = int(config.train.batch_size), model_cfg.seq_len
    mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx, lr_fn, _ = optim_lib.make_optimizer(dict(config.optim), 1000)
    graphdef, state, state_sh, _ = T.create_train_state(model_cfg, tx, mesh, seed=0)
    step = T.make_train_step(graphdef, optim_lib.Optimizer(tx, lr_fn), mesh=mesh, state_shardings=state_sh)

    def pipeline(prefetch):
        return make_iterator(dict(config.data.to_dict(), prefetch=prefetch), seq_len=L, batch_size=bs,
                             split="train", segment_len=model_cfg.segment_len)

    synthetic = next(pipeline(0))
    print(f"backend {jax.default_backend()}; config {a.config}, tokenizer {config.data.tokenizer}, batch {bs} x {L}, "
          f"{a.steps} steps per row")
    it = pipeline(0)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        next(it)
    print(f"pipeline alone: {1e3 * (time.perf_counter() - t0) / a.steps:.1f} ms per batch (host)")
    print("| fed by | steps/s | vs synthetic |\n|---|---:|---:|")
    base = None
    for name, source in (("synthetic (one fixed batch)", None), ("pipeline, prefetch 0 (training thread)", 0),
                         ("pipeline, prefetch 2 (Grain thread)", 2)):
        it = None if source is None else pipeline(source)
        batches = (lambda: synthetic) if it is None else (lambda: next(it))
        for _ in range(2):  # warm-up (compile, thread start)
            state, m = step(state, shd.global_batch(batches(), mesh))
        jax.block_until_ready(m["loss"])
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, m = step(state, shd.global_batch(batches(), mesh))
        jax.block_until_ready(m["loss"])
        rate = a.steps / (time.perf_counter() - t0)
        base = base or rate
        print(f"| {name} | {rate:.2f} | {rate / base:.2f} |", flush=True)
        if it is not None and hasattr(it, "close"):
            it.close()


if __name__ == "__main__":
    main()
