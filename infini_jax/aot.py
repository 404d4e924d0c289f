"""Ahead-of-time TPU compiles on a CPU host: does a config fit a pod, and how many FLOPs is a step?

    infini-aot --config pg19:rule=delta --topology v5e-32          (or python -m infini_jax.aot ...)
    infini-train --config booksum_8b:stage=finetune --compile_only --topology v5p-128

No TPU is needed: libtpu (`pip install "jax[tpu]"`) describes the topology
(jax.experimental.topologies.get_topology_desc), the real train step is lowered with abstract
ShapeDtypeStructs carrying the NamedShardings of infini_jax/sharding.py, and XLA:TPU compiles it. An
out-of-memory shows up as a compile error; otherwise `memory_analysis()` gives the per-chip bytes and
`cost_analysis()` the per-chip FLOPs of the step.

Topology names: the Cloud TPU accelerator types. v5e-N / v6e-N count chips (2-D: v5e-16 = 4x4,
v5e-32 = 4x8); v4-N / v5p-N count TensorCores, two per chip (3-D: v5p-8 = 2x2x1 = 4 chips, v5p-128 = 4x4x4
= 64 chips). A raw libtpu name ("v5e:4x4", "v5p:2x2x1") is accepted too.

Analytical FLOPs (`analytic_flops`), per token of the forward pass, with L layers, d = d_model, H heads,
G KV heads, K = head_dim, F = d_ff, V = vocab, S = segment_len, T = input length:
    matmuls      2 · [L · (2·d·H·K + 2·d·G·K + m·d·F) + d·V]       m = 3 (gated FFN) or 2 (plain)
    local attn   L · 4·S·H·K     (QKᵀ and AV over the whole S×S block: the causal half is not skipped)
                 xl: L · 4·2S·H·K;  full: L · 4·T·H·K
    memory       L · 4·H·K²      (σ(Q)M read + σ(K)ᵀV write; delta rule: L · 6·H·K², it also reads σ(K)M)
A training step is 3 forward passes (forward + backward = 2×) = the "6·N·tokens" convention plus the
attention terms; remat recomputes one more forward, so the compiled count is expected near 4/3 of it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from typing import Optional

# Before libtpu is loaded: no metadata-server lookups on a non-TPU host, and do not fail when another
# process (e.g. a test run probing for TPUs) holds /tmp/libtpu_lockfile; AOT compiles use no device.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

GiB = 1024 ** 3
# HBM per chip (Cloud TPU system architecture pages).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
_LIBTPU_NAME = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}


def _shape_3d(chips: int) -> tuple[int, int, int]:
    """v4/v5p slice shapes: 4 chips = 2x2x1, then doubling the smallest dimension (2x2x2, 2x2x4, 2x4x4,
    4x4x4, 4x4x8, ...), the shapes Cloud TPU offers."""
    if chips < 4 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: a v4/v5p slice has 4·2^k chips")
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = min(range(3), key=lambda j: (shape[j], -j))
        shape[i] *= 2
    return shape[0], shape[1], shape[2]


def parse_topology(name: str) -> dict:
    """'v5p-8' / 'v5e-16' / 'v5e:4x4' → {generation, libtpu_name, chips, bounds, wrap, host_bounds, hbm_bytes}."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
    raw = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", name)
    if m:
        gen, n = m.group(1), int(m.group(2))
        if n % _CORES_PER_CHIP[gen]:
            raise ValueError(f"{name}: {gen}-N counts TensorCores ({_CORES_PER_CHIP[gen]} per chip)")
        chips = n // _CORES_PER_CHIP[gen]
        if gen in ("v5e", "v6e"):
            if chips not in _SHAPES_2D:
                raise ValueError(f"{name}: no {gen} slice of {chips} chips; valid: {sorted(_SHAPES_2D)}")
            dims = _SHAPES_2D[chips]
        else:
            dims = _shape_3d(chips)
    elif raw:
        gen, dims = raw.group(1), tuple(int(x) for x in raw.group(2).split("x"))
    else:
        raise ValueError(f"unknown TPU topology {name!r}: use e.g. v5e-16, v5e-32, v5p-8, v5p-128, v4-8, "
                         "v6e-8 or a libtpu name like v5e:4x4")
    dims3 = tuple(dims) + (1,) * (3 - len(dims))
    host = tuple(min(a, b) for a, b in zip(dims3, (2, 2, 1)))  # 4-chip hosts (2x2) in multi-host slices
    # Wrap-around links: v4/v5p slices of whole 4x4x4 cubes are tori; v5e/v6e slices are not.
    wrap = (gen in ("v4", "v5p") and min(dims3) >= 4,) * 3
    return dict(generation=gen, libtpu_name=f"{_LIBTPU_NAME[gen]}:{'x'.join(map(str, dims))}",
                chips=math.prod(dims3), bounds=dims3, host_bounds=host, wrap=wrap, hbm_bytes=HBM_BYTES[gen])


def topology_devices(name: str) -> tuple[list, dict]:
    """The (abstract) TPU devices of a topology, one per chip (v4/v5p megacore), and its description."""
    from jax.experimental import topologies

    info = parse_topology(name)
    chip_config = "megacore" if info["generation"] == "v4" else "default"
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=info["libtpu_name"], chip_config_name=chip_config,
        chips_per_host_bounds=info["host_bounds"], num_slices=1, wrap=info["wrap"])
    devices = list(desc.devices)
    if len(devices) != info["chips"]:
        raise RuntimeError(f"{name}: libtpu gave {len(devices)} devices for {info['chips']} chips")
    info["device_kind"] = devices[0].device_kind
    return devices, info


# ---------------------------------------------------------------------------------------------------------
# Analytical FLOPs


def analytic_flops(cfg, tokens: int) -> dict:
    """Forward FLOPs per token (matmul / attention / memory parts) and the training-step totals for
    `tokens` tokens (see the module docstring for the formula)."""
    d, h, g, k, f, v = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    n_layers, s = cfg.num_layers, cfg.segment_len
    m = 3 if cfg.mlp == "gated" else 2
    matmul_params = n_layers * (2 * d * h * k + 2 * d * g * k + m * d * f) + d * v
    span = {"infini": s, "local": s, "xl": 2 * s, "full": cfg.seq_len}[cfg.attention]
    attention = n_layers * 4 * span * h * k
    memory = n_layers * (6 if cfg.rule == "delta" else 4) * h * k * k if cfg.attention == "infini" else 0
    fwd = 2 * matmul_params + attention + memory
    return dict(matmul_params=matmul_params, fwd_per_token=fwd, matmul_fwd_per_token=2 * matmul_params,
                attention_fwd_per_token=attention, memory_fwd_per_token=memory,
                train_flops=3 * fwd * tokens, train_flops_remat=(4 if cfg.remat else 3) * fwd * tokens)


# ---------------------------------------------------------------------------------------------------------
# The train step, lowered abstractly


def abstract_batch(batch_size: int, seq_len: int, mesh) -> dict:
    """The contract batch as ShapeDtypeStructs sharded over the batch mesh axes."""
    from infini_jax import sharding

    shapes = dict(tokens=((batch_size, seq_len), jnp.int32), targets=((batch_size, seq_len), jnp.int32),
                  loss_mask=((batch_size, seq_len), jnp.float32), reset=((batch_size,), jnp.bool_))
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh, len(shape)))
            for k, (shape, dt) in shapes.items()}


def lower_train_step(config, mesh):
    """(jitted train step, abstract (state, batch), parameter count): infini_jax.step's real step, with
    the TrainState shardings of create_train_state(init=False) (nothing is allocated)."""
    from infini_jax import optim as optim_lib
    from infini_jax import step as train_lib

    model_cfg, train, optim = train_lib.validate_config(config, process_count=1)
    accum = int(optim["grad_accum"])
    train_lib.check_mesh(mesh, model_cfg, int(train["batch_size"]), accum)
    optimizer = optim_lib.make_optimizer(optim, int(train["steps"]))
    graphdef, _, state_sh, abstract_state = train_lib.create_train_state(model_cfg, optimizer.tx, mesh, init=False)
    step = train_lib.make_train_step(graphdef, optimizer, mesh=mesh, state_shardings=state_sh, grad_accum=accum)
    batch = abstract_batch(int(train["batch_size"]), model_cfg.seq_len, mesh)
    return step, (abstract_state, batch), count_of(abstract_state.params)


def lower_eval_step(config, mesh):
    """(jitted eval step, abstract (params, memory, batch, byte table), parameter count): the eval step of
    eval.py and in-training evaluation (step.make_eval_step: the memory streamed), with the param and memory
    shardings on `mesh`; eval batch = train.batch_size rows of seq_len tokens."""
    from infini_jax import sharding, step

    model_cfg, train, _ = step.validate_config(config, process_count=1)
    bs = int(train["batch_size"])
    step.check_mesh(mesh, model_cfg, bs)
    amodel = step.abstract_model(model_cfg)
    param_sh = sharding.param_shardings(amodel, mesh)
    memory = jax.eval_shape(lambda: amodel.init_memory(bs))
    mem_sh = sharding.memory_shardings(mesh, memory)
    eval_step = step.make_eval_step(step.param_graphdef(model_cfg), mesh=mesh, param_shardings=param_sh,
                                    memory_shardings=mem_sh)
    from flax import nnx

    shapes = nnx.to_pure_dict(nnx.state(amodel, nnx.Param))
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_sh)
    memory = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), memory, mem_sh)
    table = jax.ShapeDtypeStruct((model_cfg.vocab_size,), jnp.int32, sharding=sharding.replicated(mesh))
    batch = abstract_batch(bs, model_cfg.seq_len, mesh)
    return eval_step, (params, memory, batch, table), count_of(params)


def count_of(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def compile_for_topology(config, topology: str, *, step: str = "train", verbose: bool = False) -> dict:
    """Lowers and compiles the train step (step="train") or the eval step ("eval") of `config` for
    `topology` on this (CPU) host; returns the per-chip memory (bytes), whether it fits the chip's HBM, and
    compiled vs analytical FLOPs (an eval step is one forward: a third of a train step's)."""
    from infini_jax import sharding
    from infini_jax.config import model_config

    cfg = model_config(config)
    devices, info = topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    t0 = time.perf_counter()
    if step not in ("train", "eval"):
        raise ValueError(f"step={step!r}: 'train' or 'eval'")
    jitted, args, n_params = (lower_train_step if step == "train" else lower_eval_step)(config, mesh)
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = info["chips"]
    tokens = config.train.batch_size * cfg.seq_len
    flops = analytic_flops(cfg, tokens)
    m = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
    total = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
    report = dict(
        topology=topology, libtpu_name=info["libtpu_name"], device_kind=info["device_kind"], chips=n,
        mesh=dict(mesh.shape), params=n_params, batch_size=config.train.batch_size, seq_len=cfg.seq_len,
        num_layers=cfg.num_layers, dtype=cfg.dtype, remat=cfg.remat,
        **{f"{k}_bytes": v for k, v in m.items()},
        peak_bytes=int(getattr(mem, "peak_memory_in_bytes", 0) or 0),
        total_bytes=total, hbm_bytes=info["hbm_bytes"], fits=total <= info["hbm_bytes"],
        compiled_flops_per_chip=float(cost.get("flops", float("nan"))),
        analytic_flops_per_chip=flops["train_flops"] / n / (1 if step == "train" else 3),
        analytic_flops_remat_per_chip=(flops["train_flops_remat"] if step == "train" else flops["train_flops"] / 3) / n,
        step=step,
        lower_seconds=t1 - t0, compile_seconds=t2 - t1,
    )
    report["flops_ratio"] = report["compiled_flops_per_chip"] / report["analytic_flops_per_chip"]
    if verbose:
        print(format_report(report))
    return report


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    return "\n".join([
        f"{r.get('step', 'train')} step on {r['topology']} ({r['libtpu_name']}, {r['chips']} × {r['device_kind']}), "
        f"mesh {r['mesh']}",
        f"  model: {r['params'] / 1e6:.1f}M params, {r['num_layers']} layers, batch {r['batch_size']} × "
        f"{r['seq_len']} tokens, compute {r['dtype']}, remat {r['remat']}",
        f"  per chip: arguments {gib(r['argument_bytes'])}, outputs {gib(r['output_bytes'])} "
        f"(aliased {gib(r['alias_bytes'])}), temporaries {gib(r['temp_bytes'])}, code "
        f"{gib(r['generated_code_bytes'])}",
        f"  total {gib(r['total_bytes'])} of {gib(r['hbm_bytes'])} HBM → {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"  FLOPs per chip per step: compiled {r['compiled_flops_per_chip']:.3e}, analytical "
        f"{r['analytic_flops_per_chip']:.3e} (×{r['flops_ratio']:.2f}; with remat "
        f"{r['analytic_flops_remat_per_chip']:.3e})",
        f"  lower {r['lower_seconds']:.1f} s, compile {r['compile_seconds']:.1f} s",
    ])


def load_config(spec: str, overrides: Optional[list[str]] = None):
    """`NAME[:arg]` or `path/to/config.py[:arg]` → ConfigDict, then `section.key=value` overrides, typed and
    checked as the CLIs' --config.section.key=value (config.apply_overrides)."""
    from infini_jax import config as config_lib

    return config_lib.apply_overrides(config_lib.load_config(spec), [f"--config.{o}" for o in overrides or []])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="NAME[:arg] (pg19:rule=delta) or path/to/config.py[:arg]")
    parser.add_argument("--topology", required=True, help="v5e-16, v5e-32, v5p-8, v5p-128, v4-8, ...")
    parser.add_argument("--set", action="append", default=[], metavar="section.key=value",
                        help="override a config value, e.g. --set model.num_layers=4")
    parser.add_argument("--json", default="", help="also write the report to this JSON file")
    parser.add_argument("--step", default="train", choices=("train", "eval"),
                        help="the train step, or the eval step of eval.py / in-training evaluation")
    a = parser.parse_args(argv)
    # Arrays of the abstract trace live on the host CPU; libtpu is used only as the compiler. (Before any
    # backend is initialised: on a CPU host JAX would otherwise probe for a TPU first.)
    jax.config.update("jax_platforms", "cpu")
    report = compile_for_topology(load_config(a.config, a.set), a.topology, step=a.step)
    if a.json:  # first: the printout below may go to a closed pipe
        import json

        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    print(format_report(report), flush=True)


if __name__ == "__main__":
    main()
