"""Optimizer chains: schedule, the gate (β) parameter group, masked weight decay, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from infini_jax import optim
from infini_jax.model import InfiniTransformer, ModelConfig, is_gate_path


def _params():
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, head_dim=8, d_ff=32, segment_len=4,
                      n_segments=2, remat=False, gate_init=0.0)
    return nnx.to_pure_dict(nnx.state(InfiniTransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))


def _step(optim_cfg, params, grads, total=100):
    tx, _, _ = optim.make_optimizer(optim_cfg, total)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_schedule_warmup_cosine_min_ratio():
    s = optim.make_schedule(1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert float(s(0)) == 0.0
    assert abs(float(s(5)) - 0.5) < 1e-6
    assert abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(100)) - 0.1) < 1e-6
    assert float(s(50)) < 1.0
    c = optim.make_schedule(2.0, total_steps=100, warmup_steps=0, schedule="constant")
    assert float(c(0)) == float(c(99)) == 2.0


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_gate_lr_changes_only_beta_update(name):
    params = _params()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
    base = dict(name=name, lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=None)
    a = _step({**base, "gate_lr": 1e-2}, params, grads)
    b = _step({**base, "gate_lr": 1e-1}, params, grads)
    beta0 = params["blocks"][0]["attn"]["gate_logit"]
    da = a["blocks"][0]["attn"]["gate_logit"] - beta0
    db = b["blocks"][0]["attn"]["gate_logit"] - beta0
    np.testing.assert_allclose(np.asarray(db), 10 * np.asarray(da), rtol=1e-5)
    assert np.all(np.asarray(da) < 0)  # descent
    for path, x in jax.tree_util.tree_flatten_with_path(a)[0]:
        if not is_gate_path(path):
            y = b
            for k in path:
                y = y[k.key]
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_weight_decay_skips_beta_and_norms():
    params = _params()
    params["blocks"][0]["attn"]["gate_logit"] = jnp.full((2,), 3.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new = _step(dict(name="adamw", lr=0.1, gate_lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5,
                     clip_norm=1.0), params, zeros)
    np.testing.assert_array_equal(np.asarray(new["blocks"][0]["attn"]["gate_logit"]), 3.0)
    np.testing.assert_array_equal(np.asarray(new["final_norm"]["scale"]), np.asarray(params["final_norm"]["scale"]))
    w0, w1 = params["blocks"][0]["mlp"]["w_up_df"], new["blocks"][0]["mlp"]["w_up_df"]
    np.testing.assert_allclose(np.asarray(w1), np.asarray(w0) * (1 - 0.1 * 0.5), rtol=1e-6)


def test_labels_and_masks():
    params = _params()
    labels = optim.param_labels(params)
    assert labels["blocks"][0]["attn"]["gate_logit"] == "gate"
    assert labels["blocks"][0]["attn"]["wq_dhk"] == "default"
    mask = optim.decay_mask(params)
    assert mask["blocks"][0]["attn"]["gate_logit"] is False and mask["embed_vd"] is True


def test_optim_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown config.optim keys \\['lr_peak'\\]"):
        optim.optim_config(dict(lr_peak=1.0))
    with pytest.raises(ValueError, match="optim.name"):
        optim.optim_config(dict(name="sgd"))
    with pytest.raises(ValueError, match="grad_accum"):
        optim.optim_config(dict(grad_accum=0))
    assert optim.optim_config({})["gate_lr"] is None
