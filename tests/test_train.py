"""The sharded train step equals the single-device step; grad accumulation; config errors before compiling."""

import jax
import ml_collections
import numpy as np
import pytest

from infini_jax import optim as optim_lib
from infini_jax import sharding as shd
from infini_jax import loop
from infini_jax import step as T
from infini_jax.model import ModelConfig, gate_values

MODEL = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, head_dim=8, d_ff=64, segment_len=8,
             n_segments=2, remat=False)
OPTIM = dict(name="adamw", lr=1e-2, gate_lr=3e-2, warmup_steps=1, weight_decay=0.1, clip_norm=1.0)


def make_batch(step, batch=8, seq_len=16, vocab=64, seed=0):
    rng = np.random.default_rng([seed, step])
    seq = rng.integers(3, vocab, (batch, seq_len + 1)).astype(np.int32)
    mask = np.ones((batch, seq_len), np.float32)
    for b in range(batch):  # row-dependent masks: microbatches hold different token counts, so the
        mask[b, : 1 + (step + 3 * b) % 7] = 0.0  # accumulation must weight by tokens, not by microbatch
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask, "reset": np.ones((batch,), bool)}


def run_steps(mesh_cfg, n_steps=2, devices=None, grad_accum=1, optim=OPTIM, model=MODEL, init_from=None):
    """Losses, final params (host) and state after n_steps; `init_from` (a host TrainState) skips the
    random init (one init compile fewer per mesh) and places that state with this mesh's shardings."""
    model_cfg = ModelConfig(**model)
    mesh = shd.make_mesh(mesh_cfg, devices)
    tx, lr_fn, _ = optim_lib.make_optimizer({**optim, "grad_accum": grad_accum}, 10)
    graphdef, state, state_sh, _ = T.create_train_state(model_cfg, tx, mesh, seed=0, init=init_from is None)
    if init_from is not None:
        state = jax.device_put(init_from, state_sh)
    step = T.make_train_step(graphdef, optim_lib.Optimizer(tx, lr_fn), mesh=mesh, state_shardings=state_sh,
                             grad_accum=grad_accum)
    losses = []
    for i in range(n_steps):
        state, metrics = step(state, shd.global_batch(make_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def init_state():
    mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx, _, _ = optim_lib.make_optimizer(OPTIM, 10)
    return jax.device_get(T.create_train_state(ModelConfig(**MODEL), tx, mesh, seed=0)[1])


@pytest.fixture(scope="module")
def single_device(init_state):
    return run_steps(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1], init_from=init_state)


@pytest.mark.parametrize("mesh_cfg", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2),
                                      dict(data=1, fsdp=4, tensor=2)])
def test_sharded_step_matches_single_device(single_device, init_state, mesh_cfg):
    ref_losses, ref_params, _ = single_device
    losses, params, state = run_steps(mesh_cfg, init_from=init_state)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params, ref_params)
    assert int(state.step) == 2
    if mesh_cfg["tensor"] == 2:
        wq = state.params["blocks"][0]["attn"]["wq_dhk"]
        assert "tensor" in str(wq.sharding.spec)
        assert len({str(s.index) for s in wq.addressable_shards}) > 1  # really split


def test_grad_accumulation_matches_full_batch(single_device, init_state):
    ref_losses, ref_params, _ = single_device
    losses, params, _ = run_steps(dict(data=2, fsdp=1, tensor=1), devices=jax.devices()[:2], grad_accum=2,
                                  init_from=init_state)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params, ref_params)


def test_metrics_loss_decreases_and_nonfinite_step_leaves_state_unchanged(init_state):
    mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx, lr_fn, glr = optim_lib.make_optimizer(OPTIM, 10)
    graphdef, _, state_sh, _ = T.create_train_state(ModelConfig(**MODEL), tx, mesh, init=False)
    state = jax.device_put(init_state, state_sh)
    step = T.make_train_step(graphdef, optim_lib.Optimizer(tx, lr_fn, glr), mesh=mesh, state_shardings=state_sh)
    batch = shd.global_batch(make_batch(0), mesh)
    first = None
    for _ in range(6):
        state, m = step(state, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < first
    assert set(m) >= {"loss", "accuracy", "grad_norm", "lr", "gate_lr", "tokens"}
    assert float(m["tokens"]) == make_batch(0)["loss_mask"].sum()
    assert abs(first - np.log(64)) < 0.5  # a fresh model is near uniform
    before = jax.device_get(state.params)
    bad = make_batch(0)
    bad["loss_mask"] = np.full_like(bad["loss_mask"], np.nan)
    state, m = step(state, shd.global_batch(bad, mesh))
    assert not np.isfinite(float(m["loss"]))
    assert int(state.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def _config(**train):
    c = ml_collections.ConfigDict()
    c.model = dict(MODEL)
    c.data = dict(name="fake")
    c.train = dict(steps=4, batch_size=8, **train)
    c.optim = dict(OPTIM)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c


def test_config_errors_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="unknown config.train keys \\['stepz'\\]"):
        T.validate_config(_config(stepz=3))
    c = _config()
    c.model.n_segments = 0
    with pytest.raises(ValueError, match="n_segments"):
        T.validate_config(c)
    c = _config()
    c.model.extra = 1
    with pytest.raises(ValueError, match="unknown model config keys"):
        T.validate_config(c)
    c = _config()
    c.optim.grad_accum = 3
    with pytest.raises(ValueError, match="not divisible by optim.grad_accum"):
        T.validate_config(c)
    # mesh-dependent errors come from train_and_evaluate before anything is built or compiled
    never = lambda *a, **k: pytest.fail("no data iterator should be built")  # noqa: E731
    c = _config()
    c.train.batch_size = 4  # 8 data shards
    with pytest.raises(ValueError, match="batch size 4 is not divisible by the mesh batch axes"):
        loop.train_and_evaluate(c, tmp_path / "a", progress=False, make_iterator=never)
    c = _config()
    c.mesh = dict(data=1, fsdp=1, tensor=8)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by the mesh tensor axis"):
        loop.train_and_evaluate(c, tmp_path / "b", progress=False, make_iterator=never)
    c = _config()
    c.optim.grad_accum = 2
    with pytest.raises(ValueError, match="microbatch"):
        loop.train_and_evaluate(c, tmp_path / "c", progress=False, make_iterator=never)
    c = _config()  # the real data pipeline (no make_iterator): byte tokens, 259 of them
    with c.unlocked():
        c.data = dict(name="passkey", tokenizer="byte")
    with pytest.raises(ValueError, match="259 tokens but config.model.vocab_size is 64"):
        loop.train_and_evaluate(c, tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def test_bf16_compute_f32_params_with_adafactor(single_device):
    ref_losses, _, _ = single_device
    adafactor = dict(OPTIM, name="adafactor", b1=0.0)
    losses, params, state = run_steps(dict(data=-1, fsdp=1, tensor=1), model={**MODEL, "dtype": "bfloat16"},
                                      optim=adafactor)
    assert all(np.isfinite(losses))
    assert abs(losses[0] - ref_losses[0]) < 0.02 * ref_losses[0]  # same init, bf16 activations
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    assert int(state.step) == 2


@pytest.mark.parametrize("name", ["adafactor"])  # AdamW on a mesh: test_sharded_step_matches_single_device
def test_scan_layers_sharded_step_matches_single_device(name):
    """Stacked layers ([layers, ...] params, scan over layers): the (2, 2, 2) mesh step equals one device.
    Adafactor, whose factored second moments make the optimizer state's shardings the harder case."""
    model = dict(MODEL, num_layers=2, scan_layers=True)
    optim = dict(OPTIM, name=name)
    ref_losses, ref_params, _ = run_steps(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1],
                                          model=model, optim=optim)
    losses, params, state = run_steps(dict(data=2, fsdp=2, tensor=2), model=model, optim=optim)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params, ref_params)
    wq = state.params["blocks"]["attn"]["wq_dhk"]
    assert wq.shape[0] == 2 and wq.sharding.spec[0] is None and "tensor" in str(wq.sharding.spec)
    assert gate_values(state.params).shape == (2, 4)
    decay = optim_lib.decay_mask(state.params)
    assert not decay["blocks"]["attn_norm"]["scale"] and decay["blocks"]["attn"]["wq_dhk"]
