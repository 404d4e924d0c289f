"""Context parallelism on a TPU slice, read from the compiled HLO: which collectives a train step runs, over
which mesh axes, and how many bytes, at two sequence lengths.

    python benchmarks/context_collectives.py                      # pg19 model, v5e-8, data=2 × context=4
    python benchmarks/context_collectives.py --lengths 32768,131072 --rules linear,delta --out results.md

No TPU is needed: the real train step (infini_jax/aot.py) is compiled ahead of time for a TPU topology with
libtpu on this CPU host, one row of `length` tokens per data shard. Every collective instruction of the
compiled program is listed once (an async start/continue/done triple counts once), with the mesh axes of its
replica groups and the bytes of its result. `per step` multiplies by how often it runs: the trip counts of the
loops around it (the scan over layers; forward and backward are separate loops), read from each loop's
condition. Context parallelism should add only collectives over `context` whose size does not depend on the
length: per layer, an all_gather of every device's memory totals, B·G·K·(V+1) float32 numbers per device
(delta: B·G·K, then B·G·K·(K+V)), and in the backward pass the matching all-reduce of their cotangents.
Needs libtpu (pip install "jax[tpu]"). Each compile takes minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import time
from collections import defaultdict

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1, "f16": 2, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(f32|bf16|s32|u32|pred|f16|s8|u8|f64|s64)\[([\d,]*)\]")


def _bytes(shape_text: str) -> int:
    return sum(DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(shape_text))


def _groups(line: str) -> list[tuple[int, ...]]:
    """The replica groups of one collective, in any of XLA's three spellings."""
    m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line)
    if m:
        return [tuple(int(x) for x in g.split(",") if x) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:  # iota: arange(prod(dims)).reshape(dims).transpose(perm).reshape(groups)
        shape, dims = [int(x) for x in m.group(1).split(",")], [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return [tuple(r) for r in ids.reshape(shape)]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
    if m:  # mesh['axis_0'=2,...] {'axis_0',...}: groups vary over the named axes
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        inner = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        outer = [i for i in range(len(sizes)) if i not in inner]
        return [tuple(r) for r in ids.transpose(outer + inner).reshape(-1, math.prod(sizes[i] for i in inner))]
    return []


def mesh_axes_of(groups, mesh) -> str:
    """Which mesh axes a set of replica groups spans (device ids are positions in the mesh's device order)."""
    if not groups:
        return "?"
    pos = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    names = [n for n in mesh.axis_names if mesh.shape[n] > 1]
    want = {frozenset(g) for g in groups}
    for r in range(1, len(names) + 1):
        for combo in itertools.combinations(names, r):
            idx = [mesh.axis_names.index(n) for n in combo]
            rest = [i for i in range(pos.ndim) if i not in idx]
            got = {frozenset(g) for g in pos.transpose(rest + idx).reshape(-1, math.prod(pos.shape[i] for i in idx))}
            if got == want:
                return "+".join(combo)
    return "other"


def collectives(hlo: str, mesh) -> list[dict]:
    """One row per collective instruction (async triples once), with how often it runs per step."""
    comp, comps = None, defaultdict(list)
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            comp = m.group(1)
        elif comp:
            comps[comp].append(line)
    calls = defaultdict(list)  # callee -> [(caller, multiplier)]
    sites = defaultdict(list)  # callee -> names of the instructions that call it
    for name, lines in comps.items():
        for line in lines:
            for callee in re.findall(r"calls=%([\w.\-]+)", line):
                sites[callee].append(line.split("=")[0].strip())
            m = re.search(r"condition=%([\w.\-]+), body=%([\w.\-]+)", line)
            if m:
                consts = [int(c) for ln in comps[m.group(1)]  # the loop bound: the condition's constant
                          for c in re.findall(r"s32\[\](?:\{[^}]*\})? constant\((\d+)\)", ln)]
                calls[m.group(2)].append((name, max(consts) if consts else 1))
                calls[m.group(1)].append((name, 1))
            for callee in re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)", line):
                calls[callee].append((name, 1))
    entry = next(n for n in comps if n.startswith("main"))
    memo = {entry: 1}

    def runs(name, seen=()):
        if name not in memo:
            memo[name] = sum(m * runs(c, seen + (name,)) for c, m in calls[name] if c not in seen) or 1
        return memo[name]

    rows = []
    for name, lines in comps.items():
        if name.startswith("async_collective_fusion") or any("done" in site for site in sites[name]):
            continue  # the continuation and done halves of an async collective: counted at its start
        for line in lines:
            m = _INSTR.match(line)
            if not m or m.group(3).removesuffix("-start") not in COLLECTIVES:
                continue
            shape = m.group(2)
            rows.append(dict(op=m.group(3).removesuffix("-start"), axes=mesh_axes_of(_groups(line), mesh),
                             shape=" ".join(f"{dt}[{d}]" for dt, d in _ARRAY.findall(shape)),
                             bytes=_bytes(shape), runs=runs(name)))
    return rows


def compile_step(spec: str, topology: str, mesh_cfg: dict, length: int, overrides: list[str]):
    from infini_jax import aot, sharding

    config = aot.load_config(spec, overrides)
    seg = config.model.segment_len
    rows_per_step = mesh_cfg.get("data", 1) * mesh_cfg.get("fsdp", 1)
    config.model.n_segments = length // seg
    config.train.batch_size = rows_per_step
    for k, v in mesh_cfg.items():
        config.mesh[k] = v
    devices, _ = aot.topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    t0 = time.perf_counter()
    jitted, args, _ = aot.lower_train_step(config, mesh)
    compiled = jitted.lower(*args).compile()
    return compiled.as_text(), mesh, config, time.perf_counter() - t0


def table(results: dict, lengths: list[int]) -> str:
    """results[(rule, length)] = rows; one line per distinct (rule, op, axes, shape), columns per length."""
    head = (["rule", "collective", "mesh axes", "result shape"] + [f"{n // 1024}K: count × runs/step" for n in lengths]
            + ["bytes each"] + [f"{n // 1024}K: bytes/step" for n in lengths])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rules = sorted({r for r, _ in results}, key=["linear", "delta"].index)
    for rule in rules:
        keys = []
        for n in lengths:
            for row in results[(rule, n)]:
                k = (row["op"], row["axes"], row["shape"], row["bytes"])
                if k not in keys:
                    keys.append(k)
        keys.sort(key=lambda k: ("context" not in k[1], k[1], -k[3]))
        for op, axes, shape, nbytes in keys:
            counts, per_step = [], []
            for n in lengths:
                hits = [r for r in results[(rule, n)]
                        if (r["op"], r["axes"], r["shape"], r["bytes"]) == (op, axes, shape, nbytes)]
                runs = sorted({r["runs"] for r in hits})
                counts.append(f"{len(hits)} × {'/'.join(map(str, runs))}" if hits else "–")
                per_step.append(f"{sum(r['runs'] * r['bytes'] for r in hits):,}" if hits else "–")
            out.append(f"| {rule} | {op} | {axes} | {shape} | " + " | ".join(counts) + f" | {nbytes:,} | "
                       + " | ".join(per_step) + " |")
        for label, pick in (("**total over context alone** (the memory prefix)", lambda ax: ax == "context"),
                            ("**total, every collective**", lambda ax: True)):
            sums = [sum(r["runs"] * r["bytes"] for r in results[(rule, n)] if pick(r["axes"])) for n in lengths]
            out.append(f"| {rule} | {label} | | | " + " | ".join("" for _ in lengths) + " | | "
                       + " | ".join(f"**{s:,}**" for s in sums) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="pg19", help="a config name; rule is set from --rules")
    p.add_argument("--topology", default="v5e-8")
    p.add_argument("--mesh", default="data=2,fsdp=1,context=4,tensor=1")
    p.add_argument("--lengths", default="32768,131072", help="tokens per row")
    p.add_argument("--rules", default="linear,delta")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value")
    p.add_argument("--out", default="", help="also write the table (markdown) here")
    a = p.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    mesh_cfg = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(","))}
    lengths = [int(x) for x in a.lengths.split(",")]
    results, info = {}, []
    for rule in a.rules.split(","):
        for n in lengths:
            hlo, mesh, config, secs = compile_step(f"{a.config}:rule={rule}", a.topology, mesh_cfg, n, a.set)
            results[(rule, n)] = collectives(hlo, mesh)
            info.append(f"{rule} {n} tokens: compiled in {secs:.0f} s")
            print(info[-1], flush=True)
    m = config.model
    g = m.num_kv_heads or m.num_heads
    text = (f"{a.config} ({m.num_layers} layers, {m.num_heads} heads × {m.head_dim}, {g} KV heads, segment "
            f"{m.segment_len}, {m.dtype}), {a.topology}, mesh {dict(mesh.shape)}, one row of each length per data "
            f"shard ({jax.__version__}, libtpu AOT)\n\n" + table(results, lengths))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
