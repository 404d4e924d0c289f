"""Config helpers shared by configs/*.py and the CLIs.

Configs are `get_config(arg)` functions returning a locked ml_collections.ConfigDict (big_vision style).
`arg` is the part after the colon in `--config configs/pg19.py:rule=delta,attention=xl`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from infini_jax.model import ModelConfig


def parse_arg(arg: str | None, defaults: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Parses "k=v,k=v" against `defaults`: unknown keys and values outside a tuple of choices are errors.

    A default given as a tuple means "one of these"; its first element is the default value.
    """
    out = {}
    for key, default in defaults.items():
        out[key] = default[0] if isinstance(default, tuple) else default
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config arg {item!r} is not key=value; valid keys: {sorted(defaults)}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; valid keys: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, tuple):
            if value not in default:
                raise ValueError(f"config arg {key}={value!r} is not one of {default}")
            out[key] = value
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return ml_collections.ConfigDict(out)


def with_defaults(section: str, cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """A config section as a dict with `defaults` filled in; a key `defaults` lacks is an error."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config.{section} keys {unknown}; valid keys: {sorted(defaults)}")
    return {**defaults, **d}


def parse_cli_flags(flags_obj, argv):
    """absl flag parsing for the CLIs: a bad flag or --config.x=y override (unknown key, wrong type) is one
    line on stderr and exit code 2, not a traceback."""
    import sys

    from absl import flags

    try:
        return flags_obj(argv)
    except flags.Error as e:
        print(f"error: {e}\nPass --help for usage.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: bad --config override: {e}", file=sys.stderr)
        sys.exit(2)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen ModelConfig of an experiment config (validates every model field)."""
    return ModelConfig.from_dict(config.model)


def seq_len(config: ml_collections.ConfigDict) -> int:
    """Input length is derived, never stored: n_segments × segment_len."""
    return config.model.n_segments * config.model.segment_len
