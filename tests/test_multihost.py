"""Multi-process training on one machine: two JAX processes × 2 CPU devices form one 4-device mesh.

Both processes run infini_jax.loop.train_and_evaluate on the tiny config, each reading its own rows through
the library's data path (infini_jax.data.make_iterator with its process index); the single-process reference
feeds the same two streams side by side. Both get SIGTERM a few steps in: JAX's preemption sync manager (no Python handler, no
per-step collective) makes them save the same step and exit 0; they then resume from it and finish. The
losses must equal one uninterrupted single-process run on 4 devices.

Every run is a subprocess with a bounded timeout, killed on failure; the coordinator is 127.0.0.1 on a free
port and the collectives are gloo (infini_jax.sharding.initialize_distributed).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds per run (compiles of the tiny model take ~10-40 s on 2 shared cores)
STEPS = 8
SLOW = 1.0  # seconds per batch in the preempted run, so SIGTERM lands well before its end

WORKER = textwrap.dedent('''
    import json, os, sys, time
    SLOW = float(os.environ.get("WORKER_SLOW", "0"))
    process_id, num_processes, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    from infini_jax import loop, sharding
    if num_processes > 1:
        assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.device_count() == 4, jax.devices()
    from infini_jax.config import load_config
    config = load_config("tiny")
    config.train.steps = STEPS
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.ckpt_every = 0
    config.train.eval_batches = 1
    config.model.num_layers = 1  # compile time is what this test spends; one layer exercises the same paths
    config.evals.passkey.x = ()  # no end-of-training passkey sweep here

    from infini_jax.data import make_iterator as real_make_iterator

    import numpy as np

    class Concat:
        """The single-process reference's global batch: the library's streams of processes 0 and 1, in order."""
        def __init__(self, parts):
            self.parts = parts
        def __iter__(self):
            return self
        def __next__(self):
            batches = [next(p) for p in self.parts]
            return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        def get_state(self):
            return [p.get_state() for p in self.parts]
        def set_state(self, state):
            for p, s in zip(self.parts, state):
                p.set_state(s)

    class Slow:
        """The library's own iterator of this process, SLOW seconds per batch."""
        def __init__(self, inner):
            self.inner = inner
        def __iter__(self):
            return self
        def __next__(self):
            time.sleep(SLOW)
            return next(self.inner)
        def get_state(self):
            return self.inner.get_state()
        def set_state(self, state):
            self.inner.set_state(state)

    def make_iterator(data_cfg, *, shard=(0, 1), **kw):
        if num_processes == 1:
            return Concat([real_make_iterator(data_cfg, shard=(i, 2), **kw) for i in range(2)])
        return Slow(real_make_iterator(data_cfg, shard=shard, **kw))

    out = loop.train_and_evaluate(config, workdir, progress=False, make_iterator=make_iterator)
    print("RESULT " + json.dumps({"process": jax.process_index(), "step": out["step"],
                                  "preempted": out["preempted"]}), flush=True)
    if num_processes > 1:
        jax.distributed.shutdown()
''').replace("STEPS", str(STEPS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _start(script: Path, workdir: Path, num_processes: int, slow: float = 0.0) -> list[subprocess.Popen]:
    """Starts the worker in `num_processes` processes (4 // num_processes devices each)."""
    port = str(_free_port())
    env = dict(_env(4 // num_processes), WORKER_SLOW=str(slow))
    return [subprocess.Popen([sys.executable, str(script), str(i), str(num_processes), port, str(workdir)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)]


def _sigterm_after_step(procs: list[subprocess.Popen], workdir: Path, step: int) -> None:
    """SIGTERM to every process once process 0 has logged `step` (a TPU VM preemption signals every host)."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (workdir / "metrics.jsonl").exists() and any(
                json.loads(line)["step"] >= step for line in (workdir / "metrics.jsonl").read_text().splitlines()):
            for p in procs:
                p.send_signal(signal.SIGTERM)
            return
        time.sleep(0.1)


def _wait(*groups: list[subprocess.Popen]) -> list[list[dict]]:
    """The RESULT lines of each group of processes. Every process is killed if any fails or the timeout
    passes."""
    procs = [p for g in groups for p in g]
    outputs = {}
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outputs[p] = out
            if p.returncode != 0:
                pytest.fail(f"worker exited with {p.returncode}:\n{out[-4000:]}")
    except subprocess.TimeoutExpired:
        pytest.fail(f"run did not finish in {TIMEOUT} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [[json.loads(line[len("RESULT "):]) for p in g for line in outputs[p].splitlines()
             if line.startswith("RESULT ")] for g in groups]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_two_processes_preempted_save_the_same_step_and_resume_exactly(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    single, multi = tmp_path / "single", tmp_path / "multi"
    # The single-process reference runs alongside the first multi-process leg (compiles overlap).
    ref_procs, procs = _start(script, single, 1), _start(script, multi, 2, slow=SLOW)
    _sigterm_after_step(procs, multi, 2)
    res_single, res = _wait(ref_procs, procs)  # every process must exit 0
    assert res_single == [{"process": 0, "step": STEPS, "preempted": False}]
    reference = _losses(single)
    assert sorted(reference) == list(range(1, STEPS + 1))
    # Both processes stopped at the same step, before the end, with a checkpoint of it written by both.
    assert sorted(r["process"] for r in res) == [0, 1]
    stopped = {r["step"] for r in res}
    assert all(r["preempted"] for r in res) and len(stopped) == 1, res
    (stop,) = stopped
    assert 2 <= stop < STEPS and (multi / "checkpoints" / str(stop)).is_dir()
    (res,) = _wait(_start(script, multi, 2))  # both restore that step and finish
    assert all(not r["preempted"] and r["step"] == STEPS for r in res)

    losses = _losses(multi)  # written by process 0 only
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [reference[s] for s in sorted(reference)],
                               rtol=2e-5, atol=2e-6)
