"""Orbax checkpoints: the train state, the data-iterator state and the config, saved together.

Layout: <workdir>/checkpoints/<step>/{params, opt, data, config}
    params  the model parameters (pure dict as nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    opt     {"opt_state", "step", "rng"}
    data    JSON {"process_count": n, "per_process": [iterator.get_state() of each process]}
    config  JSON of the whole experiment config (config.to_dict())

Saves are asynchronous (CheckpointManager default); keep-last-N via max_to_keep. Restores go onto any mesh:
the caller passes an abstract tree of jax.ShapeDtypeStruct with shardings. `restore_params` loads the
parameters only (fine-tuning), checking paths and shapes against the model config first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

ITEMS = ("params", "opt", "data", "config")

log = logging.getLogger(__name__)


class Checkpointer:
    """CheckpointManager over <workdir>/checkpoints with the four items above."""

    def __init__(self, workdir: str | Path, *, keep: Optional[int] = 2, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Optional[dict], config: Mapping[str, Any]) -> bool:
        """Starts an async save of `state` (.params/.opt_state/.step/.rng) at `step`. Every process calls
        it (the data states of all processes are gathered here)."""
        data = {"process_count": jax.process_count(), "per_process": _allgather_json(data_state)}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(_jsonable(config)),
        )
        return self.manager.save(int(step), args=args, force=True)

    def restore(self, step: int, abstract_params, abstract_opt: Mapping[str, Any]) -> tuple[Any, dict, Optional[dict]]:
        """(params, {"opt_state","step","rng"}, this process's data-iterator state or None)."""
        out = self.manager.restore(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), opt=ocp.args.StandardRestore(dict(abstract_opt)),
            data=ocp.args.JsonRestore()))
        data = out.data or {}
        per = data.get("per_process") or []
        if per and data.get("process_count") != jax.process_count():
            raise ValueError(f"checkpoint step {step} was written by {data.get('process_count')} processes, "
                             f"this run has {jax.process_count()}: the data-iterator state cannot be resumed")
        return out.params, out.opt, (per[jax.process_index()] if per else None)

    def saved_config(self, step: Optional[int] = None) -> Optional[dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        path = self.directory / str(step) / "config" / "metadata"
        if path.exists():
            return json.loads(path.read_text())
        return self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _jsonable(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def _allgather_json(obj) -> list:
    """[obj of process 0, obj of process 1, ...] (JSON round-trip through a uint8 all-gather)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    buf = np.zeros((int(np.max(lengths)),), np.uint8)
    buf[:raw.size] = raw
    bufs = multihost_utils.process_allgather(buf)
    return [json.loads(bytes(b[:int(n)]).decode()) for b, n in zip(bufs, np.ravel(lengths))]


# model keys that may change between a checkpoint and its resumption: same parameters, same function
RESUME_COMPATIBLE = ("remat", "mode")


def check_model_matches(saved_config: Optional[Mapping[str, Any]], model_section: Mapping[str, Any], where) -> None:
    """A workdir holding a checkpoint of another model is an error (before anything compiles). Only the keys
    in RESUME_COMPATIBLE (rematerialization, scan vs parallel memory mode) may differ."""
    if not saved_config:
        return
    saved = dict(saved_config.get("model") or {})
    now = _jsonable(model_section)
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and k not in RESUME_COMPATIBLE}
    if diff:
        raise ValueError(f"{where} holds a checkpoint of a different model; differing config.model keys "
                         f"(saved, now): {diff}. Use another --workdir, or restore_params() to fine-tune.")


def _step_dir(path: str | Path) -> Path:
    """A step directory from a step dir, a checkpoints dir or a workdir (latest step)."""
    p = Path(path).absolute()
    if (p / "params").is_dir():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / "params").is_dir()) \
        if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint found at {path}")
    return root / str(steps[-1])


def _path_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def restore_params(path: str | Path, model_config, mesh=None):
    """Parameters only, as a pure dict matching nnx.to_pure_dict(nnx.state(model, nnx.Param)), placed with the
    model's param shardings on `mesh` (default: replicated on the first device). `path`: a workdir, its
    checkpoints dir or one step dir. Missing/extra paths or shape mismatches → ValueError naming them.

    Use: nnx.update(model, nnx.State(params)) or nnx.merge(graphdef, params).
    """
    from infini_jax import sharding as shd
    from infini_jax.model import InfiniTransformer, ModelConfig

    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(model_config)
    abstract_model = nnx.eval_shape(lambda: InfiniTransformer(cfg, rngs=nnx.Rngs(0)))
    shapes = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    if mesh is not None:
        shardings = shd.param_shardings(abstract_model, mesh)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    step_dir = _step_dir(path)
    with ocp.StandardCheckpointer() as ckptr:
        saved_tree = ckptr.metadata(step_dir / "params").item_metadata.tree
    saved = {_path_key(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    want = {_path_key(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    problems = [f"missing in checkpoint: {k}" for k in sorted(set(want) - set(saved))]
    problems += [f"not in model: {k}" for k in sorted(set(saved) - set(want))]
    problems += [f"shape {k}: checkpoint {saved[k]} vs model {want[k]}"
                 for k in sorted(set(want) & set(saved)) if saved[k] != want[k]]
    if problems:
        raise ValueError(f"checkpoint {step_dir} does not match the model config "
                         f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(step_dir / "params", abstract)
    log.info("restored params from %s", step_dir)
    return params
