"""Evaluators, declared in the config and run the same way during training (loop.py) and by eval.py.

    config.evals.<name> = dict(type=TYPE, every=N, **options)

TYPE is one of TYPES (one file each in this package); `every` N > 0 runs it every N training steps and at
the end, 0 only at the end; eval.py runs the ones its --tasks name once. Every evaluator evaluates a
core.Subject (params on a mesh, restored straight into their shardings) through step.py's loss. The base
config (infini_jax/configs/base.py) declares the evaluators the shipped configs tune; a config of your own
may add more under new names.
"""

from __future__ import annotations

from typing import Callable

from infini_jax.config import defaults
from infini_jax.evals.core import (Evaluator, Subject, as_subject, knockout_model, load_model, load_subject,
                                   one_device_mesh)
from infini_jax.evals.footprint import Footprint, format_footprint, memory_footprint
from infini_jax.evals.gates import Gates
from infini_jax.evals.generation import Generate
from infini_jax.evals.passkey_retrieval import (Passkey, PasskeyOptions, format_passkey, passkey_length,
                                                passkey_report, passkey_sweep)
from infini_jax.evals.perplexity import Perplexity, byte_length_table, evaluate_perplexity, limit_documents
from infini_jax.evals.summarize import Summarize, summarize_and_score

TYPES: dict[str, type[Evaluator]] = {e.type: e for e in (Perplexity, Passkey, Gates, Footprint, Generate, Summarize)}
EVALS_DEFAULTS = defaults("evals")  # the evaluators of the base config (infini_jax/configs/base.py)

__all__ = [
    "EVALS_DEFAULTS", "TYPES", "Evaluator", "Footprint", "Gates", "Generate", "Passkey", "PasskeyOptions",
    "Perplexity", "Subject", "Summarize", "as_subject", "byte_length_table", "evaluate_perplexity",
    "format_footprint", "format_passkey", "from_config", "knockout_model", "limit_documents", "load_model",
    "load_subject", "memory_footprint", "one_device_mesh", "passkey_length", "passkey_report", "passkey_sweep",
    "run_all", "summarize_and_score",
]


def build(name: str, spec) -> Evaluator:
    """One evaluator from its config entry dict(type=..., every=..., **options)."""
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    kind = spec.pop("type", None)
    if kind not in TYPES:
        raise ValueError(f"config.evals.{name}.type={kind!r} is not an evaluator type; valid: {sorted(TYPES)}")
    return TYPES[kind](name, **spec)


def from_config(evals_cfg) -> list[Evaluator]:
    """The evaluators of config.evals, in order; a misspelt evaluator, type or option is one ValueError."""
    entries = dict(evals_cfg.to_dict() if hasattr(evals_cfg, "to_dict") else evals_cfg)
    bad = sorted(k for k, v in entries.items() if not isinstance(v, dict))
    if bad:
        raise ValueError(f"unknown config.evals keys {bad}: each evaluator is config.evals.<name> = "
                         f"dict(type=..., every=..., ...); declared: {sorted(k for k in entries if k not in bad)}")
    out = []
    for name, spec in entries.items():
        base = EVALS_DEFAULTS.get(name, {})  # a base-declared evaluator: its defaults, unless its type changed
        out.append(build(name, {**base, **spec} if spec.get("type", base.get("type")) == base.get("type") else spec))
    return out


def run_all(evaluators: list[Evaluator], subject: Subject, log: Callable = print) -> dict:
    """Every evaluator on `subject`; their results merged into one JSON-able dict."""
    out: dict = {}
    for e in evaluators:
        out.update(e.run(subject, log))
    return out
