"""Tokens per second of the real jitted train step (create_train_state + make_train_step, one device).

    python benchmarks/train_throughput.py [--attention infini,xl,local,full] [--rule delta] [--batch 4]
        [--seq_len 2048] [--segment 256] [--d_model 256] [--layers 4] [--heads 4] [--head_dim 64] [--d_ff 682]

Defaults are the sizes of issue 8's comparison with the PyTorch peer (vocab 256). Each attention kind is
timed as the median of --steps steps after --warmup steps (compile excluded), all in one process, so the
ratios between rows are the numbers to read. Random tokens; loss on every token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infini_jax import optim as optim_lib  # noqa: E402
from infini_jax import sharding as shd  # noqa: E402
from infini_jax import train as T  # noqa: E402
from infini_jax.model import ModelConfig  # noqa: E402


def time_steps(model_cfg: ModelConfig, batch: int, steps: int, warmup: int) -> float:
    mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx, lr_fn, _ = optim_lib.make_optimizer(dict(name="adamw", lr=1e-3, warmup_steps=10), 1000)
    graphdef, state, state_sh, _ = T.create_train_state(model_cfg, tx, mesh, seed=0)
    step = T.make_train_step(graphdef, tx, lr_fn, mesh=mesh, state_shardings=state_sh)
    rng = np.random.default_rng(0)
    L = model_cfg.seq_len
    seq = rng.integers(3, model_cfg.vocab_size, (batch, L + 1)).astype(np.int32)
    data = shd.global_batch({"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((batch, L), np.float32),
                             "reset": np.ones((batch,), bool)}, mesh)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--attention", default="infini,xl,local,full")
    p.add_argument("--rule", default="delta")
    p.add_argument("--mode", default="scan")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--segment", type=int, default=256)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=682)
    p.add_argument("--remat_segments", default="1", help="comma list of 1/0: jax.checkpoint per infini segment")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); batch {a.batch} x {a.seq_len}, "
          f"segment {a.segment}, d_model {a.d_model}, {a.layers} layers, {a.heads} x {a.head_dim} heads")
    print("| attention | remat_segments | step (s, median) | tokens/s |\n|---|---|---:|---:|")
    for att in a.attention.split(","):
        for remat in [bool(int(x)) for x in a.remat_segments.split(",")] if att == "infini" else [True]:
            cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                              head_dim=a.head_dim, d_ff=a.d_ff, segment_len=a.segment,
                              n_segments=a.seq_len // a.segment, attention=att, rule=a.rule, mode=a.mode,
                              remat=False, remat_segments=remat)
            t = time_steps(cfg, a.batch, a.steps, a.warmup)
            print(f"| {att} | {remat if att == 'infini' else '-'} | {t:.4f} | {a.batch * a.seq_len / t:,.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
