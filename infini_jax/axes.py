"""Logical axis names and the ONE table mapping them to mesh axes (imported by model.py and sharding.py).

Parameters name their dimensions in model.py (`axes` metadata); activations are pinned with `constrain`.
Mesh axes: data, fsdp, (context), tensor. `constrain` is a no-op unless an abstract mesh is active
(`jax.sharding.use_abstract_mesh`, which the jitted train/eval steps enter), so the model runs unchanged
on one device. The sequence ("length") maps to the optional context axis: with one, activations are split
along the sequence and the Infini-attention memory prefix is exchanged between its devices (context.py).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis / tuple of mesh axes / None (replicated)
RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "layers": None,  # the stacked-layers axis (model.scan_layers): every device holds every layer's slice
    "length": "context",  # context parallelism: each device holds whole segments of every sequence
    "vocab": "tensor",
    "embed": "fsdp",  # parameters: FSDP shards the model dimension of every weight
    "act_embed": None,  # activations: the model dimension stays whole, the batch carries the split
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "key": None,
    "value": None,
}

log = logging.getLogger(__name__)


def _axis_size(mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def _present(mesh, axes):
    """Drops mesh axes the mesh does not have (e.g. "context"); None when nothing is left."""
    if axes is None:
        return None
    tup = (axes,) if isinstance(axes, str) else tuple(axes)
    tup = tuple(a for a in tup if a in mesh.shape)
    if not tup:
        return None
    return tup[0] if len(tup) == 1 else tup


def logical_to_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh,
                    rules: Mapping[str, Any] = RULES, *, name: str = "") -> P:
    """PartitionSpec for one array: its logical axis names mapped through `rules`.

    A dimension whose size does not divide its mesh axes is replicated (logged once); a mesh axis already
    used by an earlier dimension is not reused.
    """
    if len(logical) != len(shape):
        raise ValueError(f"{name}: {len(logical)} logical axes {tuple(logical)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for ax, size in zip(logical, shape):
        if ax is not None and ax not in rules:
            raise ValueError(f"{name}: logical axis {ax!r} has no sharding rule; known: {sorted(rules)}")
        mesh_ax = _present(mesh, rules.get(ax)) if ax is not None else None
        tup = () if mesh_ax is None else ((mesh_ax,) if isinstance(mesh_ax, str) else mesh_ax)
        if tup and (used & set(tup)):
            mesh_ax, tup = None, ()
        if tup and size % _axis_size(mesh, tup):
            _log_replicated(name, ax, size, tup, _axis_size(mesh, tup))
            mesh_ax, tup = None, ()
        used |= set(tup)
        spec.append(mesh_ax)
    return P(*spec)


@functools.lru_cache(maxsize=None)
def _log_replicated(name, ax, size, tup, n) -> None:
    """Logs each replicated (array, dimension, mesh axes) once, not at every trace."""
    log.info("sharding: %s dim %s=%d not divisible by mesh %s=%d; replicated", name, ax, size, tup, n)


def constrain(x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
    """Pins an activation's sharding by logical axis names when a mesh is active; otherwise returns x."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh, name="activation"))


def active_axis(logical: str) -> tuple[Any, int]:
    """(mesh axis or axes, their total size) that `logical` maps to on the active abstract mesh; (None, 1)
    without a mesh, or when the mesh lacks those axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, 1
    axes = _present(mesh, RULES[logical])
    return axes, (_axis_size(mesh, axes) if axes is not None else 1)
