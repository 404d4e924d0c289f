"""Context parallelism (infini_jax/context.py) on 8 simulated devices: a sequence's segments split over the
`context` mesh axis give the single-device outputs, final memory, loss and gradients, for both rules and
both modes, combined with data / fsdp / tensor axes; wrong sizes are errors before anything compiles."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from infini_jax import attention as A
from infini_jax import context as C
from infini_jax import optim as optim_lib
from infini_jax import sharding as shd
from infini_jax import loop
from infini_jax import step as T
from infini_jax.model import InfiniTransformer, ModelConfig

B, S, N, H, G, K, V = 2, 8, 8, 4, 2, 4, 5  # grouped-query: 4 query heads read 2 memories
MODEL = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
             segment_len=8, n_segments=8, remat=False)
OPTIM = dict(name="adamw", lr=1e-2, gate_lr=3e-2, warmup_steps=1, weight_decay=0.1, clip_norm=1.0)
DATA2_CONTEXT4 = dict(data=2, fsdp=1, context=4, tensor=1)
DATA2_FSDP2_CONTEXT2 = dict(data=2, fsdp=2, context=2, tensor=1)
DATA2_CONTEXT2_TENSOR2 = dict(data=2, fsdp=1, context=2, tensor=2)


def _inputs(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, S * N, H, K))
    k = jax.random.normal(ks[1], (B, S * N, G, K))
    v = jax.random.normal(ks[2], (B, S * N, G, V))
    state = A.MemoryState(M=jax.random.normal(ks[3], (B, G, K, V)),  # a memory from earlier calls
                          z=jax.nn.softplus(jax.random.normal(ks[4], (B, G, K))) * 8)
    scale = jnp.exp(jax.random.uniform(ks[5], (B, S)) * 2)  # write scales (memory-mass augmentation)
    return q, k, v, jnp.array([-1.0, 0.0, 1.0, 2.0]), state, scale


def _loss_and_grads(rule, mode, mesh=None, **kw):
    """(loss, final memory, outputs) and the gradients w.r.t. q, k, v, β and the incoming memory."""
    def f(q, k, v, beta, state):
        out, final = C.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, rule, mode, rope_base=100.0),
                                                 memory=state, **kw)
        return jnp.sum(out ** 2) + jnp.sum(final.M ** 2) + jnp.sum(final.z), (out, final)

    fn = jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)
    q, k, v, beta, state, _ = _inputs()
    if mesh is None:
        return jax.jit(fn)(q, k, v, beta, state)
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, beta, state))  # the context path really runs
        return jax.jit(fn)(q, k, v, beta, state)


def _close(got, want, rtol=2e-4, atol=2e-5):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


@pytest.mark.parametrize("rule,mode,mesh_cfg", [
    *[(r, m, DATA2_CONTEXT4) for r in A.RULES for m in A.MODES],
    ("delta", "scan", dict(data=1, fsdp=1, context=8, tensor=1)),  # one segment per device
])
def test_attention_sequence_split_over_context_equals_one_device(rule, mode, mesh_cfg):
    """Outputs, the final memory (M, z) and every gradient, from a non-empty incoming memory."""
    _close(_loss_and_grads(rule, mode, shd.make_mesh(mesh_cfg)), _loss_and_grads(rule, mode))


@pytest.mark.parametrize("rule", A.RULES)
def test_write_scale_and_empty_memory_split_over_context(rule):
    """Per-segment write scales travel with their segments; an empty start reads nothing on the first device."""
    q, k, v, beta, _, scale = _inputs(1)

    def f(q, k, v, beta, scale):
        return C.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, rule), write_scale_bs=scale)

    want = f(q, k, v, beta, scale)
    with jax.set_mesh(shd.make_mesh(DATA2_CONTEXT4)):
        got = jax.jit(f)(q, k, v, beta, scale)
    _close(got, want)


def test_context_split_is_checked_before_tracing():
    q, k, v, beta, _, _ = _inputs()
    with jax.set_mesh(shd.make_mesh(dict(data=1, fsdp=1, context=8, tensor=1))):
        with pytest.raises(ValueError, match="make model.n_segments a multiple of 8"):
            C.infini_attention_sequence(q[:, :6 * N], k[:, :6 * N], v[:, :6 * N], beta, A.SequenceOptions(N, "delta"))
    with pytest.raises(ValueError, match="model.n_segments=6 is not divisible by the mesh context axis \\(4\\)"):
        shd.check_divisibility(shd.make_mesh(DATA2_CONTEXT4), num_heads=4, n_segments=6)
    with jax.set_mesh(shd.make_mesh(DATA2_CONTEXT4)):  # interleaved passes need every segment on one device
        with pytest.raises(ValueError, match="mass_passes > 1 .* set mesh.context=1 or model.mass_passes=1"):
            C.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "delta", mass_passes=2),
                                        write_scale_bs=jnp.ones((B, S)))
        with pytest.raises(ValueError, match="mass_source='batch' .* set mesh.context=1 or model.mass_source='own'"):
            C.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(N, "linear", mass_source="batch"),
                                        write_scale_bs=jnp.ones((B, S)))


# ------------------------------------------------------------------------- the model and the train step


def _batch(step=0, batch=4, seq_len=64, vocab=64):
    rng = np.random.default_rng([7, step])
    seq = rng.integers(3, vocab, (batch, seq_len + 1)).astype(np.int32)
    mask = (rng.random((batch, seq_len)) > 0.2).astype(np.float32)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask, "reset": np.ones((batch,), bool)}


@pytest.fixture(scope="module")
def params():
    """One initialisation, reused by every mesh (host arrays)."""
    return _init(ModelConfig(**MODEL))


def _init(model_cfg, seed=0):
    return jax.device_get(nnx.to_pure_dict(nnx.state(InfiniTransformer(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)))


def _model_loss_and_grads(model_cfg, params, batch, mesh_cfg, devices=None):
    """Token-mean loss, its gradients and the memory after the sequence, from step.loss_sums (the train
    step's loss) jitted with the train step's shardings on this mesh."""
    mesh = shd.make_mesh(mesh_cfg, devices)
    amodel = T.abstract_model(model_cfg)
    graphdef = nnx.split(amodel, nnx.Param)[0]
    param_sh = shd.param_shardings(amodel, mesh)

    def f(p, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            def loss(p):
                sums, memory = T.loss_sums(graphdef, p, batch)
                return sums["nll"] / sums["tokens"], memory
            return jax.value_and_grad(loss, has_aux=True)(p)

    fn = jax.jit(f, in_shardings=(param_sh, shd.batch_sharding(mesh)))
    return jax.device_get(fn(jax.device_put(params, param_sh), shd.global_batch(batch, mesh)))


@functools.lru_cache
def _one_device(rule):
    return _model_loss_and_grads(ModelConfig(**dict(MODEL, rule=rule)), _init(ModelConfig(**MODEL)), _batch(),
                                 dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.mark.parametrize("rule,mesh_cfg", [("linear", DATA2_CONTEXT4), ("delta", DATA2_CONTEXT4),
                                           ("delta", DATA2_FSDP2_CONTEXT2), ("linear", DATA2_CONTEXT2_TENSOR2)])
def test_model_loss_grads_and_memory_split_over_context(params, rule, mesh_cfg):
    model_cfg = ModelConfig(**dict(MODEL, rule=rule))
    want = _one_device(rule)
    got = _model_loss_and_grads(model_cfg, params, _batch(), mesh_cfg)
    (loss, memory), grads = got
    (ref_loss, ref_memory), ref_grads = want
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _close(grads, ref_grads, rtol=2e-4, atol=1e-6)
    _close(memory, ref_memory, rtol=2e-5, atol=1e-5)  # per layer (M, z) after all 8 segments


def test_model_parallel_mode_and_stacked_layers_split_over_context():
    """mode="parallel" (both rules in both modes: the tests above) and scan_layers, delta rule."""
    cfg = dict(MODEL, rule="delta", mode="parallel", scan_layers=True, num_layers=2)
    model_cfg = ModelConfig(**cfg)
    stacked = _init(model_cfg, seed=1)
    want = _model_loss_and_grads(model_cfg, stacked, _batch(1), dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    got = _model_loss_and_grads(model_cfg, stacked, _batch(1), DATA2_CONTEXT4)
    np.testing.assert_allclose(got[0][0], want[0][0], rtol=1e-5)
    _close(got[1], want[1], rtol=2e-4, atol=1e-6)
    _close(got[0][1], want[0][1], rtol=2e-5, atol=1e-5)


def test_transformer_xl_over_context_is_left_to_xla():
    """The baselines have no memory to exchange: XLA partitions them along the sequence by itself (Transformer-
    XL's previous segment crosses the device boundary); still the single-device loss and gradients."""
    model_cfg = ModelConfig(**dict(MODEL, attention="xl"))
    p = _init(model_cfg)
    want = _model_loss_and_grads(model_cfg, p, _batch(), dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    got = _model_loss_and_grads(model_cfg, p, _batch(), DATA2_CONTEXT4)
    np.testing.assert_allclose(got[0][0], want[0][0], rtol=1e-5)
    _close(got[1], want[1], rtol=2e-4, atol=1e-6)


def test_train_step_split_over_context_equals_one_device(params):
    """Two real train steps (make_train_step: AdamW, clipping, donation) on data=2 × context=4."""
    model_cfg = ModelConfig(**dict(MODEL, rule="delta"))
    tx, lr_fn, _ = optim_lib.make_optimizer(OPTIM, 10)

    def run(mesh_cfg, devices=None):
        mesh = shd.make_mesh(mesh_cfg, devices)
        graphdef, _, state_sh, _ = T.create_train_state(model_cfg, tx, mesh, init=False)
        state = jax.device_put(T.TrainState(step=np.zeros((), np.int32), params=params, opt_state=tx.init(params),
                                            rng=np.asarray(jax.random.PRNGKey(1))), state_sh)
        step = T.make_train_step(graphdef, optim_lib.Optimizer(tx, lr_fn), mesh=mesh, state_shardings=state_sh)
        losses = []
        for i in range(2):
            state, metrics = step(state, shd.global_batch(_batch(i), mesh))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)

    ref_losses, ref_params = run(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    losses, got_params = run(DATA2_CONTEXT4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _close(got_params, ref_params, rtol=2e-4, atol=2e-6)


def test_wrong_context_split_fails_before_anything_is_built(tmp_path):
    c = ml_collections.ConfigDict()
    c.model = dict(MODEL, n_segments=6)
    c.data = dict(name="fake")
    c.train = dict(steps=2, batch_size=4)
    c.optim = dict(OPTIM)
    c.mesh = dict(DATA2_CONTEXT4)
    never = lambda *a, **k: pytest.fail("no data iterator should be built")  # noqa: E731
    with pytest.raises(ValueError, match="model.n_segments=6 is not divisible by the mesh context axis \\(4\\)"):
        loop.train_and_evaluate(c, tmp_path / "run", progress=False, make_iterator=never)
    assert not (tmp_path / "run").exists()
