"""Tokens/s and MFU of the real jitted train step (create_train_state + make_train_step, one device), per
attention kind, against the PyTorch peer at the same sizes, and per-token time as the input grows.

    python benchmarks/train_throughput.py [--attention infini,xl,local,full] [--rule delta] [--batch 4]
        [--seq_len 2048] [--segment 256] [--d_model 256] [--layers 4] [--heads 4] [--head_dim 64] [--d_ff 682]
        [--mode scan,parallel] [--peer] [--scaling 4096,65536 --scaling_segment 512] [--devices 1,2]

Defaults are the sizes of issue 8's comparison with the PyTorch peer (vocab 256, delta rule, full BPTT through
every segment, AdamW). Every row is the median of --steps steps after --warmup (compile excluded), all in one
process: the ratios between rows are the numbers to read (this machine is shared and noisy).

MFU = model FLOPs per step / step time / peak, the peak being a float32 1024³ jitted matmul measured in the same
process. Model FLOPs count matmuls only, 2·m·n·k each, forward × 3 (forward + backward), no recompute:
projections 2·d·(q + 2·kv + o dims), the segment's attention scores and values over all N keys (causal halves
not subtracted; XL: 2N keys; full: all L), the memory read and write (2·k·v per head and token each, the delta
read once more), the gated FFN 3 · 2·d·d_ff, and the logits 2·d·vocab.

--devices 1,2 times each infini row on a data mesh of 1 and of 2 devices: on a CPU the script splits the host
into that many devices first (train.cpu_devices), the batch is sharded over them and MFU is still against the one
matmul peak of device 0.

--profile DIR traces 3 steps of each jax row with jax.profiler (a Perfetto trace under DIR) and prints where the
op time goes: the summed duration of XLA's ops by kind (the op name without its number, e.g. ynn_fusion for
YNNPACK's matmul fusions, transpose_copy_fusion), as a share of all op time. Ops run on several threads at once,
so the sum exceeds the wall time; the shares are what to read. The traced steps are not the timed ones.

--peer (needs `pip install -e ".[bench]"`: torch CPU and infini-transformer-pytorch 0.2.1) times the peer at the
same sizes, alternating one step of each, with its wrapper's `detach_mems_every_num_segments` above the number of
segments so both backpropagate through every segment. The peer's gate is inverted relative to eq. 10
(it weights the memory by 1 − sigmoid(β)): the same cost, a different parametrisation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infini_jax import optim as optim_lib  # noqa: E402
from infini_jax import sharding as shd  # noqa: E402
from infini_jax import step as T  # noqa: E402
from infini_jax.model import ModelConfig  # noqa: E402


def matmul_peak(n: int = 1024, reps: int = 10) -> float:
    """float32 FLOP/s of one jitted n³ matmul on this device (median of reps)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def model_flops(cfg: ModelConfig, batch: int) -> float:
    """Analytic matmul FLOPs of one train step (see the module docstring)."""
    d, h, k, N, L = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.segment_len, cfg.seq_len
    g = cfg.num_kv_heads or h
    keys = {"infini": N, "local": N, "xl": 2 * N, "full": L}[cfg.attention]
    per_token = 2 * d * k * (2 * h + 2 * g)  # q, k, v, o projections
    per_token += 2 * 2 * h * k * keys  # scores and values
    if cfg.attention == "infini":
        per_token += 2 * 2 * h * k * k * (3 if cfg.rule == "delta" else 2)  # read, write (+ delta read)
    per_token += 3 * 2 * d * cfg.d_ff
    per_token = cfg.num_layers * per_token + 2 * d * cfg.vocab_size
    return 3.0 * per_token * batch * L


def jax_stepper(model_cfg: ModelConfig, batch: int, devices: int = 1):
    """A function running one real train step (blocking) on a data mesh of `devices`, compiled ahead, and the
    compiled step's temporary (activation) bytes per device from XLA's memory analysis."""
    mesh = shd.make_mesh(dict(data=devices, fsdp=1, tensor=1), jax.devices()[:devices])
    tx, lr_fn, _ = optim_lib.make_optimizer(dict(name="adamw", lr=1e-3, warmup_steps=10), 1000)
    graphdef, state, state_sh, _ = T.create_train_state(model_cfg, tx, mesh, seed=0)
    step = T.make_train_step(graphdef, optim_lib.Optimizer(tx, lr_fn), mesh=mesh, state_shardings=state_sh)
    L = model_cfg.seq_len
    seq = np.random.default_rng(0).integers(3, model_cfg.vocab_size, (batch, L + 1)).astype(np.int32)
    data = shd.global_batch({"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((batch, L), np.float32),
                             "reset": np.ones((batch,), bool)}, mesh)
    compiled = step.lower(state, data).compile()
    box = {"state": state}

    def run():
        box["state"], metrics = compiled(box["state"], data)
        jax.block_until_ready(metrics["loss"])
    return run, compiled.memory_analysis().temp_size_in_bytes


def peer_stepper(a, batch: int):
    """One step of lucidrains' infini-transformer-pytorch 0.2.1 at the same sizes (AdamW, full BPTT)."""
    import torch
    from infini_transformer_pytorch import InfiniTransformer, InfiniTransformerWrapper

    torch.manual_seed(0)
    model = InfiniTransformer(num_tokens=a.vocab, dim=a.d_model, depth=a.layers, dim_head=a.head_dim, heads=a.heads,
                              use_mem_delta_rule=a.rule == "delta")
    wrapper = InfiniTransformerWrapper(model, segment_length=a.segment,
                                       detach_mems_every_num_segments=a.seq_len // a.segment + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seq = torch.randint(0, a.vocab, (batch, a.seq_len + 1))

    def run():
        wrapper(seq, backward=True)
        opt.step()
        opt.zero_grad()
    return run


def timed(fns: dict, steps: int, warmup: int) -> dict:
    """Median seconds per call of each function, calling them in turn (A/B alternation)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def op_profile(run, trace_dir: Path, steps: int = 3, top: int = 8) -> list:
    """[(op kind, share of the summed op time)] of `steps` calls of `run` under jax.profiler (module doc)."""
    import collections
    import gzip
    import json
    import re

    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(steps):
            run()
    trace = json.load(gzip.open(sorted(trace_dir.rglob("perfetto_trace.json.gz"))[-1]))
    kinds = collections.Counter()
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and not name.startswith("$") and "::" not in name:
            kinds[re.sub(r"\.\d+$", "", name)] += e["dur"]  # XLA ops only: no Python frames, no runtime spans
    total = sum(kinds.values())
    return [(k, t / total) for k, t in kinds.most_common(top)]


def config(a, attention: str, seq_len: int, segment: int, remat: bool = True, mode: str = "scan") -> ModelConfig:
    return ModelConfig(vocab_size=a.vocab, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                       head_dim=a.head_dim, d_ff=a.d_ff, segment_len=segment, n_segments=seq_len // segment,
                       attention=attention, rule=a.rule, mode=mode, remat=False, remat_segments=remat)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--attention", default="infini,xl,local,full")
    p.add_argument("--rule", default="delta")
    p.add_argument("--mode", default="scan", help="comma list of scan/parallel (infini rows)")
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
    p.add_argument("--peer", action="store_true", help="also time the PyTorch peer (the bench extra)")
    p.add_argument("--scaling", default="", help="comma list of input lengths for the per-token scaling table")
    p.add_argument("--scaling_segment", type=int, default=512)
    p.add_argument("--devices", default="1", help="comma list of data-mesh sizes for the infini rows (CPU: "
                   "the host is split into the largest)")
    p.add_argument("--profile", default="", help="trace dir: also print each jax row's op time by kind")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    shd.choose_platform()  # no libtpu start-up noise on a CPU host
    device_counts = [int(x) for x in a.devices.split(",")]
    if max(device_counts) > 1:
        shd.set_cpu_devices(max(device_counts))
    peak = matmul_peak()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); batch {a.batch} x {a.seq_len}, "
          f"segment {a.segment}, d_model {a.d_model}, {a.layers} layers, {a.heads} x {a.head_dim} heads, "
          f"d_ff {a.d_ff}, vocab {a.vocab}, rule {a.rule}, mode {a.mode}; float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    fns, flops, temp = {}, {}, {}
    for att in a.attention.split(","):
        variants = [(m, bool(int(r)), n) for m in a.mode.split(",") for r in a.remat_segments.split(",")
                    for n in device_counts] if att == "infini" else [("scan", True, 1)]
        for mode, remat, n in variants:
            name = f"infini-jax {att}" + (f" ({mode}, remat_segments={remat}" + (f", {n} devices" if n > 1 else "")
                                          + ")" if att == "infini" else "")
            cfg = config(a, att, a.seq_len, a.segment, remat, mode)
            (fns[name], temp[name]), flops[name] = jax_stepper(cfg, a.batch, n), model_flops(cfg, a.batch)
    if a.peer:
        fns["peer (infini-transformer-pytorch)"] = peer_stepper(a, a.batch)
        flops["peer (infini-transformer-pytorch)"] = model_flops(config(a, "infini", a.seq_len, a.segment), a.batch)
    times = timed(fns, a.steps, a.warmup)
    ref = times.get("peer (infini-transformer-pytorch)")
    local = times.get("infini-jax local")
    print("| step | s (median) | tokens/s | MFU | vs peer | vs local | temp MiB |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, t in times.items():
        vs_peer = f"{ref / t:.2f}×" if ref else "-"
        vs_local = f"{t / local:.2f}" if local else "-"
        mib = f"{temp[name] / 2**20:,.0f}" if name in temp else "-"
        print(f"| {name} | {t:.3f} | {a.batch * a.seq_len / t:,.0f} | {flops[name] / t / peak:.0%} | {vs_peer} | "
              f"{vs_local} | {mib} |", flush=True)
    if a.profile:
        for i, (name, run) in enumerate((n, f) for n, f in fns.items() if n.startswith("infini-jax")):
            shares = op_profile(run, Path(a.profile) / f"row{i}")
            print(f"\nop time by kind, {name}: " + ", ".join(f"{k} {v:.0%}" for k, v in shares), flush=True)
    if a.scaling:
        lengths = [int(x) for x in a.scaling.split(",")]
        fns = {n: jax_stepper(config(a, "infini", n, a.scaling_segment), 1)[0] for n in lengths}
        times = timed(fns, a.steps, a.warmup)
        print(f"\nper-token time, infini, batch 1, segment {a.scaling_segment}:\n"
              "| input tokens | step s | tokens/s | per-token time vs the first row |\n|---:|---:|---:|---:|")
        first = times[lengths[0]] / lengths[0]
        for n in lengths:
            print(f"| {n:,} | {times[n]:.3f} | {n / times[n]:,.0f} | {times[n] / n / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
