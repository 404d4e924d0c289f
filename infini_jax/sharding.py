"""Device mesh and the one table from logical axes to mesh axes.

Mesh axes, in order: data, fsdp, (context), tensor. `config.mesh` gives their sizes; -1 means "whatever
devices are left" (at most one -1). `context` is optional (None = not in the mesh): context parallelism,
the sequence ("length") split over it in whole segments, the Infini-attention memory prefix exchanged
between its devices (infini_jax/context.py). The batch arrives split over the batch axes only (each device
of a context group holds its rows' token ids, 12 bytes a token); the activations are split along the
sequence from the embedding on, and the loss is taken chunk by chunk within each device's part.

The axes use AxisType.Auto: jit in/out shardings with NamedSharding and XLA's propagation in between
(jax 0.10's make_mesh defaults to Explicit, which would make sharding part of every array's type).

Every parameter names its dimensions with logical axes (model.py `axes` metadata); `RULES` maps each to a
mesh axis (or a tuple of mesh axes, or None). One dimension falls back to replication when its size does
not divide the mesh axes (e.g. vocab 259 over tensor=2, or kv_heads=1 under multi-query); a mesh axis is
never used twice in one PartitionSpec. The mistakes that would silently waste the mesh are errors before
compiling: num_heads not divisible by the tensor axis, the batch not divisible by data × fsdp, and the
segments of a sequence not divisible by the context axis.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from infini_jax import attention as attn
from infini_jax import baselines
from infini_jax.axes import RULES, _axis_size, _present, logical_to_spec  # noqa: F401  (the one rules table)
from infini_jax.model import key_path

MESH_AXES = ("data", "fsdp", "context", "tensor")
REQUIRED_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

log = logging.getLogger(__name__)


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """{axis: size} in MESH_AXES order; resolves one -1; errors name the config keys. An axis set to None
    (the base config's `context`) is not in the mesh."""
    cfg = {k: v for k, v in (mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg).items() if v is not None}
    unknown = sorted(set(cfg) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown config.mesh keys {unknown}; valid keys: {list(MESH_AXES)}")
    missing = [a for a in REQUIRED_AXES if a not in cfg]
    if missing:
        raise ValueError(f"config.mesh is missing {missing} (sizes; -1 = remaining devices)")
    sizes = {a: int(cfg[a]) for a in MESH_AXES if a in cfg}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"config.mesh {sizes}: {n_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices, have {n_devices}")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The device mesh of config.mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    names = tuple(sizes)
    try:
        return jax.make_mesh(tuple(sizes.values()), names, axis_types=(AxisType.Auto,) * len(names),
                             devices=devices)
    except Exception:  # device objects without a physical topology (e.g. some AOT topologies)
        arr = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
        return Mesh(arr, names, axis_types=(AxisType.Auto,) * len(names))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_logical_axes(abstract_model) -> dict:
    """Pure dict (same structure as the params) of each nnx.Param's `axes` metadata tuple, as a leaf."""
    _, state = nnx.split(abstract_model, nnx.Param)
    out = {}
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]:
        axes = var.get_metadata().get("axes")
        if axes is None:
            raise ValueError(f"param {key_path(path)} has no `axes` metadata")
        node = out
        keys = [k.key for k in path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = _Leaf(tuple(axes))
    return out


class _Leaf:
    """Wraps a tuple so jax.tree treats it as one leaf."""

    def __init__(self, value):
        self.value = value


def check_divisibility(mesh: Mesh, *, num_heads: int, batch_size: Optional[int] = None,
                       n_segments: Optional[int] = None) -> None:
    """The errors to raise before compiling (see the module docstring)."""
    context = _axis_size(mesh, _present(mesh, RULES["length"]))
    if n_segments is not None and n_segments % context:
        raise ValueError(f"model.n_segments={n_segments} is not divisible by the mesh context axis ({context}): "
                         "each device must hold whole segments; set model.n_segments to a multiple of it "
                         "or change config.mesh.context")
    tensor = _axis_size(mesh, _present(mesh, RULES["heads"]))
    if num_heads % tensor:
        raise ValueError(f"model.num_heads={num_heads} is not divisible by the mesh tensor axis ({tensor}); "
                         "change config.mesh.tensor or the number of heads")
    if batch_size is not None:
        data = _axis_size(mesh, _present(mesh, RULES["batch"]))
        if batch_size % data:
            raise ValueError(f"batch size {batch_size} is not divisible by the mesh batch axes "
                             f"{RULES['batch']} = {data} devices; change train.batch_size or config.mesh")


def param_shardings(abstract_model, mesh: Mesh, rules: Mapping[str, Any] = RULES) -> dict:
    """NamedSharding per parameter, a pure dict matching nnx.to_pure_dict(nnx.state(model, nnx.Param))."""
    cfg = abstract_model.cfg
    check_divisibility(mesh, num_heads=cfg.num_heads, n_segments=cfg.n_segments if cfg.attention != "full" else None)
    axes = param_logical_axes(abstract_model)
    shapes = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    return jax.tree.map(
        lambda a, s: NamedSharding(mesh, logical_to_spec(a.value, s.shape, mesh, rules)),
        axes, shapes, is_leaf=lambda x: isinstance(x, _Leaf))


def opt_state_shardings(opt_state_shapes, params_shapes, params_shardings, mesh: Mesh):
    """NamedSharding per optimizer-state leaf: a leaf whose key path ends with a parameter's key path
    takes that parameter's sharding when shapes are equal, or that sharding minus the dropped dimension
    for Adafactor's factored row/column statistics; everything else (counts, scalars) is replicated."""
    by_path = {}
    for (path, shape), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(params_shapes)[0],
                                      jax.tree_util.tree_flatten_with_path(params_shardings)[0]):
        by_path[tuple(key_path(path).split("/"))] = (tuple(shape.shape), sh.spec)
    max_len = max((len(p) for p in by_path), default=0)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        keys = tuple(key_path(path).split("/"))
        shape = tuple(getattr(leaf, "shape", ()))
        for n in range(min(max_len, len(keys)), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is None:
                continue
            pshape, spec = hit
            spec = tuple(spec) + (None,) * (len(pshape) - len(spec))
            if shape == pshape:
                return NamedSharding(mesh, P(*spec))
            if len(shape) == len(pshape) - 1:  # factored statistics: one dimension reduced away
                for d in range(len(pshape) - 1, -1, -1):
                    if pshape[:d] + pshape[d + 1:] == shape:
                        return NamedSharding(mesh, P(*(spec[:d] + spec[d + 1:])))
            return replicated
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state_shapes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over the batch mesh axes, everything else replicated (valid for any rank >= 1; `ndim` is
    accepted for readability only)."""
    del ndim
    return NamedSharding(mesh, P(_present(mesh, RULES["batch"])))


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any]) -> dict:
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


# Logical axes of the memory (model.init_memory), mapped through the same RULES as the params.
MEMORY_AXES = attn.MemoryState(M=("batch", "kv_heads", "key", "value"), z=("batch", "kv_heads", "key"))
XL_CACHE_AXES = baselines.XLCache(x=("batch", "length", "act_embed"), valid=("batch",))


def memory_shardings(mesh: Mesh, memory):
    """Shardings of the per-layer memory: MemoryState M [B,G,K,V], z [B,G,K] and XLCache x [B,N,D],
    valid [B] (G = key/value heads): rows over the batch axes, heads over tensor (RULES)."""
    def spec(x, logical):
        return NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh, name="memory"))

    def layer(s, lead=()):
        if isinstance(s, attn.MemoryState):
            return attn.MemoryState(*(spec(x, lead + ax) for x, ax in zip(s, MEMORY_AXES)))
        if isinstance(s, baselines.XLCache):
            return baselines.XLCache(*(spec(x, lead + ax) for x, ax in zip(s, XL_CACHE_AXES)))
        return jax.tree.map(lambda x: spec(x, lead + ("batch",) + (None,) * (x.ndim - 1 - len(lead))), s)

    if isinstance(memory, (attn.MemoryState, baselines.XLCache)):  # model.scan_layers: stacked [layers, ...]
        return layer(memory, ("layers",))
    return tuple(layer(s) for s in memory)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_shard(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """(index, count) of the block of global batch rows this process feeds: the data iterator's shard
    (data.make_iterator(shard=...)). Equal to (process_index, process_count) when the batch axes span
    the processes in order; processes that hold the same rows (a tensor axis across hosts) get the same
    index, so they read the same data."""
    idx_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    spans = [(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in idx_map.values()]
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = np.zeros(batch_size, bool)
    for a, b in spans:
        covered[a:b] = True
    if not covered[lo:hi].all() or batch_size % (hi - lo):
        raise ValueError(f"this process's devices hold batch rows {sorted(set(spans))}: not one contiguous block; "
                         "order the mesh so the batch axes are outermost across processes")
    return lo // (hi - lo), batch_size // (hi - lo)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, batch_size: Optional[int] = None) -> dict:
    """Per-process numpy batch (this process's block of rows, see data_shard) -> global jax.Arrays
    sharded over the batch axes. `batch_size`: the global batch (default: rows × number of data shards)."""
    rows = len(next(iter(local_batch.values())))
    if batch_size is None:
        batch_size = rows * data_shard(mesh, rows * jax.process_count())[1] if jax.process_count() > 1 else rows
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(v),
                                                      (batch_size,) + np.shape(v)[1:])
            for k, v in local_batch.items()}


def choose_platform() -> None:
    """On a host with no accelerator, keeps JAX from initialising libtpu (the `tpu` extra installs it for
    ahead-of-time TPU compiles), which prints ~6 lines of TPU_WORKER_HOSTNAMES errors on every start. Call it
    before JAX's first use of a device. TPU VMs (/dev/accel*, /dev/vfio/N), GPU hosts and an explicit
    JAX_PLATFORMS are left alone. AOT compiles for a TPU topology still work on CPU after it."""
    import glob

    if os.environ.get("JAX_PLATFORMS") or any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*",
                                                                      "/dev/nvidia[0-9]*")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def set_cpu_devices(n: int) -> None:
    """config.train.cpu_devices: for n > 0, JAX's CPU backend becomes n devices (JAX's own `jax_num_cpu_devices`),
    so that on a CPU-only host the data axis runs n shards of the batch side by side on the cores (small models
    leave a core idle otherwise). Call it before JAX's first use of a device; accelerator backends ignore it.
    An explicit XLA_FLAGS=--xla_force_host_platform_device_count=N (a simulated mesh) wins over it."""
    if n <= 0:
        return
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        print(f"note: train.cpu_devices={n} not applied: XLA_FLAGS sets the CPU device count")
        return
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError:  # backends already started (an in-process caller): keep what they have
        print(f"note: train.cpu_devices={n} not applied: JAX's devices were already in use")


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *, force: bool = False) -> bool:
    """jax.distributed.initialize when running multi-process; returns whether it did.

    Multi-process is detected from explicit arguments, `force` (the CLI's --multihost: TPU pods / SLURM,
    where JAX finds the coordinator itself), or the env vars JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
    JAX_PROCESS_ID. CPU processes use gloo collectives.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if not (force or coordinator_address):
        return False
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs)
    return True
