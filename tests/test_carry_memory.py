"""train.carry_memory: the memory flows from one train step to the next with the document (truncated BPTT)."""

import functools

import jax
import numpy as np
import optax
import pytest

from infini_jax import optim as optim_lib
from infini_jax import sharding as shd
from infini_jax import step as T
from infini_jax.configs import base
from infini_jax.model import ModelConfig

MODEL = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, head_dim=8, d_ff=64, segment_len=8,
             n_segments=2, remat=False)
L = 16  # n_segments × segment_len
OPTIM = dict(name="adamw", lr=1e-2, warmup_steps=0, clip_norm=1.0)
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def documents(rows, seed=0):
    """int32 [rows, 2L + 1]: two windows of one document per row."""
    return np.random.default_rng(seed).integers(3, 64, (rows, 2 * L + 1)).astype(np.int32)


def window(doc_BT, k, reset_B, mask_B=None):
    """Window k of every row's document (contract batch); mask_B: rows whose loss counts (default all)."""
    rows = len(doc_BT)
    mask_BL = np.ones((rows, L), np.float32) * (np.ones(rows) if mask_B is None else mask_B)[:, None]
    return {"tokens": doc_BT[:, k * L:(k + 1) * L], "targets": doc_BT[:, k * L + 1:(k + 1) * L + 1],
            "loss_mask": mask_BL.astype(np.float32), "reset": np.asarray(reset_B, bool)}


@functools.cache
def trainer(model_items, mesh_items, rows, grad_accum=1, zero_lr=True):
    """(graphdef, host initial state, state shardings, jitted step, mesh); zero_lr: params never change."""
    model_cfg, mesh_cfg = ModelConfig(**dict(model_items)), dict(mesh_items)
    devices = jax.devices()[:1] if mesh_cfg == ONE_DEVICE else None
    mesh = shd.make_mesh(mesh_cfg, devices)
    if zero_lr:
        tx, lr_fn = optax.set_to_zero(), lambda s: 0.0
    else:
        tx, lr_fn, _ = optim_lib.make_optimizer({**OPTIM, "grad_accum": grad_accum}, 10)
    graphdef, state, state_sh, _ = T.create_train_state(model_cfg, tx, mesh, seed=0, memory_rows=rows)
    step = T.make_train_step(graphdef, optim_lib.Optimizer(tx, lr_fn), mesh=mesh, state_shardings=state_sh,
                             grad_accum=grad_accum)
    return graphdef, jax.device_get(state), state_sh, step, mesh


def run(batches, model=MODEL, mesh_cfg=ONE_DEVICE, grad_accum=1, zero_lr=True):
    """Losses of consecutive carry_memory train steps and the final state (host)."""
    rows = len(batches[0]["tokens"])
    _, init, state_sh, step, mesh = trainer(tuple(model.items()), tuple(mesh_cfg.items()), rows, grad_accum,
                                            zero_lr)
    state, losses = jax.device_put(init, state_sh), []
    for batch in batches:
        state, metrics = step(state, shd.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


@pytest.mark.parametrize("attention", ["infini", "xl"])
def test_two_steps_equal_one_streamed_forward(attention):
    model = {**MODEL, "attention": attention}
    doc_BT = documents(2)
    losses, state = run([window(doc_BT, 0, [True, True]), window(doc_BT, 1, [False, False])], model)
    graphdef, init = trainer(tuple(model.items()), tuple(ONE_DEVICE.items()), 2)[:2]
    both = {"tokens": doc_BT[:, :-1], "targets": doc_BT[:, 1:], "loss_mask": np.ones((2, 2 * L), np.float32),
            "reset": np.ones(2, bool)}
    tok, memory = T.token_losses(graphdef, init.params, both)  # one forward over both windows
    nll_BL = np.asarray(tok["nll"])
    np.testing.assert_allclose(losses, [nll_BL[:, :L].mean(), nll_BL[:, L:].mean()], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), state.memory,
                 jax.device_get(memory))
    # without the carried memory window 2 starts empty, and its loss is another one
    fresh, _ = T.token_losses(graphdef, init.params, window(doc_BT, 1, [True, True]))
    assert np.abs(np.asarray(fresh["nll"]) - nll_BL[:, L:]).max() > 1e-4


def test_reset_rows_start_empty():
    doc_BT, other_BT = documents(2, seed=1), documents(2, seed=2)
    changed_BT = np.concatenate([other_BT[:1, :L], doc_BT[1:, :L]])  # row 0's previous window differs
    changed_BT = np.concatenate([changed_BT, doc_BT[:, L:]], axis=1)

    def second_loss(first_BT, reset_B):  # the loss of row 0 in step 2
        return run([window(first_BT, 0, [True, True]), window(doc_BT, 1, reset_B, mask_B=np.array([1.0, 0.0]))])[0][1]

    assert second_loss(doc_BT, [True, False]) == second_loss(changed_BT, [True, False])
    assert second_loss(doc_BT, [False, False]) != second_loss(changed_BT, [False, False])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_and_accumulated_equal_one_device(scan_layers):
    model = {**MODEL, "scan_layers": scan_layers}
    doc_BT = documents(16, seed=3)
    reset_B = np.arange(16) % 3 == 0  # some rows start a new document in step 2
    batches = [window(doc_BT, 0, np.ones(16, bool)), window(doc_BT, 1, reset_B)]
    ref_losses, ref = run(batches, model, zero_lr=False)
    cases = [(dict(data=4, fsdp=1, tensor=2), 2), (dict(data=8, fsdp=1, tensor=1), 1),
             (dict(data=4, fsdp=1, context=2, tensor=1), 1)]  # context parallelism: the memory prefix
    for mesh_cfg, accum in cases[:1] if scan_layers else cases:  # stacked layers: the accumulated case
        losses, state = run(batches, model, mesh_cfg, accum, zero_lr=False)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), state.memory, ref.memory)


def config_with(**changes):
    config = base.get_config()
    with config.unlocked():
        for key, value in changes.items():
            section, name = key.split("__")
            config[section][name] = value
    return config


def test_default_off_and_state_without_memory():
    assert base.get_config().train.carry_memory is False
    mesh = shd.make_mesh(ONE_DEVICE, jax.devices()[:1])
    _, _, state_sh, abstract = T.create_train_state(ModelConfig(**MODEL), optax.sgd(0.1), mesh, init=False)
    assert state_sh.memory is None and abstract.memory is None


@pytest.mark.parametrize("changes, match", [
    (dict(data__name="passkey"), "data.name='passkey'"),
    (dict(data__name="text", model__attention="local"), "attention 'infini' or 'xl'"),
    (dict(data__name="text", model__attention="full"), "attention 'infini' or 'xl'"),
])
def test_config_errors(changes, match):
    config = config_with(train__carry_memory=True, **changes)
    with pytest.raises(ValueError, match=match):
        T.validate_config(config)
    T.validate_config(config_with(**{**changes, "train__carry_memory": False}))  # fine without carrying
