"""Streaming decode: prefill and generation tokens/s, and peak RSS at a short vs a very long prompt.

    python benchmarks/decode_throughput.py [--lengths 16384,1048576] [--new_tokens 2048] [--repeats 3] [--chunk_segments 64]
        [--attention infini] [--rule linear] [--batch 1] [--d_model 64] [--layers 2] [--heads 4] [--head_dim 16]
        [--d_ff 256] [--segment 32] [--vocab 259]

Defaults are the tiny config's shape before c2514f2 (d_ff 256; now 64) (random weights: speed does not depend on them). Each prompt length runs
in a subprocess of its own, so that one run's peak RSS (resource.getrusage ru_maxrss, the whole process:
Python, JAX, compiled code, the prompt itself) cannot hide the other's. In each: warm-up (every compiled shape
once, on a short prompt), then the timed prefill of the random prompt (infini_jax.generate.prefill), then the
timed compiled loop of --new_tokens greedy tokens from that cache, each the median of --repeats runs (prefill:
one run above 2^17 tokens). Also, at the short length, the per-token segment recompute that generation did
before the KV cache (one segment forward per new token, a Python call each), for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infini_jax import generate as G  # noqa: E402
from infini_jax.model import InfiniTransformer, ModelConfig  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _loop(model, cache, logits, n):
    graphdef, params = nnx.split(model)
    out, count, _ = G._decode_loop(graphdef, params, cache, logits, jax.random.PRNGKey(0), (n, 0.0, 1.0, None, False))
    return jax.block_until_ready(out)


def _recompute_tok_s(model, batch: int, n: int) -> float:
    """Tokens/s of the replaced path: each new token reran the whole current (padded) segment."""
    S = model.cfg.segment_len
    graphdef, params = nnx.split(model)

    @jax.jit
    def seg_step(params, memory, seg_bs, pos):
        logits_bsv, new_memory = nnx.merge(graphdef, params)(seg_bs, memory)
        return jnp.argmax(logits_bsv[:, pos], -1), new_memory

    memory, seg = model.init_memory(batch), np.ones((batch, S), np.int32)
    jax.block_until_ready(seg_step(params, memory, seg, 0))
    t0 = time.perf_counter()
    for i in range(n):
        tok, end_memory = seg_step(params, memory, seg, i % S)
        seg[:, (i + 1) % S] = np.asarray(tok)
        memory = end_memory if i % S == S - 1 else memory
    return n / (time.perf_counter() - t0)


def child(args) -> dict:
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                      head_dim=args.head_dim, d_ff=args.d_ff, segment_len=args.segment, attention=args.attention,
                      rule=args.rule, remat=False)
    model = InfiniTransformer(cfg, rngs=nnx.Rngs(0))
    S, B, k = cfg.segment_len, args.batch, args.chunk_segments
    warm = np.ones((B, (k + 2) * S - 3), np.int32)  # compiles both chunk shapes, the tail and the loop
    _loop(model, *G.prefill(model, warm, chunk_segments=k)[::-1], args.new_tokens)
    rss_warm = _rss_mb()
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (B, args.child), dtype=np.int32)
    prefill_s, gen_s = [], []
    for _ in range(args.repeats if args.child <= 2 ** 17 else 1):  # one timed prefill of a long prompt
        t0 = time.perf_counter()
        logits, cache = G.prefill(model, prompt, chunk_segments=k)
        jax.block_until_ready(logits)
        prefill_s.append(time.perf_counter() - t0)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        _loop(model, cache, logits, args.new_tokens)
        gen_s.append(time.perf_counter() - t0)
    prefill_s, gen_s = statistics.median(prefill_s), statistics.median(gen_s)
    res = dict(length=args.child, prefill_tok_s=B * args.child / prefill_s, prefill_s=prefill_s,
               gen_tok_s=B * args.new_tokens / gen_s, rss_warm_mb=rss_warm, rss_peak_mb=_rss_mb())
    if args.recompute:
        res["recompute_tok_s"] = B * _recompute_tok_s(model, B, min(args.new_tokens, 256))
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="16384,1048576")
    p.add_argument("--new_tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk_segments", type=int, default=64)
    p.add_argument("--attention", default="infini")
    p.add_argument("--rule", default="linear")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=259)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=16)
    p.add_argument("--d_ff", type=int, default=256)
    p.add_argument("--segment", type=int, default=32)
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for i, n in enumerate(lengths):
        extra = ["--recompute"] if i == 0 else []
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(n), *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    kind = f"{args.attention} ({args.rule})" if args.attention == "infini" else args.attention
    print(f"{kind}, d_model {args.d_model}, {args.layers} layers, {args.heads} heads x "
          f"{args.head_dim}, segment {args.segment}, batch {args.batch}, {args.new_tokens} new tokens, "
          f"chunk {args.chunk_segments} segments; {jax.devices()[0].device_kind}\n")
    print("| prompt tokens | prefill tok/s | prefill s | generate tok/s | RSS after warm-up (MB) | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']:,} | {r['prefill_tok_s']:,.0f} | {r['prefill_s']:.1f} | {r['gen_tok_s']:,.0f} | "
              f"{r['rss_warm_mb']:.0f} | {r['rss_peak_mb']:.0f} |")
    ratio = rows[-1]["rss_peak_mb"] / rows[0]["rss_peak_mb"]
    print(f"\npeak RSS {rows[-1]['length']:,} / {rows[0]['length']:,} tokens: {ratio:.3f} (goal <= 1.10)")
    if "recompute_tok_s" in rows[0]:
        r = rows[0]
        print(f"generation with the KV cache: {r['gen_tok_s']:,.0f} tok/s; per-token segment recompute (the path it "
              f"replaced): {r['recompute_tok_s']:,.0f} tok/s ({r['gen_tok_s'] / r['recompute_tok_s']:.1f}x)")


if __name__ == "__main__":
    main()
