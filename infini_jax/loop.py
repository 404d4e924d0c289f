"""The training loop, `train_and_evaluate`, read top to bottom in labelled sections (big_vision style):

    checks → workdir and preemption → state (resume, init_from or fresh) → steps and evaluators → the loop
    (train step, metrics, checkpoints, evaluators, preemption) → the end (last checkpoint, evaluators,
    eval_results.json)

The pure parts (TrainState, the loss, the steps) live in step.py; the evaluators in evals/. During training
the evaluators are the validation perplexity `eval` (train.eval_every, train.eval_batches batches), the gates,
and those of config.evals; each runs when its `every` divides the step and at the end, on every process (they
are sharded like the train step), and process 0 writes their results to metrics.jsonl and TensorBoard.

Preemption: one process installs a SIGTERM handler; several processes use JAX's preemption sync manager
(`multihost_utils.reached_preemption_sync_point`, every process stops at the same step without a per-step
collective). Either way a checkpoint of the current step is saved and waited for, and the result is
{"preempted": True, "step": ...}. `stop_after`=k (tests) stops the same way once k steps are done. A
non-finite loss raises NonFiniteLossError without saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from etils import epath

from infini_jax import checkpoint as ckpt_lib
from infini_jax import convert, evals, paths
from infini_jax import optim as optim_lib
from infini_jax import sharding as shd
from infini_jax.model import ModelConfig
from infini_jax.step import (TRAIN_DEFAULTS, NonFiniteLossError, TrainState, check_mesh, create_train_state,
                             empty_memory, make_train_step, validate_config)

log = logging.getLogger(__name__)

# optim/train keys that shape the learning-rate schedule: changing one on resume bends the schedule mid-run
SCHEDULE_KEYS = (("train", "steps"), ("optim", "lr"), ("optim", "gate_lr"), ("optim", "warmup_steps"),
                 ("optim", "schedule"), ("optim", "min_lr_ratio"))


@dataclasses.dataclass(frozen=True)
class Run:
    """The validated pieces of one training run."""

    config: Any
    workdir: epath.Path
    model_cfg: ModelConfig
    train: dict
    optim: dict
    mesh: Any


def train_and_evaluate(config, workdir: epath.PathLike, *, progress: bool = True, stop_after: Optional[int] = None,
                       make_iterator: Optional[Callable] = None) -> dict:
    """Trains config.train.steps steps in `workdir` (a local path or gs://...; resuming from its latest intact
    checkpoint), running the evaluators as they fall due and at the end; writes metrics.jsonl, tb/,
    checkpoints/ and eval_results.json. `make_iterator` defaults to infini_jax.data.make_iterator.

    Every check that can fail on the config, the data or init_from runs before the workdir is created.
    """
    from infini_jax.data.tokenizers import check_vocab, load_tokenizer, with_default_tokenizer

    # ---------------------------------------------------------------- checks (nothing written, nothing compiled)
    config = with_default_tokenizer(config)  # init_from=hf:DIR with no data.tokenizer: DIR's own
    model_cfg, train, optim = validate_config(config)
    tokenizer = load_tokenizer(config.data.get("tokenizer", "byte"))
    if make_iterator is None:  # the real pipeline: its tokenizer must fit the embedding table
        from infini_jax.data import make_iterator

        check_vocab(tokenizer, model_cfg.vocab_size)
    workdir = paths.resolve(workdir)
    saved = ckpt_lib.newest_readable_config(workdir)
    if saved is not None:  # another model or schedule in this workdir: stop before data or compiles
        check_resume(saved, config, train, optim, workdir)
    mesh = shd.make_mesh(config.mesh)
    bs = int(train["batch_size"])
    check_mesh(mesh, model_cfg, bs, int(optim["grad_accum"]))
    train_iter = make_iterator(config.data, split="train", train=True, seq_len=model_cfg.seq_len, batch_size=bs,
                               shard=shd.data_shard(mesh, bs),
                               segment_len=model_cfg.segment_len)  # a missing data_dir fails here
    if train["init_from"]:
        check_init_from(train["init_from"], model_cfg)  # fails here if it cannot start this model
    run = Run(config, workdir, model_cfg, train, optim, mesh)

    # ---------------------------------------------------------------- workdir, checkpointer, preemption
    with contextlib.ExitStack() as stack:
        if hasattr(train_iter, "close"):  # a prefetch thread
            stack.callback(train_iter.close)
        workdir.mkdir(parents=True, exist_ok=True)
        ckpt = ckpt_lib.Checkpointer(workdir, keep=train["keep_checkpoints"], async_save=train["async_checkpoints"])
        stack.callback(ckpt.close)
        preemption = stack.enter_context(_Preemption(stop_after))
        is_main = jax.process_index() == 0
        logger = stack.enter_context(_Logger(workdir, is_main))

        # ------------------------------------------------------------ state: resume, init_from or fresh
        optimizer = optim_lib.make_optimizer(optim, int(train["steps"]))
        graphdef, state, state_sh = start_state(run, ckpt, optimizer.tx, train_iter)

        # ------------------------------------------------------------ the step and the evaluators
        train_step = make_train_step(graphdef, optimizer, mesh=mesh, state_shardings=state_sh,
                                     grad_accum=int(optim["grad_accum"]))
        evaluators = [evals.Perplexity("eval", every=int(train["eval_every"]), batches=int(train["eval_batches"])),
                      evals.Gates("gates", every=int(train["eval_every"])),
                      *(evals.from_config(config.evals) if "evals" in config else [])]
        subject = functools.partial(evals.Subject, model_cfg, mesh=mesh, tokenizer=tokenizer, config=config,
                                    make_iterator=make_iterator)
        evaluate = functools.partial(_evaluate, evaluators, logger=logger, log=print if is_main else _quiet)

        # ------------------------------------------------------------ the loop
        total = int(train["steps"])
        step = int(jax.device_get(state.step))
        metrics = stack.enter_context(_TrainMetrics(run, ckpt, logger, progress and is_main, step))
        while step < total:
            batch = shd.global_batch(next(train_iter), mesh, bs)
            state, step_metrics = train_step(state, batch)
            metrics.drain()  # the previous step's metrics, while this one runs
            step += 1
            metrics.add(step, step_metrics)
            preempt = preemption.requested(step)
            ckpt_every = int(train["ckpt_every"])
            if (ckpt_every and step % ckpt_every == 0) or preempt or step == total:
                metrics.drain()
                save(ckpt, step, state, train_iter, config)
            if step < total and any(e.due(step, final=False) for e in evaluators):
                metrics.drain()
                evaluate(subject(state.params), step, final=False)
            if preempt and step < total:
                ckpt.wait()
                log.warning("stopping at step %d (preemption); checkpoint saved", step)
                return {"preempted": True, "step": step, **metrics.last}

        # ------------------------------------------------------------ the end
        metrics.drain()
        if ckpt.latest_step() != step:
            save(ckpt, step, state, train_iter, config)
        ckpt.wait()
        results = evaluate(subject(state.params), step, final=True)
        final = {**results.pop("eval", {}), **results}  # the validation perplexity at the top level
        if is_main:
            (workdir / "eval_results.json").write_text(json.dumps({"step": step, **final}, indent=1))
        return {"preempted": False, "step": step, "eval": final, **metrics.last}


# --------------------------------------------------------------------------- checks before anything is built

def check_init_from(spec: str, model_cfg: ModelConfig) -> None:
    """train.init_from: an infini-jax checkpoint must exist; hf:DIR must hold this model (config.json, every
    tensor's name and shape; nothing is read yet)."""
    directory = convert.hf_dir(spec)
    if directory is None:
        ckpt_lib.find_step_dir(spec)
    else:
        convert.check_hf_checkpoint(directory, model_cfg)


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


# --------------------------------------------------------------------------- state

def init_params(spec: str, model_cfg: ModelConfig, mesh):
    """Params-only start from train.init_from, on `mesh`: an infini-jax workdir / checkpoints dir / step dir, or
    hf:DIR, a Hugging Face Llama or Gemma directory (infini_jax.convert)."""
    directory = convert.hf_dir(spec)
    if directory is None:
        return ckpt_lib.restore_params(spec, model_cfg, mesh)
    return convert.load_hf_params(directory, model_cfg, mesh)


def start_state(run: Run, ckpt, tx, train_iter) -> tuple:
    """(graphdef, TrainState, its shardings): the latest intact checkpoint (with the data iterator's state), or
    train.init_from's params (fresh optimizer, step 0), or a random init. With train.carry_memory the state
    holds the carried memory, empty in every row: checkpoints do not hold it, so a resumed run starts each
    row's memory empty (the rows go on with their documents)."""
    train = run.train
    resume = bool(ckpt.all_steps())
    rows = int(train["batch_size"]) if train["carry_memory"] else 0
    graphdef, state, state_sh, abstract = create_train_state(run.model_cfg, tx, run.mesh, int(train["seed"]),
                                                             init=not resume and not train["init_from"],
                                                             memory_rows=rows)
    restored = None
    if resume:
        restored = ckpt.restore_latest(
            abstract.params, {"opt_state": abstract.opt_state, "step": abstract.step, "rng": abstract.rng},
            check=lambda saved: check_resume(saved, run.config, train, run.optim, run.workdir))
    if restored is not None:
        latest, params, opt, data_state = restored
        state = TrainState(step=opt["step"], params=params, opt_state=opt["opt_state"], rng=opt["rng"],
                           memory=empty_memory(run.model_cfg, rows, state_sh.memory))
        if data_state is not None:
            train_iter.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
    elif train["init_from"]:  # params only; fresh optimizer state, step 0, data from the start
        params = init_params(train["init_from"], run.model_cfg, run.mesh)
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_sh.step), params=params,
                           opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                           rng=jax.device_put(jax.random.PRNGKey(int(train["seed"]) + 1), state_sh.rng),
                           memory=empty_memory(run.model_cfg, rows, state_sh.memory))
        log.info("initialized params from %s", train["init_from"])
    elif resume:  # every step was damaged and set aside: starting afresh must be the user's decision
        raise ValueError(f"no intact checkpoint in {ckpt.directory} (the damaged steps were moved to "
                         f"<step>.damaged): rerun the same command to start from step 0, or use another --workdir")
    return graphdef, state, state_sh


def save(ckpt, step: int, state: TrainState, train_iter, config) -> None:
    if step not in ckpt.all_steps():
        ckpt.save(step, state, train_iter.get_state(), config)


# --------------------------------------------------------------------------- evaluators

def _quiet(*_):
    pass


def _evaluate(evaluators, subject, step: int, *, final: bool, logger, log: Callable) -> dict:
    """The evaluators due at `step` on `subject`; each one's results go to metrics.jsonl (split = its name)
    and its scalars to TensorBoard (`name/...`). Returns every result, merged."""
    out: dict = {}
    for e in evaluators:
        if not e.due(step, final):
            continue
        results = e.run(subject, log)
        if not results:
            continue
        row = results[e.name] if set(results) == {e.name} and isinstance(results[e.name], dict) else results
        logger.write(step, e.name, row, {f"{e.name}/{k}": v for k, v in e.scalars(results).items()})
        out.update(results)
    return out


# --------------------------------------------------------------------------- metrics, logging, preemption

class _Logger(contextlib.AbstractContextManager):
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

    def write(self, step: int, split: str, row: Mapping[str, Any], scalars: Mapping[str, float]):
        """One metrics.jsonl line {"step", "split", **row}; `scalars` {tag: value} to TensorBoard."""
        if not self.enabled:
            return
        paths.append_text(self.jsonl, json.dumps({"step": int(step), "split": split, **row}) + "\n")
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()

    def __exit__(self, *exc):
        if self.tb is not None:
            self.tb.close()


class _TrainMetrics(contextlib.AbstractContextManager):
    """Train-step metrics, read on the host one step late (the device runs ahead): the non-finite check,
    tokens/s, a line every train.log_every steps, the progress bar. `last` = {"train": latest metrics}."""

    def __init__(self, run: Run, ckpt, logger: _Logger, progress: bool, step: int):
        self.total, self.log_every = int(run.train["steps"]), max(int(run.train["log_every"]), 1)
        self.tokens_per_step = int(run.train["batch_size"]) * run.model_cfg.seq_len
        self.ckpt, self.logger = ckpt, logger
        self.pending: list = []  # (step, metrics) not yet read on the host
        self.window = {"t": time.time(), "tokens": 0, "steps": 0}
        self.last: dict = {}
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=step, dynamic_ncols=True, desc="train")

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))
        if self.bar is not None:
            self.bar.update(1)

    def drain(self) -> None:
        while self.pending:
            step, metrics = self.pending.pop(0)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                self.ckpt.wait()
                raise NonFiniteLossError(
                    f"non-finite loss/grad norm at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}): "
                    f"stopping; the last good checkpoint is step {self.ckpt.latest_step()} in {self.ckpt.directory}")
            w = self.window
            w["tokens"] += self.tokens_per_step
            w["steps"] += 1
            if step % self.log_every == 0 or step == self.total:
                dt = max(time.time() - w["t"], 1e-9)
                m["tokens_per_s"], m["steps_per_s"] = w["tokens"] / dt, w["steps"] / dt
                w.update(t=time.time(), tokens=0, steps=0)
                self.logger.write(step, "train", m, {f"train/{k}": v for k, v in m.items()})
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            self.last = {"train": m}

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


class _Preemption(contextlib.AbstractContextManager):
    """`requested(step)`: SIGTERM arrived (one process), JAX's sync point says stop (several), or
    `stop_after` steps are done."""

    def __init__(self, stop_after: Optional[int]):
        self.stop_after, self.flag, self.prev = stop_after, False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self.flag = True

    def requested(self, step: int) -> bool:
        stop = self.flag or (self.stop_after is not None and step >= self.stop_after)
        if jax.process_count() > 1:  # JAX's sync manager: every process agrees on the step, no collective here
            from jax.experimental import multihost_utils
            stop = multihost_utils.reached_preemption_sync_point(step) or stop
        return stop

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)
