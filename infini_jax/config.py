"""Config helpers shared by the configs (infini_jax/configs/) and the CLIs.

Configs are `get_config(arg)` functions returning a locked ml_collections.ConfigDict (big_vision style).
`--config` takes a config shipped with the package by name (`tiny`, `pg19:rule=delta`) or a path to any config
file (`my_configs/exp.py:arg`); `arg` is the part after the colon. infini_jax/configs/base.py holds every key
and its default; `python -m infini_jax.config --markdown` prints them as the README's table.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import ml_collections
from absl import flags
from ml_collections import config_flags

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


# --------------------------------------------------------------------------- the base config: every key

@functools.cache
def _base() -> ml_collections.ConfigDict:
    from infini_jax.configs import base

    return base.get_config()


def defaults(section: str) -> dict:
    """Every key of config.<section> and its default (infini_jax/configs/base.py), as a new dict."""
    return _base()[section].to_dict()


def with_defaults(section: str, cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """A config section as a dict with `defaults` filled in; a key `defaults` lacks is an error."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config.{section} keys {unknown}; valid keys: {sorted(defaults)}")
    return {**defaults, **d}


_KEY_COMMENT = re.compile(r"\s*(\w+)\s*(?::[^=#]*)?=[^#]*#\s*(.+)$")  # `key=value,  # meaning`, `key: T = v  # ...`


def key_docs() -> dict[str, dict[str, str]]:
    """{section: {key: one-line meaning}}: the comment after each key in base.py (model: in ModelConfig)."""
    from infini_jax.configs import base

    docs: dict[str, dict[str, str]] = {}
    section, prefix = None, []  # prefix: the nested dict(...) a key line sits in (config.evals.<name>)
    for line in inspect.getsource(base).splitlines():
        if m := re.match(r"\s*config\.(\w+)\s*=", line):
            section, prefix = docs.setdefault(m.group(1), {}), []
        elif section is not None and (m := re.match(r"\s*(\w+)=dict\(\s*(#.*)?$", line)):
            prefix.append(m.group(1))
        elif section is not None and prefix and re.match(r"\s*\),?\s*$", line):
            prefix.pop()
        elif section is not None and (m := _KEY_COMMENT.match(line)):
            section[".".join([*prefix, m.group(1)])] = m.group(2).strip()
    docs["model"] = {m.group(1): m.group(2).strip() for line in inspect.getsource(ModelConfig).splitlines()
                     if (m := _KEY_COMMENT.match(line))}
    return docs


def _flat(d: dict, prefix: str = "") -> dict:
    """{"passkey": {"x": ()}} -> {"passkey.x": ()} (evaluators are dicts inside config.evals)."""
    return {k: v for key, value in d.items()
            for k, v in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}).items()}


def markdown_table() -> str:
    """The README's table of every config key (in the order of base.py), its default and its meaning."""
    base, docs = {k: _flat(v) for k, v in _base().to_dict().items()}, key_docs()
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, values in base.items():
        missing = sorted(set(values) - set(docs.get(section, {})))
        if missing:
            raise ValueError(f"config.{section} keys {missing} have no comment in infini_jax/configs/base.py "
                             f"(model keys: in ModelConfig); add a one-line one")
    for section, meanings in docs.items():
        for key, meaning in meanings.items():
            if key in base[section]:
                meaning = meaning.replace("|", "\\|")
                rows.append(f"| `{section}.{key}` | `{base[section][key]!r}` | {meaning} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- loading a config by name or path

def config_names() -> list[str]:
    """Names of the configs shipped in infini_jax/configs (usable as `--config NAME[:arg]`)."""
    files = importlib.resources.files("infini_jax.configs").iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and not f.name.startswith("_"))


def config_file(name_or_path: str) -> Path:
    """The file of a shipped config name (`tiny`) or a path (`configs/tiny.py`); missing: a one-line ValueError."""
    if name_or_path in config_names():
        return Path(str(importlib.resources.files("infini_jax.configs") / f"{name_or_path}.py"))
    path = Path(name_or_path)
    if not path.is_file():
        kind = "config file" if name_or_path.endswith(".py") or "/" in name_or_path else "config"
        raise ValueError(f"no {kind} {name_or_path!r}: give a path to a config .py file or one of the shipped "
                         f"configs: {', '.join(config_names())}")
    return path


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`NAME[:arg]` or `path/to/config.py[:arg]` → the locked ConfigDict of its get_config(arg)."""
    name, _, arg = spec.partition(":")
    path = config_file(name)
    module_spec = importlib.util.spec_from_file_location(f"_infini_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    return config


class _ConfigParser(flags.ArgumentParser):
    def parse(self, argument):
        return load_config(argument)

    def flag_type(self):
        return "config object"


def define_config_flag(help_string: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`--config NAME|path[:arg]` with `--config.<section>.<key>=value` overrides (ml_collections)."""
    config_flags.DEFINE_config_file("config", None, help_string, flag_values=flag_values, lock_config=True)
    flag_values["config"].parser = _ConfigParser()  # names of shipped configs, one-line errors


def _bad_override(argv, config: ml_collections.ConfigDict | None = None) -> str | None:
    """The first --config.a.b=... in argv that names no key of the config (default: the one argv's --config
    names), as one line (None: all exist)."""
    spec = None
    for i, arg in enumerate(argv):
        if re.match(r"--?config=", arg):
            spec = arg.split("=", 1)[1]
        elif re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
            spec = argv[i + 1]
    try:
        config = load_config(spec) if config is None else config
    except Exception:  # the config itself is broken: the caller's message says more
        return None
    for arg in argv:
        if not (m := re.match(r"--?(?:no)?config\.([\w.]+)", arg)):
            continue
        node, where = config, "config"
        for key in m.group(1).split("."):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                valid = sorted(node) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                return f"--config.{m.group(1)}: {where} has no key {key!r}; {hint}valid keys: {', '.join(valid)}"
            node, where = node[key], f"{where}.{key}"
    return None


def parse_cli_flags(flags_obj, argv, config: ml_collections.ConfigDict | None = None):
    """absl flag parsing for the CLIs: a bad flag, config name or --config.x=y override (unknown key, wrong
    type) is one line on stderr and exit code 2, not a traceback."""
    try:
        return flags_obj(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, flags.Error):  # a flag's value (or the config's get_config) was rejected
            message = f"{e} (see --help)"
        else:  # an override ml_collections could not apply: name the key when it does not exist
            message = _bad_override(argv, config) or f"bad --config override: {e}"
        print("error: " + " ".join(message.split()), file=sys.stderr)
        sys.exit(2)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """`--config.<section>.<key>=value` overrides on a config the caller built (the experiment scripts), parsed
    by ml_collections' own flag parser as in the CLIs: typed as the key's default, and an unknown key or a
    bad value is one line and exit code 2."""
    flag_values = flags.FlagValues()

    def parse(argv):  # the overrides are applied (and a missing key found) as the flag is defined
        config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv, lock_config=True)
        return flag_values(argv)

    parse_cli_flags(parse, ["experiment", *overrides], config)
    return flag_values.config


def run_cli(main, module_name: str) -> None:
    """absl's app.run(main) for a CLI module: flags parsed by parse_cli_flags, and --help shows that module's
    docstring and flags (under a console script or a wrapper script, __main__ is a stub). On a host without an
    accelerator JAX is kept on the CPU platform first (no libtpu start-up noise: sharding.choose_platform)."""
    from absl import app

    from infini_jax.sharding import choose_platform

    choose_platform()

    sys.modules["__main__"].__doc__ = sys.modules[module_name].__doc__
    for flag in [flags.FLAGS["config"], *flags.FLAGS.get_key_flags_for_module(module_name)]:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=lambda argv: parse_cli_flags(flags.FLAGS, argv))


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen ModelConfig of an experiment config (validates every model field)."""
    return ModelConfig.from_dict(config.model)


def seq_len(config: ml_collections.ConfigDict) -> int:
    """Input length is derived, never stored: n_segments × segment_len."""
    return config.model.n_segments * config.model.segment_len


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m infini_jax.config --markdown   (prints the README's table of config keys)")
    print(markdown_table())
