"""Hugging Face Llama and Gemma checkpoints ↔ infini-jax: continual pre-training from published weights.

    from infini_jax.convert import check_hf_checkpoint, export_hf, hf_fields, load_hf_params

    hf_fields("llama-3.2-1b")                       # the ModelConfig fields its config.json fixes
    params = load_hf_params("llama-3.2-1b", model_cfg, mesh)   # pure dict, every array on its sharding
    export_hf(params, model_cfg, "out/")            # config.json + safetensors (+ infini_gates.safetensors)

`--config.train.init_from=hf:DIR` (train.py) calls check_hf_checkpoint before anything is created and
load_hf_params for the params-only start. hf_config.py maps config.json, hf_params.py the tensors (its
docstring has the table). Only local files are read, with the `safetensors` library (never pickle); neither
torch nor transformers is needed. Command line: `python -m infini_jax.convert --help` (infini-convert).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from etils import epath

from infini_jax.convert import hf_config, hf_params

HF_PREFIX = "hf:"

__all__ = ["HF_PREFIX", "check_hf_checkpoint", "export_hf", "hf_dir", "hf_fields", "load_hf_params"]


def hf_dir(spec) -> Optional[str]:
    """DIR of an `hf:DIR` init_from (or tokenizer) spec; None for anything else."""
    return spec[len(HF_PREFIX):] if isinstance(spec, str) and spec.startswith(HF_PREFIX) else None


def hf_fields(directory: epath.PathLike) -> dict:
    """The ModelConfig fields that DIR/config.json fixes (hf_config.FIELDS)."""
    return hf_config.model_fields(hf_config.read_config_json(directory), f"{directory}/config.json")


def check_hf_checkpoint(directory: epath.PathLike, model_config) -> None:
    """config.json against config.model, then every file and tensor shape (no tensor data is read): the first
    problem is one ValueError / FileNotFoundError line naming the field, file or tensor."""
    from infini_jax.checkpoint import param_targets

    cfg, shapes, _ = param_targets(model_config, None)
    hf_params.opened(directory, cfg, shapes).close()


def load_hf_params(directory: epath.PathLike, model_config, mesh=None) -> dict:
    """Parameters from a Hugging Face directory, a pure dict like checkpoint.restore_params returns, placed
    with the model's param shardings on `mesh` (default: the first device), one tensor at a time. The gates
    (attention='infini') come from infini_gates.safetensors when DIR is an infini-jax export, else from
    model.gate_init."""
    from infini_jax.checkpoint import param_targets

    cfg, shapes, shardings = param_targets(model_config, mesh)
    return hf_params.load(directory, cfg, shapes, shardings)


def export_hf(params: Mapping, model_config, out_dir: epath.PathLike, *, like: Optional[Mapping[str, Any]] = None,
              max_shard_bytes: int = 2 << 30) -> list[str]:
    """Writes params as a Hugging Face Llama / Gemma checkpoint (see hf_params.export)."""
    from infini_jax.model import ModelConfig

    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(model_config)
    return hf_params.export(params, cfg, out_dir, like=like, max_shard_bytes=max_shard_bytes)
