"""Bad input to the real train.py / eval.py CLIs: one line on stderr naming the problem and the fix, a non-zero
exit code, and no workdir left behind. Run as subprocesses with JAX_PLATFORMS unset, as a user would: the
console must also be free of libtpu's start-up noise on this CPU host (the `tpu` extra is installed)."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (cli, args after the script, substrings the one stderr line must hold). {w}: a workdir that must not appear.
CASES = {
    "misspelt config name": ("train.py", ["--config", "tny", "--workdir", "{w}"], ["tny", "tiny"]),
    "misspelt config file": ("train.py", ["--config", "configs/tny.py", "--workdir", "{w}"], ["tny.py"]),
    "bad config arg": ("train.py", ["--config", "tiny:rule=fast", "--workdir", "{w}"], ["rule", "fast"]),
    "misspelt key": ("train.py", ["--config", "tiny", "--config.train.stpes=5", "--workdir", "{w}"],
                     ["stpes", "steps"]),
    "bad value": ("train.py", ["--config", "tiny", "--config.train.steps=0", "--workdir", "{w}"], ["steps"]),
    "no workdir": ("train.py", ["--config", "tiny"], ["--workdir"]),
    "missing data_dir": ("train.py", ["--config", "tiny", "--config.data.name=text",
                                      "--config.data.data_dir=/no/such/dir", "--workdir", "{w}"],
                         ["/no/such/dir", "does not exist"]),
    "missing init_from": ("train.py", ["--config", "tiny", "--config.train.init_from=/no/such/run",
                                       "--workdir", "{w}"], ["no checkpoint found", "/no/such/run"]),
    "missing tokenizer": ("train.py", ["--config", "tiny", "--config.data.tokenizer=/no/such.model",
                                       "--workdir", "{w}"], ["/no/such.model"]),
    "kv heads not dividing heads": ("train.py", ["--config", "tiny", "--config.model.num_kv_heads=3",
                                                 "--workdir", "{w}"], ["num_kv_heads"]),
    "eval: missing workdir": ("eval.py", ["--config", "tiny", "--workdir", "{w}"], ["does not exist"]),
    "eval: unknown task": ("eval.py", ["--config", "tiny", "--init_random", "--out_dir", "{w}", "--tasks", "nope"],
                           ["nope"]),
}


def _run(cli, args, workdir):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY", "XLA_FLAGS")}
    return subprocess.run([sys.executable, str(REPO / cli), *[a.replace("{w}", str(workdir)) for a in args]],
                          capture_output=True, text=True, timeout=180, env=env, cwd=REPO)


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(_run, cli, args, tmp_path / f"w{i}")
                for i, (name, (cli, args, _)) in enumerate(CASES.items())}
    problems = []
    for i, (name, (cli, args, needles)) in enumerate(CASES.items()):
        r = runs[name].result()
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        if r.returncode == 0 or len(lines) != 1 or not lines[0].startswith("error: ") \
                or not all(n in lines[0] for n in needles):
            problems.append(f"{name}: exit {r.returncode}, stderr:\n{r.stderr[-1500:]}")
        if (tmp_path / f"w{i}").exists():
            problems.append(f"{name}: left {tmp_path / f'w{i}'} behind")
    assert not problems, "\n\n".join(problems)
