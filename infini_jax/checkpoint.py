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

import dataclasses
import json
import logging
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from infini_jax import paths
from infini_jax.model import ModelConfig, key_path

ITEMS = ("params", "opt", "data", "config")
COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint that is intact but cannot be resumed by this run (not damage: no fallback)."""


class Checkpointer:
    """CheckpointManager over <workdir>/checkpoints with the four items above. `workdir`: a local path or a
    URI (gs://...), kept an epath.Path throughout."""

    def __init__(self, workdir: epath.PathLike, *, keep: Optional[int] = 2, async_save: bool = True):
        self.directory = paths.resolve(workdir) / "checkpoints"
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
            raise ResumeError(f"checkpoint step {step} was written by {data.get('process_count')} processes, "
                             f"this run has {jax.process_count()}: the data-iterator state cannot be resumed")
        return out.params, out.opt, (per[jax.process_index()] if per else None)

    def restore_latest(self, abstract_params, abstract_opt: Mapping[str, Any], check: Callable[[dict], None]):
        """(step, params, opt, data state) of the newest intact step, or None if there is no step.

        `check(saved_config)` runs first on each step and its ValueError (another model, a changed schedule)
        stops the run: that is not damage. Any other failure to read a step (truncated array file, garbage
        metadata or config, a missing commit marker) is damage: a warning names the step and the error, the
        step is moved aside to checkpoints/<step>.damaged (never deleted: kept for inspection, and out of the
        way of the re-save of that step), and the next earlier step is tried."""
        for step in sorted(self.all_steps(), reverse=True):
            if not (self.directory / str(step) / COMMIT_FILE).exists():  # Orbax writes it last, on every backend
                self._set_aside(step, f"no {COMMIT_FILE}: the save never finished")
                continue
            try:
                saved = self.saved_config(step)
            except Exception as e:  # noqa: BLE001 - any unreadable config is damage
                self._set_aside(step, f"config unreadable ({_first_line(e)})")
                continue
            check(saved)
            try:
                return (step, *self.restore(step, abstract_params, abstract_opt))
            except ResumeError:
                raise
            except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for a damaged step
                self._set_aside(step, _first_line(e))
        return None

    def _set_aside(self, step: int, why: str) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.damaged"
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        _sync(f"set_aside_{step}")
        self.manager.reload()
        log.warning("checkpoint step %d in %s cannot be restored (%s): moved to %s; trying the previous step",
                    step, self.directory, why, dst)

    def saved_config(self, step: Optional[int] = None) -> Optional[dict]:
        """The experiment config saved with `step` (default: the latest), or None if there is no step.
        Raises if the step's config is unreadable."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        path = self.directory / str(step) / "config" / "metadata"
        if path.exists():
            return _read_config(path)
        saved = self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        return _check_config(saved, path)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
# (mass_passes, mass_source: how training writes its augmented rows; without a write scale they do nothing)
RESUME_COMPATIBLE = ("remat", "remat_segments", "mode", "mass_passes", "mass_source")


def check_model_matches(saved_config: Optional[Mapping[str, Any]], model_section: Mapping[str, Any], where) -> None:
    """A workdir holding a checkpoint of another model is an error (before anything compiles). Only the keys
    in RESUME_COMPATIBLE (rematerialization, scan vs parallel memory mode, training's mass_*) may
    differ. A key that the checkpoint predates (absent from its config) matches when its value now is
    ModelConfig's default, the behaviour the key was added with."""
    if not saved_config:
        return
    saved = dict(saved_config.get("model") or {})
    now = _jsonable(model_section)
    defaults = _jsonable({f.name: f.default for f in dataclasses.fields(ModelConfig)})
    saved.update({k: defaults[k] for k in set(now) - set(saved) if k in defaults and now[k] == defaults[k]})
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and k not in RESUME_COMPATIBLE}
    if "scan_layers" in diff and len(diff) == 1:
        raise ValueError(_layout_error(where, bool(saved.get("scan_layers"))))
    if diff:
        raise ValueError(f"{where} holds a checkpoint of a different model; differing config.model keys "
                         f"(saved, now): {diff}. Use another --workdir, or restore_params() to fine-tune.")


def _layout_error(where, saved_scan_layers) -> str:
    return (f"{where} holds parameters saved with model.scan_layers={saved_scan_layers} (layers "
            f"{'stacked on one axis' if saved_scan_layers else 'one subtree each'}); there is no converter between "
            f"the layouts: set --config.model.scan_layers={saved_scan_layers}")


def newest_readable_config(workdir: epath.PathLike) -> Optional[dict]:
    """The saved experiment config of the newest step of <workdir>/checkpoints whose config reads, or None.
    Reads files only (no CheckpointManager, nothing created): the CLI checks it before building data."""
    root = paths.resolve(workdir) / "checkpoints"
    steps = sorted((int(c.name) for c in root.iterdir() if c.name.isdigit()), reverse=True) if root.is_dir() else []
    for step in steps:
        try:
            return _read_config(root / str(step) / "config" / "metadata")
        except Exception:  # noqa: BLE001 - damaged or missing: restore_latest deals with it
            continue
    return None


def _read_config(path: epath.Path) -> dict:
    return _check_config(json.loads(path.read_text()), path)


def _check_config(saved, path) -> dict:
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError(f"{path} is not an experiment config")
    return saved


def find_step_dir(path: epath.PathLike) -> epath.Path:
    """A step directory from a step dir, a checkpoints dir or a workdir (latest step)."""
    p = paths.resolve(path)
    if (p / "params").is_dir():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / "params").is_dir()) \
        if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint found at {path} (give a workdir, its checkpoints/ dir or one step dir)")
    return root / str(steps[-1])


def param_targets(model_config, mesh=None) -> tuple[Any, dict, dict]:
    """(ModelConfig, parameter shapes, parameter shardings) of a model config: where restored parameters go.
    The trees are pure dicts like nnx.to_pure_dict(nnx.state(model, nnx.Param)); mesh None: the first device."""
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
    return cfg, shapes, shardings


def restore_params(path: epath.PathLike, model_config, mesh=None):
    """Parameters only, as a pure dict matching nnx.to_pure_dict(nnx.state(model, nnx.Param)), placed with the
    model's param shardings on `mesh` (default: replicated on the first device). `path`: a workdir, its
    checkpoints dir or one step dir. Missing/extra paths or shape mismatches → ValueError naming them.

    Use: nnx.update(model, nnx.State(params)) or nnx.merge(graphdef, params).
    """
    _, shapes, shardings = param_targets(model_config, mesh)
    step_dir = find_step_dir(path)
    with ocp.StandardCheckpointer() as ckptr:
        saved_tree = ckptr.metadata(step_dir / "params").item_metadata.tree
    saved = {key_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    want = {key_path(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    problems = [f"missing in checkpoint: {k}" for k in sorted(set(want) - set(saved))]
    problems += [f"not in model: {k}" for k in sorted(set(saved) - set(want))]
    problems += [f"shape {k}: checkpoint {saved[k]} vs model {want[k]}"
                 for k in sorted(set(want) & set(saved)) if saved[k] != want[k]]
    scanned = lambda keys: any(k.startswith("blocks/") and not k.split("/")[1].isdigit() for k in keys)  # noqa: E731
    if problems and scanned(saved) != scanned(want):
        raise ValueError(_layout_error(step_dir, scanned(saved)))
    if problems:
        raise ValueError(f"checkpoint {step_dir} does not match the model config "
                         f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(step_dir / "params", abstract)
    log.info("restored params from %s", step_dir)
    return params
