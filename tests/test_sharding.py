"""Mesh construction and the logical-axis → mesh-axis rules (8 simulated CPU devices, see conftest.py)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from infini_jax import sharding as shd
from infini_jax.model import InfiniTransformer, ModelConfig


def _cfg(**kw):
    base = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, head_dim=8, d_ff=64, segment_len=8,
                n_segments=2, remat=False)
    return ModelConfig(**{**base, **kw})


def _abstract(cfg):
    return nnx.eval_shape(lambda: InfiniTransformer(cfg, rngs=nnx.Rngs(0)))


def test_mesh_shape_resolves_minus_one_and_rejects_bad_configs():
    assert shd.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == dict(data=2, fsdp=2, tensor=2)
    assert shd.mesh_shape(dict(data=1, fsdp=1, context=2, tensor=-1), 8) == dict(data=1, fsdp=1, context=2,
                                                                               tensor=4)
    with pytest.raises(ValueError, match="only one axis"):
        shd.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
    with pytest.raises(ValueError, match="unknown config.mesh keys"):
        shd.mesh_shape(dict(data=-1, fsdp=1, tensor=1, model=2), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        shd.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)


def test_make_mesh_axes():
    mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=-1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2)


def test_param_shardings_follow_rules_with_fallbacks():
    mesh = shd.make_mesh(dict(data=1, fsdp=4, tensor=2))
    sh = shd.param_shardings(_abstract(_cfg(num_kv_heads=1)), mesh)
    attn = sh["blocks"][0]["attn"]
    assert attn["wq_dhk"].spec == P("fsdp", "tensor", None)
    assert attn["wk_dgk"].spec == P("fsdp", None, None)  # kv_heads=1 cannot split over tensor=2
    assert attn["wo_hkd"].spec == P("tensor", None, "fsdp")
    assert attn["gate_logit"].spec == P("tensor")
    assert sh["blocks"][0]["mlp"]["w_up_df"].spec == P("fsdp", "tensor")
    assert sh["embed_vd"].spec == P("tensor", "fsdp")
    # vocab 65 does not divide tensor=2: that dimension only is replicated
    sh = shd.param_shardings(_abstract(_cfg(vocab_size=65)), mesh)
    assert sh["embed_vd"].spec == P(None, "fsdp")


def test_logical_to_spec_never_reuses_a_mesh_axis():
    mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert shd.logical_to_spec(("mlp", "heads"), (4, 4), mesh) == P("tensor", None)
    assert shd.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="no sharding rule"):
        shd.logical_to_spec(("nonsense",), (4,), mesh)


def test_heads_and_batch_divisibility_are_errors():
    mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=8))
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by the mesh tensor axis"):
        shd.param_shardings(_abstract(_cfg()), mesh)
    mesh = shd.make_mesh(dict(data=4, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="batch size 12 is not divisible"):
        shd.check_divisibility(mesh, num_heads=4, batch_size=12)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_opt_state_shardings_match_params(name):
    mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
    cfg = _cfg(d_model=256, d_ff=256)  # big enough for Adafactor to factor
    amodel = _abstract(cfg)
    params = nnx.to_pure_dict(nnx.state(amodel, nnx.Param))
    psh = shd.param_shardings(amodel, mesh)
    tx = optax.adamw(1e-3) if name == "adamw" else optax.adafactor(1e-3)
    opt_shapes = jax.eval_shape(tx.init, params)
    osh = shd.opt_state_shardings(opt_shapes, params, psh, mesh)
    flat = {jax.tree_util.keystr(p): (s, x) for (p, s), (_, x) in zip(
        jax.tree_util.tree_flatten_with_path(osh)[0], jax.tree_util.tree_flatten_with_path(opt_shapes)[0])}
    w = [k for k in flat if "w_up_df" in k]
    assert w
    for k in w:
        s, x = flat[k]
        assert len(s.spec) <= x.ndim
        if x.shape == (256, 256):
            assert s.spec == P("fsdp", "tensor")
        elif x.shape == (256,):  # factored row / column statistics
            assert s.spec in (P("fsdp"), P("tensor"))
    for k, (s, x) in flat.items():
        if x.ndim == 0:
            assert s.spec == P()
    # every sharding is valid for its leaf
    jax.tree.map(lambda s, x: s.shard_shape(x.shape), osh, opt_shapes)


def test_memory_shardings_and_global_batch():
    mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
    model = _abstract(_cfg())
    mem = jax.eval_shape(lambda: model.init_memory(8))
    msh = shd.memory_shardings(mesh, mem)
    assert msh[0].M.spec == P(("data", "fsdp"), "tensor", None, None)
    assert msh[0].z.spec == P(("data", "fsdp"), "tensor", None)
    xl = jax.eval_shape(lambda: _abstract(_cfg(attention="xl")).init_memory(8))
    xsh = shd.memory_shardings(mesh, xl)
    assert xsh[0].x.spec == P(("data", "fsdp"), None, None)  # hidden states [B, N, D]: rows split
    assert xsh[0].valid.spec == P(("data", "fsdp"))
    local = {"tokens": np.zeros((8, 16), np.int32), "reset": np.ones((8,), bool)}
    gb = shd.global_batch(local, mesh)
    assert gb["tokens"].shape == (8, 16) and gb["reset"].shape == (8,)
    assert gb["tokens"].sharding.spec == P(("data", "fsdp"))
    assert len(gb["tokens"].addressable_shards) == 8


def test_data_shard_single_process():
    mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert shd.data_shard(mesh, 8) == (0, 1)
    gb = shd.global_batch({"tokens": np.arange(16, dtype=np.int32).reshape(8, 2)}, mesh, 8)
    np.testing.assert_array_equal(np.asarray(gb["tokens"]), np.arange(16).reshape(8, 2))
