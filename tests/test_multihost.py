"""Multi-process training on one machine: two JAX processes × 2 CPU devices form one 4-device mesh.

Both processes run infini_jax.train.train_and_evaluate on the tiny config, each feeding only its own rows of
the global batch; they stop after 2 steps (an Orbax checkpoint written by both), then resume from it and
finish 4 steps. The losses must equal one uninterrupted single-process run on 4 devices.

Every run is a subprocess with a bounded timeout, killed on failure; the coordinator is 127.0.0.1 on a free
port and the collectives are gloo (infini_jax.sharding.initialize_distributed).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds per run (compiles of the tiny model take ~10-40 s on 2 shared cores)
STEPS = 4

WORKER = textwrap.dedent('''
    import json, sys
    process_id, num_processes, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    from infini_jax import sharding, train
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
    config.evals.passkey_x = ()  # no end-of-training passkey sweep here

    from infini_jax.data import make_iterator as real_make_iterator

    class Rows:
        """This process's rows of the one global batch (same data whatever the process count)."""
        def __init__(self, inner, pi, pc):
            self.inner, self.pi, self.pc = inner, pi, pc
        def __iter__(self):
            return self
        def __next__(self):
            batch = next(self.inner)
            n = len(batch["reset"]) // self.pc
            return {k: v[self.pi * n:(self.pi + 1) * n] for k, v in batch.items()}
        def get_state(self):
            return self.inner.get_state()
        def set_state(self, state):
            self.inner.set_state(state)

    def make_iterator(data_cfg, *, seq_len, batch_size, split, process_index=0, process_count=1, train=True,
                      segment_len=None):
        inner = real_make_iterator(data_cfg, seq_len=seq_len, batch_size=batch_size, split=split, train=train,
                                   segment_len=segment_len)
        return Rows(inner, process_index, process_count)

    stop_after = int(sys.argv[5]) if len(sys.argv) > 5 else None
    out = train.train_and_evaluate(config, workdir, progress=False, stop_after=stop_after,
                                   make_iterator=make_iterator)
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


def _start(script: Path, workdir: Path, num_processes: int, stop_after=None) -> list[subprocess.Popen]:
    """Starts the worker in `num_processes` processes (4 // num_processes devices each)."""
    port = str(_free_port())
    extra = [] if stop_after is None else [str(stop_after)]
    return [subprocess.Popen([sys.executable, str(script), str(i), str(num_processes), port, str(workdir)] + extra,
                             cwd=REPO, env=_env(4 // num_processes), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)]


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


def test_two_processes_match_one_and_resume(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    single, multi = tmp_path / "single", tmp_path / "multi"
    # The single-process reference runs alongside the first multi-process leg (compiles overlap).
    res_single, res = _wait(_start(script, single, 1), _start(script, multi, 2, stop_after=2))
    assert res_single == [{"process": 0, "step": STEPS, "preempted": False}]
    reference = _losses(single)
    assert sorted(reference) == list(range(1, STEPS + 1))
    # Both processes saved a checkpoint at step 2 and stopped.
    assert sorted(r["process"] for r in res) == [0, 1]
    assert all(r["preempted"] and r["step"] == 2 for r in res)
    assert (multi / "checkpoints" / "2").is_dir()
    (res,) = _wait(_start(script, multi, 2))  # both restore step 2 and finish
    assert all(not r["preempted"] and r["step"] == STEPS for r in res)

    losses = _losses(multi)  # written by process 0 only
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [reference[s] for s in sorted(reference)],
                               rtol=2e-5, atol=2e-6)
