"""Memory read after 2^20 tokens: default vs HIGHEST matmul precision, against a float64 NumPy reference.

    python benchmarks/memory_precision.py [--tokens 1048576] [--segment 2048] [--heads 2] [--dim 64]

Writes random keys/values of a long input into one compressive memory (attention.update, linear and delta
rules, one segment at a time) and reads it with fresh queries, once with the memory einsums at
Precision.DEFAULT and once at Precision.HIGHEST (infini-jax's setting, attention.MEMORY_PRECISION). The error
of each read is compared with the float64 reference (same inputs, NumPy) and with the size of ONE token's
contribution to the read, the signal a passkey leaves at that length. On a CPU both precisions are exact
float32; on a TPU the default rounds float32 operands to bfloat16, on recent GPUs to TF32. Also times both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infini_jax import attention as A  # noqa: E402


def run(precision, rule, k_snhk, v_snhv, q_nhk):
    A.MEMORY_PRECISION = precision  # read at trace time: each jit below traces anew

    @jax.jit
    def write_all(k_snhk, v_snhv):
        s, n, h, d = k_snhk.shape
        memory = A.init_memory(1, h, d, v_snhv.shape[-1])

        def body(st, kv):
            return A.update(st, kv[0][None], kv[1][None], rule), None

        return jax.lax.scan(body, memory, (k_snhk, v_snhv))[0]

    read = jax.jit(lambda st, q: A.retrieve(st, q[None])[0])
    memory = jax.block_until_ready(write_all(k_snhk, v_snhv))
    t0 = time.perf_counter()
    memory = jax.block_until_ready(write_all(k_snhk, v_snhv))
    seconds = time.perf_counter() - t0
    return np.asarray(read(memory, q_nhk), np.float64), seconds


def reference(rule, k_snhk, v_snhv, q_nhk):
    sig = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))  # noqa: E731
    s, n, h, d = k_snhk.shape
    M, z = np.zeros((h, d, v_snhv.shape[-1])), np.zeros((h, d))
    one = None
    for i in range(s):
        sk = sig(k_snhk[i].astype(np.float64))  # [N, H, K]
        v = v_snhv[i].astype(np.float64)
        if rule == "delta" and i:
            v = v - np.einsum("nhk,hkv->nhv", sk, M) / np.maximum(np.einsum("nhk,hk->nh", sk, z), 1e-6)[..., None]
        M += np.einsum("nhk,nhv->hkv", sk, v)
        z += sk.sum(0)
    sq = sig(q_nhk.astype(np.float64))
    den = np.einsum("nhk,hk->nh", sq, z)
    out = np.einsum("nhk,hkv->nhv", sq, M) / den[..., None]
    # one token's contribution to the read: σ(q)·σ(k_t) v_t / σ(q) z, for the first token written
    sk0 = sig(k_snhk[0, 0].astype(np.float64))  # [H, K]
    one = np.abs(np.einsum("nhk,hk->nh", sq, sk0)[..., None] * v_snhv[0, 0].astype(np.float64)[None] / den[..., None])
    return out, float(np.mean(one))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2**20)
    p.add_argument("--segment", type=int, default=2048)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=64)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    s = a.tokens // a.segment
    k = rng.standard_normal((s, a.segment, a.heads, a.dim), np.float32)
    v = rng.standard_normal((s, a.segment, a.heads, a.dim), np.float32)
    q = rng.standard_normal((a.queries, a.heads, a.dim), np.float32)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {s * a.segment:,} tokens, "
          f"segment {a.segment}, {a.heads} heads x {a.dim}")
    print(f"| rule | precision | max abs read error | mean abs error / one token's contribution | write time (s) |")
    print("|---|---|---:|---:|---:|")
    for rule in ("linear", "delta"):
        ref, one = reference(rule, k, v, q)
        for name, prec in (("DEFAULT", jax.lax.Precision.DEFAULT), ("HIGHEST", jax.lax.Precision.HIGHEST)):
            out, secs = run(prec, rule, jnp.asarray(k), jnp.asarray(v), jnp.asarray(q))
            err = np.abs(out - ref)
            print(f"| {rule} | {name} | {err.max():.3e} | {err.mean() / one:.3g} | {secs:.3f} |", flush=True)


if __name__ == "__main__":
    main()
