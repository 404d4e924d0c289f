"""Training: TrainState, the sharded train/eval steps, and the loop (`train_and_evaluate`).

The train step is a pure function `(TrainState, batch) -> (TrainState, metrics)`, jitted once with
in/out shardings and the state donated. The model lives outside as an NNX graphdef; params travel as a
pure dict and `nnx.merge(graphdef, params)` rebuilds the module inside the jitted function.

Each training window starts from an empty memory (model(tokens, state=None, reset)): the train step carries
no memory between steps. Evaluation carries the memory from batch to batch (rows stream their documents)
and clears a row where batch["reset"] says a new document starts.

Gradient accumulation (optim.grad_accum = A) is a `lax.scan` over A interleaved microbatches inside the
step (rows a, a+A, a+2A, ... so every microbatch spans all data shards); summed token-weighted gradients
are divided by the total number of loss tokens, so the update equals the full-batch update.

A step whose loss or gradient norm is not finite leaves the state unchanged (params, optimizer and step);
the loop then stops with NonFiniteLossError and never saves it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from infini_jax import checkpoint as ckpt_lib
from infini_jax import convert
from infini_jax import paths
from infini_jax.config import defaults, with_defaults
from infini_jax import optim as optim_lib
from infini_jax import sharding as shd
from infini_jax.axes import active_axis
from infini_jax.model import InfiniTransformer, ModelConfig, logits_from_hidden

# Every config.train key and its default (infini_jax/configs/base.py; a key not there is an error).
TRAIN_DEFAULTS: dict[str, Any] = defaults("train")

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # pure dict of arrays (nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    opt_state: Any
    rng: jax.Array  # uint32 [2]


# --------------------------------------------------------------------------- config

def train_config(cfg: Mapping[str, Any]) -> dict:
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
    if "evals" in config:  # unknown evaluator keys fail here, not after training
        from infini_jax.evaluate import EVALS_DEFAULTS
        with_defaults("evals", config.evals, EVALS_DEFAULTS)
    train = train_config(config.train)
    optim = optim_lib.optim_config(config.optim)
    if model_cfg.attention != "full" and model_cfg.seq_len % model_cfg.segment_len:
        raise ValueError(f"seq_len {model_cfg.seq_len} is not a multiple of segment_len {model_cfg.segment_len}")
    bs, accum = int(train["batch_size"]), int(optim["grad_accum"])
    if bs % accum:
        raise ValueError(f"train.batch_size {bs} is not divisible by optim.grad_accum {accum}")
    pc = jax.process_count() if process_count is None else process_count
    if bs % pc:
        raise ValueError(f"train.batch_size {bs} is not divisible by the number of processes {pc}")
    return model_cfg, train, optim


def check_tokenizer(config, model_cfg: ModelConfig) -> None:
    """The tokenizer's vocabulary must be the model's: ids past the embedding table would be silently clamped."""
    from infini_jax.data import load_tokenizer

    tok = load_tokenizer(config.data.get("tokenizer", "byte"))
    if tok.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"config.data.tokenizer {config.data.get('tokenizer')!r} has {tok.vocab_size} tokens but "
                         f"config.model.vocab_size is {model_cfg.vocab_size}: set --config.model.vocab_size="
                         f"{tok.vocab_size} (or point data.tokenizer at the model's tokenizer)")


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


def create_train_state(model_cfg: ModelConfig, tx, mesh, seed: int = 0, *, init: bool = True):
    """(graphdef, state or None, state shardings, abstract state). `init=False` skips the random init
    (resume): the abstract state (ShapeDtypeStructs with shardings) is what a restore fills in."""
    amodel = abstract_model(model_cfg)
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
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
    state = jax.jit(init_fn, out_shardings=state_sh)() if init else None
    return graphdef, state, state_sh, abstract


# --------------------------------------------------------------------------- steps

LOSS_CHUNK_TOKENS = 512  # logits are built this many positions at a time (B_local x 512 x vocab floats)


def _loss_chunk(length: int, segment_len: int) -> int:
    for c in (LOSS_CHUNK_TOKENS, segment_len):
        if length % c == 0 and c <= length:
            return c
    return length


def _token_sums(graphdef, params, batch, memory=None):
    """Σ masked NLL, Σ mask, Σ masked correct, #rows fully correct (rows with mask), new memory.

    The logits are computed LOSS_CHUNK_TOKENS positions at a time under `jax.checkpoint` inside a scan, so
    neither the forward nor the backward pass ever holds the whole [B, L, vocab] logits (at 32K tokens and a
    128K vocabulary that tensor alone would be terabytes across a pod).
    """
    model = nnx.merge(graphdef, params)
    x_bld, memory = model.hidden(batch["tokens"], memory, batch["reset"], batch.get("write_scale"))
    w_dv, dtype = model.output_embedding(), model.cfg.dtype
    b, l, _ = x_bld.shape
    parts = active_axis("length")[1]  # context parallelism: each device takes the loss of its own part
    parts = parts if l % parts == 0 else 1
    chunk = _loss_chunk(l // parts, model.cfg.segment_len)
    n_chunks = l // parts // chunk

    def to_chunks(a):  # [B, L, ...] -> [n_chunks, B, parts × chunk, ...]: step i, chunk i of every part
        a = a.reshape((b, parts, n_chunks, chunk) + a.shape[2:])
        return jnp.moveaxis(a, 2, 0).reshape((n_chunks, b, parts * chunk) + a.shape[4:])

    @jax.checkpoint
    def body(carry, xs):
        x_bcd, targets_bc, mask_bc = xs
        logits_bcv = logits_from_hidden(x_bcd, w_dv, dtype)
        nll_bc = optax.softmax_cross_entropy_with_integer_labels(logits_bcv, targets_bc)
        correct_bc = (jnp.argmax(logits_bcv, -1) == targets_bc).astype(jnp.float32)
        wrong_b = jnp.sum((1.0 - correct_bc) * mask_bc, axis=-1)
        return jax.tree.map(jnp.add, carry, (jnp.sum(nll_bc * mask_bc), jnp.sum(correct_bc * mask_bc), wrong_b)), None

    mask_bl = batch["loss_mask"].astype(jnp.float32)
    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((b,), jnp.float32))
    (nll, correct, wrong_b), _ = jax.lax.scan(
        body, zero, (to_chunks(x_bld), to_chunks(batch["targets"]), to_chunks(mask_bl)))
    row_has = mask_bl.sum(-1) > 0
    row_ok = (wrong_b == 0) & row_has
    sums = {"nll": nll, "tokens": jnp.sum(mask_bl), "correct": correct,
            "rows_correct": jnp.sum(row_ok.astype(jnp.float32)), "rows": jnp.sum(row_has.astype(jnp.float32))}
    return sums, memory


def make_train_step(graphdef, tx, lr_fn: Callable, *, mesh, state_shardings, grad_accum: int = 1,
                    gate_lr_fn: Optional[Callable] = None, jit: bool = True):
    """The train step `(state, batch) -> (state, metrics)`, jitted with shardings and the state donated."""
    batch_sh = shd.batch_sharding(mesh, 2)
    row_sh = shd.batch_sharding(mesh, 1)

    def sums_and_grads(params, batch):
        def f(p):
            sums, _ = _token_sums(graphdef, p, batch)
            return sums["nll"], sums
        (_, sums), grads = jax.value_and_grad(f, has_aux=True)(params)
        return sums, grads

    def train_step(state: TrainState, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # model.py pins activations to it
            return _train_step(state, batch)

    def _train_step(state: TrainState, batch):
        if grad_accum == 1:
            sums, grads = sums_and_grads(state.params, batch)
        else:
            def split(x):  # [B, ...] -> [A, B/A, ...], microbatch a = rows a, a+A, ...
                x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
                return x

            micro = jax.tree.map(split, batch)

            def body(acc, mb):
                mb = {k: jax.lax.with_sharding_constraint(v, batch_sh if v.ndim == 2 else row_sh)
                      for k, v in mb.items()}
                s, g = sums_and_grads(state.params, mb)
                return jax.tree.map(jnp.add, acc, (s, g)), None

            zero_s = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: sums_and_grads(state.params, jax.tree.map(
                lambda x: x[0], micro)))[0])
            zero_g = jax.tree.map(jnp.zeros_like, state.params)
            (sums, grads), _ = jax.lax.scan(body, (zero_s, zero_g), micro)
        denom = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = sums["nll"] / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
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


def make_eval_step(graphdef, *, mesh, param_shardings, memory_shardings):
    """`(params, memory, batch) -> (sums, memory)`: the memory streams from batch to batch."""
    batch_sh = shd.batch_sharding(mesh, 2)

    def eval_step(params, memory, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _token_sums(graphdef, params, batch, memory)

    return jax.jit(eval_step, in_shardings=(param_shardings, memory_shardings, batch_sh),
                   out_shardings=(shd.replicated(mesh), memory_shardings), donate_argnums=(1,))


def evaluate(eval_step, params, batches: Iterator[Mapping[str, np.ndarray]], mesh, init_memory: Callable,
             batch_size: Optional[int] = None):
    """Token-weighted loss / perplexity / accuracy (and row exact-match) over `batches`."""
    total, memory = None, None
    for local in batches:
        batch = shd.global_batch(local, mesh, batch_size)
        if memory is None:
            memory = init_memory(batch["tokens"].shape[0])
        sums, memory = eval_step(params, memory, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        return {}
    t = {k: float(v) for k, v in jax.device_get(total).items()}
    n = max(t["tokens"], 1.0)
    loss = t["nll"] / n
    return {"loss": loss, "ppl": float(math.exp(min(loss, 80.0))), "accuracy": t["correct"] / n,
            "seq_accuracy": t["rows_correct"] / max(t["rows"], 1.0), "tokens": t["tokens"]}


def gate_values_from_params(params) -> Optional[jax.Array]:
    """sigmoid(β) [layers, heads] from a params pure dict (jittable), or None without Infini-attention gates."""
    blocks = params.get("blocks", {})
    if "attn" in blocks:  # model.scan_layers: one stacked block, gate_logit [layers, heads]
        gate = blocks["attn"].get("gate_logit")
        return None if gate is None else jax.nn.sigmoid(gate.astype(jnp.float32))
    gates = [blocks[i].get("attn", {}).get("gate_logit") for i in sorted(blocks, key=int)]
    if not gates or any(g is None for g in gates):
        return None
    return jnp.stack([jax.nn.sigmoid(g.astype(jnp.float32)) for g in gates])


def _config_evals(config, params, model_cfg: ModelConfig) -> dict:
    """config.evals (evaluate.passkey_report) on an unsharded copy of the trained model."""
    from infini_jax import evaluate
    from infini_jax.data import load_tokenizer

    model = nnx.eval_shape(lambda: InfiniTransformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    # one device; jnp (not device_get's numpy, read-only on some backends) so the knock-out can edit a copy
    nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda x: jnp.asarray(jax.device_get(x)), params))
    return evaluate.passkey_report(nnx.merge(graphdef, abstract), load_tokenizer(config.data.tokenizer),
                                   config.evals, log=print)


# --------------------------------------------------------------------------- the loop

class _Logger:
    """metrics.jsonl (through epath: local or gs://) and, where tensorboardX can write there, tb/."""

    def __init__(self, workdir: epath.Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = workdir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.fspath(workdir / "tb"))
            except Exception as e:  # tensorboard is optional (gs:// needs google-cloud-storage)
                log.warning("tensorboardX unavailable (%s): metrics.jsonl only", e)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]):
        if not self.enabled:
            return
        paths.append_text(self.jsonl, json.dumps({"step": int(step), "split": split, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)
            for layer, heads in enumerate(metrics.get("gates") or []):
                for h, g in enumerate(heads):
                    self.tb.add_scalar(f"gates/layer{layer}/head{h}", g, step)
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _eval_data_cfg(config, n_batches: int) -> dict:
    d = dict(config.data.to_dict() if hasattr(config.data, "to_dict") else config.data)
    if d.get("num_batches") is None:
        d["num_batches"] = n_batches
    d["eval_batches"] = n_batches
    return d


def train_and_evaluate(config, workdir: epath.PathLike, *, progress: bool = True, stop_after: Optional[int] = None,
                       make_iterator: Optional[Callable] = None) -> dict:
    """Trains config.train.steps steps in `workdir` (a local path or gs://...; resuming from its latest intact
    checkpoint), evaluating every eval_every steps and at the end; writes metrics.jsonl, tb/, checkpoints/
    and eval_results.json.

    Preemption: one process installs a SIGTERM handler; several processes use JAX's preemption sync manager
    (`multihost_utils.reached_preemption_sync_point`, every process stops at the same step without a
    per-step collective). Either way a checkpoint of the current step is saved and waited for, and the
    result is {"preempted": True, "step": ...}. `stop_after`=k (tests) stops the same way once k steps are
    done. A non-finite loss raises NonFiniteLossError without saving. `make_iterator` defaults to
    infini_jax.data.make_iterator.

    Every check that can fail on the config, the data or init_from runs before the workdir is created.
    """
    from infini_jax.data.tokenizers import with_default_tokenizer

    config = with_default_tokenizer(config)  # init_from=hf:DIR with no data.tokenizer: DIR's own
    model_cfg, train, optim = validate_config(config)
    if make_iterator is None:  # the real pipeline: its tokenizer must fit the embedding table
        from infini_jax.data import make_iterator

        check_tokenizer(config, model_cfg)
    workdir = paths.resolve(workdir)
    saved = ckpt_lib.newest_readable_config(workdir)
    if saved is not None:  # another model or schedule in this workdir: stop before data or compiles
        check_resume(saved, config, train, optim, workdir)
    mesh = shd.make_mesh(config.mesh)
    bs = int(train["batch_size"])
    check_mesh(mesh, model_cfg, bs, int(optim["grad_accum"]))
    data_index, data_count = shd.data_shard(mesh, bs)
    data_kw = dict(seq_len=model_cfg.seq_len, batch_size=bs, process_index=data_index, process_count=data_count,
                   segment_len=model_cfg.segment_len)
    train_iter = make_iterator(config.data, split="train", train=True, **data_kw)  # a missing data_dir fails here
    if train["init_from"]:
        check_init_from(train["init_from"], model_cfg)  # fails here if it cannot start this model
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=train["keep_checkpoints"], async_save=train["async_checkpoints"])
    prev_handler = None
    stop = {"flag": False}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
        prev_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    closables: list = [train_iter] if hasattr(train_iter, "close") else []  # a prefetch thread
    try:
        return _loop(config, workdir, model_cfg, train, optim, mesh, ckpt, stop, progress, stop_after,
                     train_iter, functools.partial(make_iterator, **data_kw), closables)
    finally:
        for c in reversed(closables):
            c.close()
        ckpt.close()
        if prev_handler is not None:
            signal.signal(signal.SIGTERM, prev_handler)


def check_init_from(spec: str, model_cfg: ModelConfig) -> None:
    """train.init_from: an infini-jax checkpoint must exist; hf:DIR must hold this model (config.json, every
    tensor's name and shape; nothing is read yet)."""
    directory = convert.hf_dir(spec)
    if directory is None:
        ckpt_lib.find_step_dir(spec)
    else:
        convert.check_hf_checkpoint(directory, model_cfg)


def init_params(spec: str, model_cfg: ModelConfig, mesh):
    """Params-only start from train.init_from, on `mesh`: an infini-jax workdir / checkpoints dir / step dir, or
    hf:DIR, a Hugging Face Llama or Gemma directory (infini_jax.convert)."""
    directory = convert.hf_dir(spec)
    if directory is None:
        return ckpt_lib.restore_params(spec, model_cfg, mesh)
    return convert.load_hf_params(directory, model_cfg, mesh)


# optim/train keys that shape the learning-rate schedule: changing one on resume bends the schedule mid-run
SCHEDULE_KEYS = (("train", "steps"), ("optim", "lr"), ("optim", "gate_lr"), ("optim", "warmup_steps"),
                 ("optim", "schedule"), ("optim", "min_lr_ratio"))


def check_resume(saved: Mapping[str, Any], config, train: Mapping[str, Any], optim: Mapping[str, Any],
                 where) -> None:
    """A checkpoint of another model, or of another learning-rate schedule (unless
    train.allow_schedule_change), is an error before anything is restored."""
    ckpt_lib.check_model_matches(saved, config.model, where)
    if train["allow_schedule_change"]:
        return
    now = {"train": train, "optim": optim}
    defaults = {"train": TRAIN_DEFAULTS, "optim": optim_lib.DEFAULTS}
    diff = {f"{sec}.{key}": ((saved.get(sec) or {}).get(key, defaults[sec][key]), now[sec][key])
            for sec, key in SCHEDULE_KEYS}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    if diff:
        raise ValueError(f"{where} was trained with another learning-rate schedule; changed keys (saved, now): "
                         f"{diff}. Resuming would reshape the schedule mid-run: restore the saved values, use "
                         f"another --workdir, or continue on purpose with --config.train.allow_schedule_change=True")


def _loop(config, workdir, model_cfg, train, optim, mesh, ckpt, stop, progress, stop_after, train_iter,
          make_iterator, closables) -> dict:
    bs, accum, total = int(train["batch_size"]), int(optim["grad_accum"]), int(train["steps"])
    seq_len = model_cfg.seq_len
    is_main = jax.process_index() == 0
    tx, lr_fn, gate_lr_fn = optim_lib.make_optimizer(optim, total)
    resume = bool(ckpt.all_steps())
    graphdef, state, state_sh, abstract = create_train_state(model_cfg, tx, mesh, int(train["seed"]),
                                                             init=not resume and not train["init_from"])
    restored = ckpt.restore_latest(abstract.params, {"opt_state": abstract.opt_state, "step": abstract.step,
                                                     "rng": abstract.rng},
                                   check=lambda saved: check_resume(saved, config, train, optim, workdir)) \
        if resume else None
    if restored is not None:
        latest, params, opt, data_state = restored
        state = TrainState(step=opt["step"], params=params, opt_state=opt["opt_state"], rng=opt["rng"])
        if data_state is not None:
            train_iter.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
    elif train["init_from"]:  # params only; fresh optimizer state, step 0, data from the start
        params = init_params(train["init_from"], model_cfg, mesh)
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_sh.step), params=params,
                           opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                           rng=jax.device_put(jax.random.PRNGKey(int(train["seed"]) + 1), state_sh.rng))
        log.info("initialized params from %s", train["init_from"])
    elif resume:  # every step was damaged and set aside: starting afresh must be the user's decision
        raise ValueError(f"no intact checkpoint in {ckpt.directory} (the damaged steps were moved to "
                         f"<step>.damaged): rerun the same command to start from step 0, or use another --workdir")
    train_step = make_train_step(graphdef, tx, lr_fn, mesh=mesh, state_shardings=state_sh, grad_accum=accum,
                                 gate_lr_fn=gate_lr_fn)
    amodel = abstract_model(model_cfg)
    mem_sh = shd.memory_shardings(mesh, jax.eval_shape(lambda: amodel.init_state(bs)))
    eval_step = make_eval_step(graphdef, mesh=mesh, param_shardings=state_sh.params, memory_shardings=mem_sh)
    init_memory = jax.jit(lambda: amodel.init_state(bs), out_shardings=mem_sh)
    gates_fn = jax.jit(gate_values_from_params, out_shardings=shd.replicated(mesh)) \
        if model_cfg.attention == "infini" else None

    def run_eval(step):
        it = make_iterator(_eval_data_cfg(config, int(train["eval_batches"])), split="validation", train=False)
        res = evaluate(eval_step, state.params, it, mesh, lambda b: init_memory(), bs)
        if gates_fn is not None:
            res["gates"] = np.asarray(jax.device_get(gates_fn(state.params))).tolist()
        logger.write(step, "eval", res)
        return res

    logger = _Logger(workdir, is_main)
    closables.append(logger)

    def save(step):
        if step not in ckpt.all_steps():
            ckpt.save(step, state, train_iter.get_state(), config)

    step = int(jax.device_get(state.step))
    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc="train")
        closables.append(bar)
    pending: list = []  # (step, metrics) not yet checked on the host
    window = {"t": time.time(), "tokens": 0, "steps": 0}
    result: dict = {}

    def check(p_step, metrics):
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            ckpt.wait()
            raise NonFiniteLossError(
                f"non-finite loss/grad norm at step {p_step} (loss={m['loss']}, grad_norm={m['grad_norm']}): "
                f"stopping; the last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
        return m

    def drain():
        while pending:
            p_step, metrics = pending.pop(0)
            m = check(p_step, metrics)
            window["tokens"] += bs * seq_len
            window["steps"] += 1
            if p_step % max(int(train["log_every"]), 1) == 0 or p_step == total:
                dt = max(time.time() - window["t"], 1e-9)
                m["tokens_per_s"] = window["tokens"] / dt
                m["steps_per_s"] = window["steps"] / dt
                window.update(t=time.time(), tokens=0, steps=0)
                logger.write(p_step, "train", m)
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            result["train"] = m

    while step < total:
        local = next(train_iter)
        batch = shd.global_batch(local, mesh, bs)
        state, metrics = train_step(state, batch)
        drain()  # the previous step's metrics, while this one runs
        step += 1
        pending.append((step, metrics))
        if bar is not None:
            bar.update(1)
        preempt = stop["flag"] or (stop_after is not None and step >= stop_after)
        if jax.process_count() > 1:  # JAX's sync manager: every process agrees on the step, no collective here
            from jax.experimental import multihost_utils
            preempt = multihost_utils.reached_preemption_sync_point(step) or preempt
        ckpt_every, eval_every = int(train["ckpt_every"]), int(train["eval_every"])
        if (ckpt_every and step % ckpt_every == 0) or preempt or step == total:
            drain()
            save(step)
        if eval_every and step % eval_every == 0 and step < total:
            drain()
            run_eval(step)
        if preempt and step < total:
            ckpt.wait()
            log.warning("stopping at step %d (preemption); checkpoint saved", step)
            return {"preempted": True, "step": step, **result}
    drain()
    if ckpt.latest_step() != step:
        save(step)
    final = run_eval(step)
    ckpt.wait()
    if is_main and "evals" in config:  # evaluators of the config (the passkey sweep), on process 0
        final.update(_config_evals(config, state.params, model_cfg))
    if is_main:
        (workdir / "eval_results.json").write_text(json.dumps({"step": step, **final}, indent=1))
    return {"preempted": False, "step": step, "eval": final, **result}
