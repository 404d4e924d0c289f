"""What every evaluator shares: the Subject (params on a mesh, the model's graphdef, its tokenizer and
config), the jitted steps of step.py bound to it, loading a checkpoint straight into its shardings, and the
Evaluator base class whose options come from `config.evals.<name> = dict(type=..., every=..., ...)`.

A Subject's steps are step.make_eval_step / make_token_step: the one loss of step.py, sharded like training.
The memory knock-out is a change of parameters (model.knockout_params), so a knocked-out Subject runs the
same steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Optional

import jax
import numpy as np
from flax import nnx

from infini_jax import sharding as shd
from infini_jax import step as step_lib
from infini_jax.model import InfiniTransformer, ModelConfig, knockout_params


def one_device_mesh():
    return shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@functools.lru_cache(maxsize=32)
def _steps(model_cfg: ModelConfig, mesh, rows: int) -> dict:
    """The jitted steps of one model on one mesh for `rows` batch rows (cached: one compile per shape)."""
    amodel = step_lib.abstract_model(model_cfg)
    graphdef = nnx.split(amodel, nnx.Param)[0]
    param_sh = shd.param_shardings(amodel, mesh)
    mem_sh = shd.memory_shardings(mesh, jax.eval_shape(lambda: amodel.init_memory(rows)))
    kw = dict(mesh=mesh, param_shardings=param_sh, memory_shardings=mem_sh)
    return {"eval": step_lib.make_eval_step(graphdef, **kw), "token": step_lib.make_token_step(graphdef, **kw),
            "init_memory": jax.jit(lambda: amodel.init_memory(rows), out_shardings=mem_sh),
            "param_shardings": param_sh}


@dataclasses.dataclass
class Subject:
    """What evaluators evaluate: `params` (a pure dict placed with the model's param shardings on `mesh`),
    `model_cfg`, the tokenizer (None: no bits per byte, no passkey), the experiment config (data section:
    what perplexity reads; None for model-only use) and `make_iterator` (infini_jax.data.make_iterator or a
    test's stand-in)."""

    model_cfg: ModelConfig
    params: Any
    mesh: Any
    tokenizer: Any = None
    config: Any = None
    make_iterator: Optional[Callable] = None
    progress: bool = False

    @classmethod
    def from_model(cls, model: InfiniTransformer, tokenizer=None, config=None, **kw) -> "Subject":
        """A model held in Python (tests, notebooks) on a one-device mesh."""
        mesh = one_device_mesh()
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        params = jax.device_put(params, _steps(model.cfg, mesh, 1)["param_shardings"])
        return cls(model.cfg, params, mesh, tokenizer, config, **kw)

    def steps(self, rows: int) -> dict:
        return _steps(self.model_cfg, self.mesh, rows)

    @property
    def rows_multiple(self) -> int:
        """Batch rows must be a multiple of this (the devices along the mesh's batch axes)."""
        return int(np.prod([self.mesh.shape[a] for a in shd.batch_sharding(self.mesh).spec[0] or ()]))

    def model(self) -> InfiniTransformer:
        """The nnx model (for generation, which runs outside the sharded steps)."""
        graphdef, abstract = nnx.split(step_lib.abstract_model(self.model_cfg))
        nnx.replace_by_pure_dict(abstract, self.params)
        return nnx.merge(graphdef, abstract)

    def on_mesh(self, mesh) -> "Subject":
        """The same subject with its params moved into their shardings on `mesh`."""
        params = jax.device_put(self.params, _steps(self.model_cfg, mesh, 1)["param_shardings"])
        return dataclasses.replace(self, params=params, mesh=mesh)

    def knocked_out(self) -> "Subject":
        """The same subject with the memory read disabled (every gate logit -1e9; see model.knockout_params)."""
        if self.model_cfg.attention != "infini":
            raise ValueError(f"memory knock-out needs attention='infini', the model has {self.model_cfg.attention!r}")
        params = jax.jit(knockout_params, out_shardings=self.steps(1)["param_shardings"])(self.params)
        return dataclasses.replace(self, params=params)


def as_subject(model_or_subject, tokenizer=None) -> Subject:
    if isinstance(model_or_subject, Subject):
        return model_or_subject
    return Subject.from_model(model_or_subject, tokenizer)


def global_rows(rows_host: dict, mesh) -> dict:
    """Whole-batch host arrays (the same on every process) → global arrays sharded over the batch axes."""
    sharding = shd.batch_sharding(mesh)
    return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda idx, v=v: np.asarray(v)[idx])
            for k, v in rows_host.items()}


def progress_bar(enabled: bool, **kw) -> Any:
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(**kw)


# --------------------------------------------------------------------------- evaluators

class Evaluator:
    """One evaluation, built from `config.evals.<name> = dict(type=TYPE, every=N, **options)`.

    `every`: during training, run every N steps and at the end (0: only at the end); eval.py runs it once.
    `run(subject, log)` returns a JSON-able dict of results, keyed by what they are (usually the evaluator's
    name); `scalars(results)` the numbers that go to TensorBoard. OPTIONS holds each option's default."""

    type: ClassVar[str] = ""
    OPTIONS: ClassVar[dict] = {}

    def __init__(self, name: str, every: int = 0, **options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"unknown config.evals.{name} keys {unknown} for type {self.type!r}; valid keys: "
                             f"{['type', 'every', *self.OPTIONS]}")
        self.name, self.every = name, int(every)
        self.options = {**self.OPTIONS, **options}

    def due(self, step: int, final: bool) -> bool:
        return final or (self.every > 0 and step % self.every == 0)

    def run(self, subject: Subject, log: Callable = print) -> dict:
        raise NotImplementedError

    def scalars(self, results: dict) -> dict:
        return {}

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, every={self.every}, {self.options})"


# --------------------------------------------------------------------------- loading

def load_subject(config, *, workdir=None, checkpoint=None, init_random: bool = False, mesh=None) -> tuple:
    """(Subject, info) for `config` from the latest checkpoint in workdir or a checkpoint path (a workdir, its
    checkpoints/ dir or one step dir), restored straight into the param shardings on `mesh` (default: one
    device); init_random: a fresh init (smoke tests). Mismatches raise ValueError / FileNotFoundError naming
    the fix, before anything compiles."""
    from infini_jax import checkpoint as ckpt_lib
    from infini_jax import paths
    from infini_jax.config import model_config

    cfg = model_config(config)
    mesh = mesh if mesh is not None else one_device_mesh()
    if init_random:
        init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(InfiniTransformer(cfg, rngs=nnx.Rngs(int(config.train.seed))),
                                                          nnx.Param)),
                       out_shardings=_steps(cfg, mesh, 1)["param_shardings"])
        return Subject(cfg, init(), mesh, config=config), {"source": "random init", "step": None}
    path = checkpoint or workdir
    if not path:
        raise ValueError("no model to evaluate: pass --workdir DIR (its latest checkpoint) or --checkpoint PATH")
    if not paths.resolve(path).exists():
        raise FileNotFoundError(f"{'--checkpoint' if checkpoint else '--workdir'} {path} does not exist; "
                                "pass the workdir train.py wrote, or a checkpoint step directory")
    step_dir = ckpt_lib.find_step_dir(path)  # FileNotFoundError "no checkpoint found at ..." when empty
    saved_cfg = step_dir / "config" / "metadata"
    if saved_cfg.exists():
        import json

        ckpt_lib.check_model_matches(json.loads(saved_cfg.read_text()), config.model, where=str(step_dir))
    params = ckpt_lib.restore_params(step_dir, cfg, mesh)
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    return Subject(cfg, params, mesh, config=config), {"source": str(step_dir), "step": step}


def load_model(config, *, workdir=None, checkpoint=None, init_random: bool = False):
    """(nnx model, info) on one device: load_subject for code that holds a model (experiments, tests)."""
    subject, info = load_subject(config, workdir=workdir, checkpoint=checkpoint, init_random=init_random)
    return subject.model(), info


def knockout_model(model: InfiniTransformer) -> InfiniTransformer:
    """A copy of `model` with the memory read disabled (model.knockout_params); `model` is untouched."""
    ko = nnx.clone(model)
    state = nnx.state(ko, nnx.Param)
    nnx.replace_by_pure_dict(state, knockout_params(nnx.to_pure_dict(state)))
    nnx.update(ko, state)
    return ko
