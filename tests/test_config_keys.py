"""The base config holds every key; experiment configs only override it; every key can be set on the command
line; a misspelt key or config name is one line; the README's table of keys is current; the wheel ships the
configs and the console scripts."""

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from absl import flags

from infini_jax import config as config_lib
from infini_jax import optim
from infini_jax import step as train
from infini_jax.data import check_data_config
from infini_jax.evals import EVALS_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
BASE = config_lib.load_config("base").to_dict()
VARIANTS = ["tiny", "tiny:rule=delta,attention=xl", "books", "pg19", "arxiv_math:rule=delta", "passkey_1b",
            "passkey_1b:stage=finetune,arch=gemma", "booksum_8b", "booksum_8b:stage=finetune"]


def flat(d: dict, prefix: str = "") -> dict:
    return {k: v for key, value in d.items()
            for k, v in (flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}).items()}


def test_every_shipped_config_is_covered():
    assert {v.split(":")[0] for v in VARIANTS} | {"base"} == set(config_lib.config_names())


@pytest.mark.parametrize("spec", VARIANTS)
def test_experiment_configs_hold_only_base_keys(spec):
    config = config_lib.load_config(spec).to_dict()
    assert flat(config).keys() == flat(BASE).keys()  # nothing added, nothing dropped
    for key, value in flat(config).items():
        default = flat(BASE)[key]
        if value is not None and default is not None:
            assert isinstance(value, type(default)) or (type(default), type(value)) == (float, int), key


def test_code_defaults_come_from_the_base():
    assert train.TRAIN_DEFAULTS == BASE["train"] and optim.DEFAULTS == BASE["optim"]
    assert EVALS_DEFAULTS == BASE["evals"] and check_data_config({}) == BASE["data"]
    # library callers may still pass partial sections
    assert optim.optim_config(dict(name="adamw", lr=1e-3, warmup_steps=10))["b2"] == BASE["optim"]["b2"]
    with pytest.raises(ValueError, match="valid keys"):
        train.train_config(dict(stpes=5))


def parse(argv, monkeypatch):
    """The CLIs' flag parsing (config_lib.parse_cli_flags) on a fresh flag set."""
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the --config.x overrides from sys.argv
    flag_values = flags.FlagValues()
    config_lib.define_config_flag("config", flag_values)
    config_lib.parse_cli_flags(flag_values, argv)
    return flag_values.config


def test_every_kind_of_key_can_be_set_from_the_command_line(monkeypatch):
    config = parse(["prog", "--config", "tiny", "--config.train.async_checkpoints=False",
                    "--config.data.text_field=body", "--config.model.num_kv_heads=2", "--config.optim.gate_lr=0.5",
                    "--config.evals.passkey.x=(1, 2)", "--config.mesh.context=1"], monkeypatch)
    assert config.train.async_checkpoints is False and config.data.text_field == "body"
    assert config.model.num_kv_heads == 2 and config.optim.gate_lr == 0.5
    assert tuple(config.evals.passkey.x) == (1, 2) and config.mesh.context == 1
    assert parse(["prog", "--config=pg19:rule=delta"], monkeypatch).model.rule == "delta"
    path = str(REPO / "infini_jax" / "configs" / "books.py")
    assert parse(["prog", "--config", f"{path}:attention=xl"], monkeypatch).model.attention == "xl"


@pytest.mark.parametrize("argv,expected", [
    (["--config", "tiny", "--config.train.stpes=5"],
     r"--config\.train\.stpes: config\.train has no key 'stpes'; did you mean 'steps'\? valid keys: .*batch_size"),
    (["--config", "tiny", "--config.trian.steps=5"], r"config has no key 'trian'; did you mean 'train'\?"),
    (["--config", "tiny", "--config.model.num_kv_heads=two"], r"num_kv_heads"),
    (["--config", "tinyy"], r"no config 'tinyy': .*shipped configs: arxiv_math, base, books, .*tiny"),
    (["--config", "configs/nope.py:rule=delta"], r"no config file 'configs/nope.py'"),
    (["--config", "tiny:rulez=delta"], r"unknown config arg 'rulez'"),
])
def test_bad_input_is_one_line(argv, expected, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["prog", *argv], monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "\\n" not in err, err
    assert re.search(expected, err), err


def test_experiment_scripts_take_the_same_overrides(capsys):
    """apply_overrides: experiments/passkey_1m.py and books_lm.py apply --config.x=y to a config they built,
    typed and checked by the same parser as the CLIs."""
    config = config_lib.apply_overrides(config_lib.load_config("tiny"), [
        "--config.data.passkey_mass_max=4096", "--config.data.passkey_mass_after=7", "--config.model.remat=True",
        "--config.data.passkey_haystack=/books", "--config.evals.passkey.x=(1, 2)"])
    assert config.data.passkey_mass_max == 4096.0 and isinstance(config.data.passkey_mass_max, float)
    assert config.data.passkey_mass_after == 7 and config.model.remat is True
    assert config.data.passkey_haystack == "/books" and tuple(config.evals.passkey.x) == (1, 2)
    for bad, expected in (("--config.data.passkey_mass_maxx=3", "did you mean 'passkey_mass_max'"),
                          ("--config.train.seed=abc", "invalid literal for int")):
        with pytest.raises(SystemExit) as exit_info:
            config_lib.apply_overrides(config_lib.load_config("tiny"), [bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_passkey_1m_refuses_a_bad_override_before_training(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "passkey_1m.py"), "--out", str(tmp_path / "o"),
                        "--rules", "linear", "--config.data.passkey_mass_maxx=5"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'passkey_mass_max'" in r.stderr, r.stderr
    assert not (tmp_path / "o" / "linear").exists()


def test_readme_table_is_current():
    readme = (REPO / "README.md").read_text()
    assert config_lib.markdown_table() in readme, (
        "README.md's config table is stale: replace it with the output of `python -m infini_jax.config --markdown`")
    assert len(re.findall(r"^\| `(?!config\.)\w+(?:\.\w+)+` \|", readme, re.M)) == len(flat(BASE))


def test_the_cli_wrapper_gives_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "tiny", "--config.train.stpes=5",
                        "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "did you mean 'steps'" in r.stderr, r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_wheel_ships_configs_and_console_scripts(tmp_path):
    """`pip wheel` (no isolation, no deps: a few seconds) holds every config and the console scripts."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("infini_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {f"infini_jax/configs/{n}.py" for n in config_lib.config_names()} <= set(names)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"infini-train", "infini-eval", "infini-tokenizer", "infini-aot"} <= set(scripts)
    for name, target in scripts.items():
        assert f"{name} = {target}" in entry_points
