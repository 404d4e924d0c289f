"""Evaluation on a mesh equals evaluation on one device: streamed perplexity (totals, curve, bits per byte),
the knock-out, the passkey sweep, a checkpoint restored straight into its shardings, and eval.py itself on
8 simulated devices; evaluators built from config.evals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infini_jax import evals
from infini_jax import sharding as shd
from infini_jax.data.tokenizers import ByteTokenizer
from infini_jax.data.windows import WindowIterator, Windows
from infini_jax.model import InfiniTransformer, ModelConfig

SEG = 8
CFG = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, head_dim=8, d_ff=64, segment_len=SEG,
                  n_segments=2, remat=False)
MESHES = [dict(data=2, fsdp=2, tensor=2), dict(data=4, fsdp=1, tensor=2)]


@pytest.fixture(scope="module")
def model():
    m = InfiniTransformer(CFG, rngs=nnx.Rngs(0))
    for i, block in enumerate(m.blocks):  # spread the gates so memory matters
        block.attn.gate_logit[...] = jnp.asarray([1.5, -0.5, 0.5, 0.0]) + i
    return m


def on_mesh(model, mesh_cfg) -> evals.Subject:
    return evals.Subject.from_model(model, ByteTokenizer()).on_mesh(shd.make_mesh(mesh_cfg))


def batches():
    rng = np.random.default_rng(0)
    docs = []
    for n in (37, 5, 50, 17, 29, 61, 8, 40):
        seq = np.concatenate([[1], rng.integers(3, 259, n - 2), [2]]).astype(np.int32)
        score = np.ones(n, np.float32)
        score[0] = 0
        docs.append((seq, score))
    return list(WindowIterator(len(docs), lambda i: docs[i], Windows(seq_len=2 * SEG, batch_size=4, pad_id=0,
                                                                    train=False)))


@pytest.fixture(scope="module")
def one_device(model):
    subject = evals.Subject.from_model(model, ByteTokenizer())
    return (evals.evaluate_perplexity(subject, batches()),
            evals.evaluate_perplexity(subject.knocked_out(), batches()))


@pytest.mark.parametrize("mesh_cfg", MESHES)
def test_sharded_perplexity_equals_one_device(model, one_device, mesh_cfg):
    subject = on_mesh(model, mesh_cfg)
    assert "tensor" in str(subject.params["blocks"][0]["attn"]["wq_dhk"].sharding.spec)
    ref, ref_ko = one_device
    got = evals.evaluate_perplexity(subject, batches())
    got_ko = evals.evaluate_perplexity(subject.knocked_out(), batches())
    for a, b in ((got, ref), (got_ko, ref_ko)):
        assert (a["tokens"], a["bytes"], a["documents"], a["batches"]) == (b["tokens"], b["bytes"], b["documents"],
                                                                         b["batches"])
        for k in ("loss", "accuracy", "seq_accuracy", "bits_per_byte"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5)
        np.testing.assert_allclose(a["segment_curve"]["loss"], b["segment_curve"]["loss"], rtol=2e-5)
    assert abs(ref["loss"] - ref_ko["loss"]) > 1e-4  # the knock-out changed something


def test_sharded_passkey_equals_one_device(model):
    tok = ByteTokenizer()
    ref = evals.passkey_sweep(evals.Subject.from_model(model, tok), tok, [300], [0.0, 0.5, 1.0], trials=1, seed=3)
    got = evals.passkey_sweep(on_mesh(model, MESHES[0]), tok, [300], [0.0, 0.5, 1.0], trials=1, seed=3)  # 3 rows → 4
    assert got["accuracy"] == ref["accuracy"] and got["digit_accuracy"] == ref["digit_accuracy"]
    np.testing.assert_allclose([c["answer_nll"] for c in got["cells"]], [c["answer_nll"] for c in ref["cells"]],
                               rtol=1e-4)


def test_checkpoint_restores_into_the_mesh_shardings(model, tmp_path):
    from types import SimpleNamespace

    from infini_jax.checkpoint import Checkpointer
    from infini_jax.config import load_config

    config = load_config("tiny")
    with config.unlocked():
        config.model.update(**{k: getattr(CFG, k) for k in ("d_model", "num_heads", "head_dim", "d_ff",
                                                           "segment_len", "n_segments", "remat")})
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = SimpleNamespace(params=params, opt_state={}, step=np.int32(3), rng=np.zeros(2, np.uint32))
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(3, state, None, config)
    ckpt.close()
    mesh = shd.make_mesh(MESHES[0])
    subject, info = evals.load_subject(config, workdir=str(tmp_path), mesh=mesh)
    wq = subject.params["blocks"][1]["attn"]["wq_dhk"]
    assert info["step"] == 3 and wq.sharding.mesh == mesh and len({str(s.index) for s in wq.addressable_shards}) > 1
    np.testing.assert_array_equal(jax.device_get(wq), np.asarray(params["blocks"][1]["attn"]["wq_dhk"]))


def test_evaluators_from_config():
    built = evals.from_config({"passkey": dict(type="passkey", x=(1,)),
                               "val": dict(type="perplexity", every=50, split="test", batches=2)})
    assert [type(e).__name__ for e in built] == ["Passkey", "Perplexity"]
    assert built[0].options["trials"] == evals.EVALS_DEFAULTS["passkey"]["trials"] and built[0].every == 0
    assert built[1].due(100, final=False) and not built[1].due(75, final=False) and built[1].due(75, final=True)
    with pytest.raises(ValueError, match="unknown config.evals.passkey keys \\['trails'\\]"):
        evals.from_config({"passkey": dict(type="passkey", trails=3)})
    with pytest.raises(ValueError, match="not an evaluator type"):
        evals.from_config({"p": dict(type="perplexityy")})


def _eval_cli(out, devices: int, *args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    r = subprocess.run([sys.executable, str(repo / "eval.py"), "--config", "tiny", "--noprogress", "--init_random",
                        "--out_dir", str(out), "--config.model.d_model=32", "--config.model.d_ff=64",
                        "--config.data.eval_batches=2", "--batch_size=4", *args],
                       capture_output=True, text=True, timeout=300, env=env, cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, json.loads((out / "results.json").read_text())


def test_eval_cli_on_8_devices_equals_one(tmp_path):
    tasks = ("--tasks", "perplexity,knockout,passkey", "--passkey_lengths", "400", "--passkey_depths", "0,1")
    _, one = _eval_cli(tmp_path / "one", 1, *tasks)
    stdout, eight = _eval_cli(tmp_path / "eight", 8, *tasks, "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    assert "'data': 2, 'fsdp': 2" in stdout and "'tensor': 2" in stdout
    for task in ("perplexity", "knockout"):
        assert eight[task]["tokens"] == one[task]["tokens"] > 0
        np.testing.assert_allclose(eight[task]["loss"], one[task]["loss"], rtol=2e-5)
    assert eight["passkey"]["digit_accuracy"] == one["passkey"]["digit_accuracy"]
