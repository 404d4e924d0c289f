"""Scan vs parallel mode of infini_attention_sequence: forward+backward time on this machine.

    python benchmarks/attention_modes.py [--batch 2 --heads 8 --d_key 64 --segment_len 128 --segments 4,16,64]

Prints a markdown table. Times vary run to run on a shared CPU: compare the two modes within one run.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from infini_jax.attention import infini_attention_sequence


def bench(fn, *args, repeat=3):
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d_key", type=int, default=64)
    p.add_argument("--segment_len", type=int, default=128)
    p.add_argument("--segments", default="4,16,64")
    args = p.parse_args()
    print(f"backend={jax.default_backend()} B={args.batch} H={args.heads} d={args.d_key} N={args.segment_len}")
    print("| rule | segments | tokens | scan fwd+bwd (s) | parallel fwd+bwd (s) | scan/parallel |")
    print("|---|---|---|---|---|---|")
    for rule in ("linear", "delta"):
        for s in map(int, args.segments.split(",")):
            length = s * args.segment_len
            keys = jax.random.split(jax.random.PRNGKey(0), 3)
            shape = (args.batch, length, args.heads, args.d_key)
            q, k, v = (jax.random.normal(kk, shape) for kk in keys)
            gate = jnp.zeros((args.heads,))
            times = {}
            for mode in ("scan", "parallel"):
                def loss(q, k, v, mode=mode):
                    out, _ = infini_attention_sequence(q, k, v, gate, segment_len=args.segment_len,
                                                       rule=rule, mode=mode)
                    return jnp.sum(out ** 2)
                times[mode] = bench(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v)
            print(f"| {rule} | {s} | {length} | {times['scan']:.3f} | {times['parallel']:.3f} | "
                  f"{times['scan'] / times['parallel']:.2f} |")


if __name__ == "__main__":
    main()
