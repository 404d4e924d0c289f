"""Scan vs parallel mode of infini_attention_sequence: forward and forward+backward time on this machine.

    python benchmarks/attention_modes.py [--batch 2 --heads 8 --d_key 64 --shapes 4x128,16x128,64x64,256x32]

Each shape is segments x segment_len. Both rules, both modes (the scan with jax.checkpoint per segment, as the
model runs it by default), jitted; each row is the median of --repeat calls after compiling, the two modes
called in turn (A/B) so that load on a shared machine hits both alike. Prints a markdown table: read the
scan/parallel ratio (> 1: parallel is faster).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infini_jax.attention import SequenceOptions, infini_attention_sequence  # noqa: E402
from infini_jax.sharding import choose_platform  # noqa: E402


def timed_ab(fns: dict, args, repeat: int) -> dict:
    """Median seconds per call of each function, compiled first, then called in turn."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d_key", type=int, default=64)
    p.add_argument("--shapes", default="4x128,16x128,64x64,256x32", help="segments x segment_len, comma list")
    p.add_argument("--rules", default="linear,delta")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    choose_platform()  # no libtpu start-up noise on a CPU host
    print(f"backend={jax.default_backend()} B={args.batch} H={args.heads} d_key=d_value={args.d_key}")
    print("| rule | segments × length | tokens | scan fwd (s) | parallel fwd (s) | fwd scan/parallel "
          "| scan fwd+bwd (s) | parallel fwd+bwd (s) | fwd+bwd scan/parallel |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for rule in args.rules.split(","):
        for shape in args.shapes.split(","):
            n_seg, seg = (int(x) for x in shape.split("x"))
            length = n_seg * seg
            keys = jax.random.split(jax.random.PRNGKey(0), 3)
            q, k, v = (jax.random.normal(kk, (args.batch, length, args.heads, args.d_key)) for kk in keys)
            gate = jnp.zeros((args.heads,))

            def loss(q, k, v, mode, rule=rule, seg=seg):
                out, _ = infini_attention_sequence(q, k, v, gate, SequenceOptions(seg, rule, mode))
                return jnp.sum(out ** 2)

            fwd = {m: jax.jit(lambda q, k, v, m=m: loss(q, k, v, m)) for m in ("scan", "parallel")}
            bwd = {m: jax.jit(jax.grad(lambda q, k, v, m=m: loss(q, k, v, m), argnums=(0, 1, 2)))
                   for m in ("scan", "parallel")}
            tf, tb = timed_ab(fwd, (q, k, v), args.repeat), timed_ab(bwd, (q, k, v), args.repeat)
            print(f"| {rule} | {n_seg} × {seg} | {length} | {tf['scan']:.4f} | {tf['parallel']:.4f} | "
                  f"{tf['scan'] / tf['parallel']:.2f} | {tb['scan']:.4f} | {tb['parallel']:.4f} | "
                  f"{tb['scan'] / tb['parallel']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
