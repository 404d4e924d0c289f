"""The pure part of training: TrainState, the one loss-and-metrics function, the train step and the eval step.

What aot.py, the tests, the loop (loop.py) and every evaluator (evals/) import. Nothing here touches files.

The loss (`token_losses`) is the only place the package turns hidden states into logits and a negative
log-likelihood. The train step sums it over the batch; the eval step sums it per row and segment (the
perplexity curve, bits per byte); the passkey evaluator reads it at the answer positions. Its logits are
built LOSS_CHUNK_TOKENS positions at a time under `jax.checkpoint` inside a scan, so neither the forward nor
the backward pass ever holds the whole [b, l, V] logits (at 32K tokens and a 128K vocabulary that tensor alone
would be terabytes across a pod); under context parallelism each device scores its own part of the sequence.

    NLL_t = -log softmax(x_t W_out)[y_t]  (× loss_mask_t)        correct_t = [argmax_v (x_t W_out)_v = y_t]

By default (train.carry_memory=False, as in the paper) each training window starts from an empty memory
(model(tokens, memory=None, reset)): the train step carries no memory between steps. With
train.carry_memory=True (meliad-style truncated backpropagation through time) the TrainState holds the memory
(per layer, per batch row): each step starts from the previous step's final memory under stop_gradient, the
model clears the rows where batch["reset"] says a new document starts, and the step returns the new final
memory. That memory is not checkpointed: a resumed run starts every row's memory empty. The eval step carries
the memory from batch to batch (rows stream their documents) and clears a row the same way.

Gradient accumulation (optim.grad_accum = A) is a `lax.scan` over A interleaved microbatches inside the
step (rows a, a+A, a+2A, ... so every microbatch spans all data shards); summed token-weighted gradients
are divided by the total number of loss tokens, so the update equals the full-batch update. A carried memory
is split into the same rows: each microbatch streams its own rows' memory.

A step whose loss or gradient norm is not finite leaves the state unchanged (params, optimizer and step);
the loop then stops with NonFiniteLossError and never saves it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from infini_jax import attention as attn
from infini_jax import baselines
from infini_jax import optim as optim_lib
from infini_jax import sharding as shd
from infini_jax.axes import active_axis
from infini_jax.config import defaults, with_defaults
from infini_jax.model import InfiniTransformer, ModelConfig, logits_from_hidden

# Every config.train key and its default (infini_jax/configs/base.py; a key not there is an error).
TRAIN_DEFAULTS: dict[str, Any] = defaults("train")
LOSS_CHUNK_TOKENS = 512  # logits are built this many positions at a time (b_local × 512 × V floats)


class NonFiniteLossError(FloatingPointError):
    pass


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # pure dict of arrays (nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    opt_state: Any
    rng: jax.Array  # uint32 [2]
    memory: Any = None  # train.carry_memory: the carried per-layer memory (model.init_memory); None: off


# --------------------------------------------------------------------------- config checks (no devices)

def train_config(cfg) -> dict:
    out = with_defaults("train", cfg, TRAIN_DEFAULTS)
    for k in ("steps", "batch_size"):
        if int(out[k]) < 1:
            raise ValueError(f"config.train.{k} must be >= 1, got {out[k]}")
    return out


def validate_config(config, *, process_count: Optional[int] = None) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, train dict, optim dict); every config error that needs no devices, before compiling."""
    for section in ("model", "data", "train", "optim", "mesh"):
        if section not in config:
            raise ValueError(f"config has no {section!r} section (see infini_jax/configs/base.py)")
    model_cfg = ModelConfig.from_dict(config.model)
    if "evals" in config:  # unknown evaluators or evaluator keys fail here, not after training
        from infini_jax import evals

        evals.from_config(config.evals)
    train = train_config(config.train)
    optim = optim_lib.optim_config(config.optim)
    if model_cfg.attention != "full" and model_cfg.seq_len % model_cfg.segment_len:
        raise ValueError(f"seq_len {model_cfg.seq_len} is not a multiple of segment_len {model_cfg.segment_len}")
    bs, accum = int(train["batch_size"]), int(optim["grad_accum"])
    if bs % accum:
        raise ValueError(f"train.batch_size {bs} is not divisible by optim.grad_accum {accum}")
    if train["carry_memory"]:
        check_carry_memory(config.data, model_cfg)
    pc = jax.process_count() if process_count is None else process_count
    if bs % pc:
        raise ValueError(f"train.batch_size {bs} is not divisible by the number of processes {pc}")
    return model_cfg, train, optim


def check_carry_memory(data_cfg, model_cfg: ModelConfig) -> None:
    """train.carry_memory needs a memory to carry and documents that continue across windows."""
    if model_cfg.attention not in ("infini", "xl"):
        raise ValueError(f"train.carry_memory=True needs model.attention 'infini' or 'xl' (attention "
                         f"{model_cfg.attention!r} carries no memory): set train.carry_memory=False")
    if data_cfg.get("name", "passkey") == "passkey":
        raise ValueError("train.carry_memory=True with data.name='passkey' is meaningless (every passkey row "
                         "starts a new example each step): set train.carry_memory=False")


def check_mesh(mesh, model_cfg: ModelConfig, batch_size: int, grad_accum: int = 1) -> None:
    shd.check_divisibility(mesh, num_heads=model_cfg.num_heads, batch_size=batch_size,
                           n_segments=model_cfg.n_segments if model_cfg.attention != "full" else None)
    if grad_accum > 1:
        try:
            shd.check_divisibility(mesh, num_heads=model_cfg.num_heads, batch_size=batch_size // grad_accum)
        except ValueError as e:
            raise ValueError(f"microbatch (batch_size / grad_accum = {batch_size // grad_accum}): {e}") from None


# --------------------------------------------------------------------------- state

def abstract_model(model_cfg: ModelConfig):
    return nnx.eval_shape(lambda: InfiniTransformer(model_cfg, rngs=nnx.Rngs(0)))


def create_train_state(model_cfg: ModelConfig, tx, mesh, seed: int = 0, *, init: bool = True,
                       memory_rows: int = 0):
    """(graphdef, state or None, state shardings, abstract state). `init=False` skips the random init
    (resume): the abstract state (ShapeDtypeStructs with shardings) is what a restore fills in.
    `memory_rows` > 0 (train.carry_memory: the global batch size): the state carries an empty memory of that
    many rows, sharded along the batch like the activations."""
    amodel = abstract_model(model_cfg)
    memory_shapes = jax.eval_shape(lambda: amodel.init_memory(memory_rows)) if memory_rows else None
    memory_sh = shd.memory_shardings(mesh, memory_shapes) if memory_rows else None
    graphdef, _ = nnx.split(amodel, nnx.Param)  # TrainState carries params only
    param_sh = shd.param_shardings(amodel, mesh)

    def init_fn():
        model = InfiniTransformer(model_cfg, rngs=nnx.Rngs(seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(seed + 1))

    shapes = jax.eval_shape(init_fn)
    repl = shd.replicated(mesh)
    state_sh = TrainState(step=repl, params=param_sh,
                          opt_state=shd.opt_state_shardings(shapes.opt_state, shapes.params, param_sh, mesh),
                          rng=repl)
    state = jax.jit(init_fn, out_shardings=state_sh)() if init else None
    if memory_rows:
        state_sh = dataclasses.replace(state_sh, memory=memory_sh)
        shapes = dataclasses.replace(shapes, memory=memory_shapes)
        state = dataclasses.replace(state, memory=empty_memory(model_cfg, memory_rows, memory_sh)) if init else None
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
    return graphdef, state, state_sh, abstract


def empty_memory(model_cfg: ModelConfig, rows: int, memory_shardings):
    """The carried memory at the start of a run, fresh or resumed: `rows` empty rows (model.init_memory)
    placed with `memory_shardings` (TrainState.memory's); None when there is none (carry_memory off)."""
    if memory_shardings is None:
        return None
    amodel = abstract_model(model_cfg)
    return jax.jit(lambda: amodel.init_memory(rows), out_shardings=memory_shardings)()


def param_graphdef(model_cfg: ModelConfig):
    """The graphdef that `nnx.merge(graphdef, params)` rebuilds a model with from a params pure dict."""
    return nnx.split(abstract_model(model_cfg), nnx.Param)[0]


# --------------------------------------------------------------------------- the loss

def _loss_chunk(length: int, segment_len: int) -> int:
    for c in (LOSS_CHUNK_TOKENS, segment_len):
        if length % c == 0 and c <= length:
            return c
    return length


def token_losses(graphdef, params, batch, memory=None):
    """The one loss: ({"nll", "correct"} [b, l], each × loss_mask, new memory) for a contract batch
    {tokens, targets, loss_mask [b, l], reset [b], optional write_scale [b, s]} (see the module docstring)."""
    model = nnx.merge(graphdef, params)
    x_bld, memory = model.hidden(batch["tokens"], memory, batch["reset"], batch.get("write_scale"))
    w_dV, dtype = model.output_embedding(), model.cfg.dtype
    b, l, _ = x_bld.shape
    parts = active_axis("length")[1]  # context parallelism: each device takes the loss of its own part
    parts = parts if l % parts == 0 else 1
    chunk = _loss_chunk(l // parts, model.cfg.segment_len)
    n_chunks = l // parts // chunk

    def to_chunks(a_bl):  # [b, l, ...] -> [n_chunks, b, parts × chunk, ...]: step i, chunk i of every part
        a = a_bl.reshape((b, parts, n_chunks, chunk) + a_bl.shape[2:])
        return jnp.moveaxis(a, 2, 0).reshape((n_chunks, b, parts * chunk) + a_bl.shape[2:])

    def from_chunks(a_cbp):  # the inverse of to_chunks: [n_chunks, b, parts × chunk] -> [b, l]
        a = jnp.moveaxis(a_cbp.reshape(n_chunks, b, parts, chunk), 0, 2)
        return a.reshape(b, l)

    @jax.checkpoint
    def body(_, xs):
        x_bcd, targets_bc, mask_bc = xs
        logits_bcV = logits_from_hidden(x_bcd, w_dV, dtype)
        nll_bc = optax.softmax_cross_entropy_with_integer_labels(logits_bcV, targets_bc)
        correct_bc = (jnp.argmax(logits_bcV, -1) == targets_bc).astype(jnp.float32)
        return None, (nll_bc * mask_bc, correct_bc * mask_bc)

    mask_bl = batch["loss_mask"].astype(jnp.float32)
    _, (nll_cbp, correct_cbp) = jax.lax.scan(
        body, None, (to_chunks(x_bld), to_chunks(batch["targets"]), to_chunks(mask_bl)))
    return {"nll": from_chunks(nll_cbp), "correct": from_chunks(correct_cbp)}, memory


def loss_sums(graphdef, params, batch, memory=None):
    """({"nll", "tokens", "correct"} summed over the batch, new memory): what the train step differentiates."""
    tok, memory = token_losses(graphdef, params, batch, memory)
    sums = {"nll": jnp.sum(tok["nll"]), "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
            "correct": jnp.sum(tok["correct"])}
    return sums, memory


def segment_sums(graphdef, params, batch, memory, byte_table_V):
    """Per row and segment [b, s] sums of NLL, scored tokens, correct argmax and target bytes (the
    per-segment-position curve and bits per byte), the NLL and scored tokens by offset within a segment summed
    over rows and segments ("offset_nll", "offset_tokens": [n]; how much context a segment's first tokens
    lack), and the new memory. byte_table_V: int32 [V]."""
    tok, memory = token_losses(graphdef, params, batch, memory)
    seg = nnx.merge(graphdef, params).cfg.segment_len
    b, l = batch["tokens"].shape
    n_seg = l // seg if l % seg == 0 else 1  # attention='full' may score the window as one segment
    mask_bl = batch["loss_mask"].astype(jnp.float32)
    bytes_bl = byte_table_V[batch["targets"]].astype(jnp.float32) * mask_bl

    def per_segment(x_bl):
        return x_bl.reshape(b, n_seg, l // n_seg).sum(-1)

    def per_offset(x_bl):
        return x_bl.reshape(b, n_seg, l // n_seg).sum((0, 1))

    sums_bs = {"nll": per_segment(tok["nll"]), "tokens": per_segment(mask_bl),
               "correct": per_segment(tok["correct"]), "bytes": per_segment(bytes_bl),
               "offset_nll": per_offset(tok["nll"]), "offset_tokens": per_offset(mask_bl)}
    return sums_bs, memory


# --------------------------------------------------------------------------- the steps

def make_train_step(graphdef, optimizer: optim_lib.Optimizer, *, mesh, state_shardings, grad_accum: int = 1,
                    jit: bool = True):
    """The train step `(state, batch) -> (state, metrics)`, jitted with shardings and the state donated.
    `optimizer`: optim.make_optimizer's (optax transformation, lr schedule, gate lr schedule or None); the
    schedules only feed the metrics.
    When `state_shardings.memory` is set (train.carry_memory), the step starts from state.memory under
    stop_gradient and stores the new final memory in the returned state."""
    tx, lr_fn, gate_lr_fn = optimizer
    batch_sh = shd.batch_sharding(mesh, 2)
    row_sh = shd.batch_sharding(mesh, 1)
    memory_sh = state_shardings.memory

    def sums_and_grads(params, batch, memory):
        def f(p):
            sums, new_memory = loss_sums(graphdef, p, batch, memory)
            return sums["nll"], (sums, new_memory if memory_sh is not None else None)
        (_, (sums, new_memory)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return sums, grads, new_memory

    def accumulated(params, batch, memory):
        micro = jax.tree.map(lambda x: _split_rows(x, grad_accum, 0), batch)
        micro_memory = jax.tree.map(lambda x: _split_rows(x, grad_accum, _row_axis(memory)), memory)

        def body(acc, xs):
            mb, mm = xs
            mb = {k: jax.lax.with_sharding_constraint(v, batch_sh if v.ndim == 2 else row_sh) for k, v in mb.items()}
            mm = jax.tree.map(jax.lax.with_sharding_constraint, mm, memory_sh) if mm is not None else None
            sums, grads, new_mm = sums_and_grads(params, mb, mm)
            return jax.tree.map(jnp.add, acc, (sums, grads)), new_mm

        first = jax.tree.map(lambda x: x[0], (micro, micro_memory))
        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums_and_grads, params, *first)[:2])
        (sums, grads), new_micro_memory = jax.lax.scan(body, zero, (micro, micro_memory))
        new_memory = jax.tree.map(lambda x: _merge_rows(x, _row_axis(memory)), new_micro_memory)
        return sums, grads, new_memory

    def train_step(state: TrainState, batch):
        memory = jax.lax.stop_gradient(state.memory) if memory_sh is not None else None
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # model.py pins activations to it
            sums, grads, memory = (sums_and_grads if grad_accum == 1 else accumulated)(state.params, batch, memory)
        denom = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = sums["nll"] / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, memory=memory)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        metrics = {"loss": loss, "accuracy": sums["correct"] / denom, "grad_norm": grad_norm,
                   "lr": lr_fn(state.step), "tokens": sums["tokens"]}
        if gate_lr_fn is not None:
            metrics["gate_lr"] = gate_lr_fn(state.step)
        return new, metrics

    if not jit:
        return train_step
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings,
                   shd.replicated(mesh)), donate_argnums=(0,))


def _row_axis(memory) -> int:
    """The batch-row axis of a carried memory: 0 in its per-layer tuple, 1 when stacked [layers, b, ...]
    (model.scan_layers)."""
    return 1 if isinstance(memory, (attn.MemoryState, baselines.XLCache)) else 0


def _split_rows(x, accum: int, axis: int):
    """[..., b, ...] (b at `axis`) -> [A, ..., b/A, ...]: microbatch a holds rows a, a+A, a+2A, ..."""
    shape = x.shape[:axis] + (x.shape[axis] // accum, accum) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis + 1, 0)


def _merge_rows(x, axis: int):
    """The inverse of _split_rows: [A, ..., b/A, ...] -> [..., b, ...]."""
    x = jnp.moveaxis(x, 0, axis + 1)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def make_eval_step(graphdef, *, mesh, param_shardings, memory_shardings):
    """`(params, memory, batch, byte_table_V) -> (sums [b, s] and by offset [n], the batch's reset [b], memory)`
    (segment_sums), the sums replicated (every process reads the whole batch's), the memory donated: it streams
    from batch to batch."""
    batch_sh, repl = shd.batch_sharding(mesh, 2), shd.replicated(mesh)

    def eval_step(params, memory, batch, byte_table_V):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            sums_bs, memory = segment_sums(graphdef, params, batch, memory, byte_table_V)
        return {**sums_bs, "reset": batch["reset"]}, memory

    return jax.jit(eval_step, in_shardings=(param_shardings, memory_shardings, batch_sh, repl),
                   out_shardings=(repl, memory_shardings), donate_argnums=(1,))


def make_token_step(graphdef, *, mesh, param_shardings, memory_shardings):
    """`(params, memory, batch) -> ({"nll", "correct"} [b, l] replicated, memory)` (token_losses): for
    evaluators that read single positions (the passkey answer)."""
    batch_sh = shd.batch_sharding(mesh, 2)

    def token_step(params, memory, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return token_losses(graphdef, params, batch, memory)

    return jax.jit(token_step, in_shardings=(param_shardings, memory_shardings, batch_sh),
                   out_shardings=(shd.replicated(mesh), memory_shardings), donate_argnums=(1,))
