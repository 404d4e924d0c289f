"""Optimizers: Adafactor (the paper's) or AdamW, warm-up + cosine schedule, clipping, the gate group.

    clip_by_global_norm(clip_norm)
    → multi_transform({
        "default": scale_by_{adam|factored rms} → add_decayed_weights(weight_decay, ndim ≥ 2) → -lr(t),
        "gate":    scale_by_{adam|factored rms} → -gate_lr(t) })

- lr(t): linear warm-up from 0 over warmup_steps, then cosine decay to lr * min_lr_ratio at `steps`
  (schedule='cosine'), or constant after warm-up (schedule='constant'). gate_lr(t) has the same shape.
- The gate group holds every parameter whose path ends in 'gate_logit' (Infini-attention's β): its own
  learning rate, never weight decay. Weight decay is decoupled (multiplied by lr(t), as AdamW) and touches
  only matrices (ndim ≥ 2): not norm scales, not β.
- Adafactor: factored second moments (Shazeer & Stern 2018; decay_rate 0.8, update clipping at RMS 1),
  no first moment unless b1 > 0, no parameter-scale multiplication unless adafactor_param_scale.
- Gradient accumulation is not here: the train step loops over `grad_accum` microbatches and sums
  token-weighted gradients before one optimizer update (exact token weighting; optimizer steps = train
  steps). See infini_jax/train.py.
- bf16 compute / f32 params: model.dtype / model.param_dtype; the optimizer state follows the params.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from infini_jax.config import defaults, with_defaults
from infini_jax.model import is_gate_path, key_path

# Every config.optim key and its default (infini_jax/configs/base.py; a key not there is an error).
DEFAULTS: dict[str, Any] = defaults("optim")
NAMES = ("adamw", "adafactor")
SCHEDULES = ("cosine", "constant")


def optim_config(cfg: Mapping[str, Any]) -> dict:
    """config.optim with defaults filled in; unknown keys and bad values are ValueErrors."""
    out = with_defaults("optim", cfg, DEFAULTS)
    if out["name"] not in NAMES:
        raise ValueError(f"config.optim.name={out['name']!r}: use one of {NAMES}")
    if out["schedule"] not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={out['schedule']!r}: use one of {SCHEDULES}")
    if int(out["grad_accum"]) < 1:
        raise ValueError(f"config.optim.grad_accum must be >= 1, got {out['grad_accum']}")
    if float(out["lr"]) < 0 or int(out["warmup_steps"]) < 0:
        raise ValueError("config.optim.lr and warmup_steps must be >= 0")
    return out


def make_schedule(peak: float, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1) -> Callable:
    """Linear warm-up 0 → peak over warmup_steps, then cosine to peak*min_lr_ratio at total_steps (or
    constant)."""
    warmup_steps = int(min(warmup_steps, max(total_steps, 1)))
    if schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps),
                                     optax.constant_schedule(peak)], [warmup_steps])
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(int(total_steps), warmup_steps + 1),
                                              end_value=peak * min_lr_ratio)


def param_labels(params) -> Any:
    """'gate' for β (paths ending in gate_logit), 'default' for everything else."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "gate" if is_gate_path(p) else "default", params)


def decay_mask(params) -> Any:
    """Weight decay on matrices only: not norm scales (named `scale`; 2-D when layers are stacked), never β."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (jnp.ndim(x) >= 2) and not is_gate_path(p) and key_path(p).rsplit("/", 1)[-1] != "scale", params)


def _scaler(o: dict) -> optax.GradientTransformation:
    if o["name"] == "adamw":
        return optax.scale_by_adam(b1=o["b1"], b2=o["b2"], eps=o["eps"])
    parts = [optax.scale_by_factored_rms(decay_rate=o["adafactor_decay_rate"], epsilon=1e-30)]
    if o["adafactor_clip"]:
        parts.append(optax.clip_by_block_rms(o["adafactor_clip"]))
    if o["adafactor_param_scale"]:
        parts.append(optax.scale_by_param_block_rms())
    if o["b1"]:
        parts.append(optax.ema(o["b1"], debias=False))
    return optax.chain(*parts)


class Optimizer(NamedTuple):
    """config.optim built: the optax transformation and the schedules it follows (the step logs them)."""

    tx: optax.GradientTransformation
    lr_fn: Callable  # step -> learning rate
    gate_lr_fn: Optional[Callable] = None  # step -> the gates' learning rate; None: not logged


def make_optimizer(optim_cfg: Mapping[str, Any], total_steps: int) -> Optimizer:
    """Optimizer(optax transformation, lr schedule, gate lr schedule) for config.optim and config.train.steps."""
    o = optim_config(optim_cfg)
    sched_args = dict(total_steps=int(total_steps), warmup_steps=int(o["warmup_steps"]), schedule=o["schedule"],
                      min_lr_ratio=float(o["min_lr_ratio"]))
    lr = make_schedule(float(o["lr"]), **sched_args)
    gate_lr = make_schedule(float(o["lr"] if o["gate_lr"] is None else o["gate_lr"]), **sched_args)
    default = optax.chain(_scaler(o), optax.add_decayed_weights(float(o["weight_decay"]), mask=decay_mask),
                          optax.scale_by_learning_rate(lr))
    gate = optax.chain(_scaler(o), optax.scale_by_learning_rate(gate_lr))
    parts = []
    if o["clip_norm"]:
        parts.append(optax.clip_by_global_norm(float(o["clip_norm"])))
    parts.append(optax.multi_transform({"default": default, "gate": gate}, param_labels))
    return Optimizer(optax.chain(*parts), lr, gate_lr)
