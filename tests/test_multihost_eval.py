"""Multi-process evaluation: two JAX processes × 2 CPU devices, process 0 with 3 batches of its rows and
process 1 with 1. Every process still takes the same number of eval steps (evals.perplexity pads the one whose
data ended with empty rows), and the result equals one process on 4 devices fed the same rows."""

import json
import subprocess
import sys
import textwrap

import numpy as np

from test_multihost import REPO, TIMEOUT, _env, _free_port

WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    import jax
    from infini_jax import sharding
    if num_processes > 1:
        assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    from flax import nnx
    from infini_jax import evals
    from infini_jax.model import InfiniTransformer, ModelConfig

    cfg = ModelConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2, head_dim=16, d_ff=64, segment_len=8,
                      n_segments=2, remat=False)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(InfiniTransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=1))
    subject = evals.Subject(cfg, params, mesh).on_mesh(mesh)

    def local(p, i):  # process p's 2 rows of batch i
        rng = np.random.default_rng([p, i])
        return dict(tokens=rng.integers(3, 259, (2, 16)).astype(np.int32),
                    targets=rng.integers(3, 259, (2, 16)).astype(np.int32),
                    loss_mask=np.ones((2, 16), np.float32), reset=np.array([i == 0, True]))

    n_batches = {0: 3, 1: 1}
    if num_processes > 1:
        batches = [local(process_id, i) for i in range(n_batches[process_id])]
    else:  # the reference: both processes' rows side by side, process 1's emptied after its data ends
        batches = []
        for i in range(3):
            b1 = local(1, i) if i < n_batches[1] else dict(local(1, 0), loss_mask=np.zeros((2, 16), np.float32),
                                                            reset=np.ones(2, bool))
            batches.append({k: np.concatenate([local(0, i)[k], b1[k]]) for k in b1})
    res = evals.evaluate_perplexity(subject, batches)
    print("RESULT " + json.dumps({k: res[k] for k in ("loss", "tokens", "documents", "batches")}), flush=True)
    if num_processes > 1:
        jax.distributed.shutdown()
''')


def _run(script, num_processes: int) -> list[dict]:
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(num_processes), port], cwd=REPO,
                              env=_env(4 // num_processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, out[-3000:]
            outs.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def test_uneven_hosts_take_the_same_steps_and_equal_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (ref,) = _run(script, 1)
    both = _run(script, 2)
    assert both[0] == both[1]  # every process sees the global sums
    assert both[0]["batches"] == ref["batches"] == 3 and both[0]["tokens"] == ref["tokens"] == 4 * 16 + 2 * 2 * 16
    assert both[0]["documents"] == ref["documents"]
    np.testing.assert_allclose(both[0]["loss"], ref["loss"], rtol=1e-5)
