"""Checkpoints through the training loop: exact resume after SIGTERM, NaN stop, restore_params, wrong model."""

import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest

from infini_jax import checkpoint as ckpt_lib
from infini_jax import sharding as shd
from infini_jax import loop as T
from infini_jax.step import NonFiniteLossError
from infini_jax.model import ModelConfig

MODEL = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, head_dim=8, d_ff=64, segment_len=8,
             n_segments=2, remat=False)
STEPS = 6


class FakeIterator:
    """Deterministic batches from (seed, split, step); optional SIGTERM to this process at a given step."""

    def __init__(self, seq_len, batch_size, split, num_batches=None, sigterm_at=None, nan_at=None):
        self.seq_len, self.batch_size, self.split = seq_len, batch_size, split
        self.num_batches, self.sigterm_at, self.nan_at, self.step = num_batches, sigterm_at, nan_at, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.num_batches is not None and self.step >= self.num_batches:
            raise StopIteration
        rng = np.random.default_rng([0 if self.split == "train" else 1, self.step])
        seq = rng.integers(3, 64, (self.batch_size, self.seq_len + 1)).astype(np.int32)
        seq[:, 1::2] = seq[:, 0:-1:2]  # learnable: every odd token repeats the previous one
        self.step += 1
        if self.sigterm_at is not None and self.step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        mask = np.full(seq[:, 1:].shape, np.nan if self.step == self.nan_at else 1.0, np.float32)
        return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask,
                "reset": np.ones((self.batch_size,), bool)}

    def get_state(self):
        return {"kind": "fake", "step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


def fake_make_iterator(sigterm_at=None, nan_at=None):
    def make(data_cfg, *, seq_len, batch_size, split, shard=(0, 1), train=True, segment_len=None):
        n = None if train else int(data_cfg["num_batches"])
        return FakeIterator(seq_len, batch_size // shard[1], split, n, *((sigterm_at, nan_at) if train else ()))
    return make


def make_config(**optim):
    c = ml_collections.ConfigDict()
    c.model = dict(MODEL)
    c.data = dict(name="fake")
    c.train = dict(steps=STEPS, batch_size=8, seed=0, log_every=1, eval_every=4, eval_batches=1, ckpt_every=2,
                   keep_checkpoints=3)
    c.optim = dict(name="adamw", lr=1e-2, gate_lr=3e-2, warmup_steps=2, weight_decay=0.1, clip_norm=1.0,
                   **optim)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The runs below compile the same programs: share them through JAX's persistent cache."""
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    try:  # the cache is initialized once per process: forget it so later tests run as before
        from jax._src import compilation_cache
        compilation_cache.reset_cache()
    except Exception:
        pass


def train_losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    result = T.train_and_evaluate(make_config(), workdir, progress=False, make_iterator=fake_make_iterator())
    return workdir, result


def test_full_run_writes_everything(full_run):
    workdir, result = full_run
    assert result["step"] == STEPS and not result["preempted"]
    ev = json.loads((workdir / "eval_results.json").read_text())
    assert ev["step"] == STEPS and np.isfinite(ev["loss"]) and abs(ev["ppl"] - np.exp(ev["loss"])) < 1e-6
    assert np.array(ev["gates"]).shape == (1, 4)
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [4, STEPS]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
    assert list((workdir / "tb").iterdir())
    step_dir = workdir / "checkpoints" / str(STEPS)
    ck = ckpt_lib.Checkpointer(workdir)
    assert ck.saved_config()["model"] == MODEL
    ck.close()
    assert {p.name for p in step_dir.iterdir()} >= {"params", "opt", "data", "config"}


def test_sigterm_saves_and_resume_is_exact(full_run, tmp_path):
    full_dir, _ = full_run
    workdir = tmp_path / "resumed"
    first = T.train_and_evaluate(make_config(), workdir, progress=False, make_iterator=fake_make_iterator(3))
    assert first["preempted"] and first["step"] == 3
    ck = ckpt_lib.Checkpointer(workdir)
    assert ck.latest_step() == 3
    ck.close()
    assert not (workdir / "eval_results.json").exists()
    second = T.train_and_evaluate(make_config(), workdir, progress=False, make_iterator=fake_make_iterator())
    assert second["step"] == STEPS and not second["preempted"]
    assert train_losses(workdir) == train_losses(full_dir)  # bitwise: same data, same state, same programs
    cfg = ModelConfig(**MODEL)
    a, b = ckpt_lib.restore_params(full_dir, cfg), ckpt_lib.restore_params(workdir, cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
    assert json.loads((workdir / "eval_results.json").read_text()) == json.loads(
        (full_dir / "eval_results.json").read_text())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(full_run, tmp_path):
    """A NaN injected through the data at step 4 (a step that would be checkpointed): stop, no save."""
    full_dir, _ = full_run
    c = make_config()
    c.train.ckpt_every = 1
    with pytest.raises(NonFiniteLossError, match="non-finite loss/grad norm at step 4.*last good checkpoint is "
                       "step 3"):
        T.train_and_evaluate(c, tmp_path, progress=False, make_iterator=fake_make_iterator(nan_at=4))
    ck = ckpt_lib.Checkpointer(tmp_path)
    assert ck.all_steps() == [1, 2, 3]
    ck.close()
    losses = train_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3]
    good = ckpt_lib.restore_params(tmp_path, ModelConfig(**MODEL))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(good)))
    # the resumed run with clean data continues from step 3 and matches the uninterrupted run
    T.train_and_evaluate(c, tmp_path, progress=False, make_iterator=fake_make_iterator())
    assert train_losses(tmp_path) == train_losses(full_dir)


def test_restore_params_onto_another_mesh_and_mismatches(full_run):
    workdir, _ = full_run
    mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
    cfg = ModelConfig(**MODEL)
    p8 = ckpt_lib.restore_params(workdir / "checkpoints", cfg, mesh=mesh)
    p1 = ckpt_lib.restore_params(workdir / "checkpoints" / str(STEPS), cfg)
    assert p8["blocks"][0]["attn"]["wq_dhk"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(p8), jax.device_get(p1))
    with pytest.raises(ValueError, match=r"shape blocks/0/mlp/w_up_df: checkpoint \(32, 64\) vs model \(32, 128\)"):
        ckpt_lib.restore_params(workdir, ModelConfig(**{**MODEL, "d_ff": 128}))
    with pytest.raises(ValueError, match="missing in checkpoint: blocks/1/attn/wq_dhk"):
        ckpt_lib.restore_params(workdir, ModelConfig(**{**MODEL, "num_layers": 2}))
    with pytest.raises(ValueError, match="not in model: blocks/0/attn/gate_logit"):
        ckpt_lib.restore_params(workdir, ModelConfig(**{**MODEL, "attention": "local"}))


def test_workdir_of_another_model_is_an_error_before_compiling(full_run):
    workdir, _ = full_run
    c = make_config()
    c.model.d_ff = 128
    never = lambda *a, **k: pytest.fail("must fail before building data or compiling")  # noqa: E731
    with pytest.raises(ValueError, match="different model.*'d_ff': \\(64, 128\\)"):
        T.train_and_evaluate(c, workdir, progress=False, make_iterator=never)


def test_init_from_starts_a_fresh_run_from_saved_params(full_run, tmp_path):
    full_dir, _ = full_run
    c = make_config()
    c.train.init_from = str(full_dir)
    out = T.train_and_evaluate(c, tmp_path, progress=False, make_iterator=fake_make_iterator(), stop_after=1)
    assert out["step"] == 1
    # step 1 of the fine-tune sees the same first batch as the original run's step 1, but trained params
    assert train_losses(tmp_path)[1] < train_losses(full_dir)[1]
    c.train.init_from = str(full_dir / "nowhere")
    with pytest.raises(FileNotFoundError):
        T.train_and_evaluate(c, tmp_path / "other", progress=False, make_iterator=fake_make_iterator())


def test_check_model_matches_allows_only_compute_keys():
    saved = {"model": dict(MODEL, mode="scan", remat=False)}  # remat_segments absent: saved before the key
    ckpt_lib.check_model_matches(saved, dict(MODEL, mode="parallel", remat=True, remat_segments=True), "w")
    # trained with interleaved mass passes, evaluated (no write scale) or resumed without them
    ckpt_lib.check_model_matches({"model": dict(MODEL, mass_passes=4)}, dict(MODEL, mass_passes=1), "w")
    with pytest.raises(ValueError, match="'rule': \\('linear', 'delta'\\)"):
        ckpt_lib.check_model_matches({"model": dict(MODEL, rule="linear")}, dict(MODEL, rule="delta"), "w")
    ckpt_lib.check_model_matches(None, MODEL, "w")
    # a key added after the checkpoint was written: fine at its default, an error at any other value
    older = {k: v for k, v in MODEL.items() if k != "rope_scaling"}
    ckpt_lib.check_model_matches({"model": older}, dict(MODEL, rope_scaling=[]), "w")
    with pytest.raises(ValueError, match="rope_scaling"):
        ckpt_lib.check_model_matches({"model": older}, dict(MODEL, rope_scaling=[8.0, 1.0, 4.0, 8192]), "w")


def _truncate_arrays(step_dir):
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "truncated array file": _truncate_arrays,
    "garbage metadata": lambda d: (d / "params" / "_METADATA").write_text("{not json"),
    "missing commit marker": lambda d: (d / "commit_success.txt").unlink(),
    "garbage saved config": lambda d: (d / "config" / "metadata").write_text("\x00garbage"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_previous_step(full_run, tmp_path, damage, caplog):
    """The newest step is damaged: a warning names it, it is moved aside (not deleted), training resumes from
    the step before and ends where the undamaged run ended, bitwise."""
    import shutil

    full_dir, _ = full_run
    workdir = tmp_path / "w"
    shutil.copytree(full_dir, workdir)
    DAMAGE[damage](workdir / "checkpoints" / str(STEPS))
    with caplog.at_level("WARNING", logger="infini_jax"):
        out = T.train_and_evaluate(make_config(), workdir, progress=False, make_iterator=fake_make_iterator())
    assert out["step"] == STEPS
    warned = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert warned and f"checkpoint step {STEPS} in " in warned[0] and ".damaged" in warned[0]
    assert (workdir / "checkpoints" / f"{STEPS}.damaged").is_dir()  # kept for inspection
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"][-2:] == [STEPS - 1, STEPS]  # resumed from step 4
    cfg = ModelConfig(**MODEL)
    a, b = ckpt_lib.restore_params(full_dir, cfg), ckpt_lib.restore_params(workdir, cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_changed_schedule_on_resume_is_an_error_unless_allowed(full_run, tmp_path):
    import shutil

    full_dir, _ = full_run
    workdir = tmp_path / "w"
    shutil.copytree(full_dir, workdir)
    c = make_config()
    c.train.steps = STEPS + 2
    never = lambda *a, **k: pytest.fail("must fail before building data or compiling")  # noqa: E731
    with pytest.raises(ValueError, match=r"another learning-rate schedule.*'train.steps': \(6, 8\).*"
                                         r"allow_schedule_change=True"):
        T.train_and_evaluate(c, workdir, progress=False, make_iterator=never)
    c.optim.lr = 2e-2
    with pytest.raises(ValueError, match=r"'optim.lr': \(0.01, 0.02\)"):
        T.train_and_evaluate(c, workdir, progress=False, make_iterator=never)
    c.optim.lr = 1e-2
    c.train.allow_schedule_change = True
    out = T.train_and_evaluate(c, workdir, progress=False, make_iterator=fake_make_iterator())
    assert out["step"] == STEPS + 2


def test_bad_data_or_init_from_leaves_no_workdir(tmp_path):
    """Errors in the data source or init_from come before the workdir is created: no empty skeleton."""
    c = make_config()
    c.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no checkpoint found at .*nowhere"):
        T.train_and_evaluate(c, tmp_path / "w1", progress=False, make_iterator=fake_make_iterator())
    assert not (tmp_path / "w1").exists()

    def missing(*a, **k):
        raise FileNotFoundError("data_dir '/nope' does not exist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.train_and_evaluate(make_config(), tmp_path / "w2", progress=False, make_iterator=missing)
    assert not (tmp_path / "w2").exists()


def test_other_scan_layers_layout_is_one_clear_error(full_run):
    """Saved with scan_layers=False, asked for True: resuming and init_from both say so and how to fix it."""
    workdir, _ = full_run
    msg = r"scan_layers=False .*no converter between the layouts: set --config.model.scan_layers=False"
    with pytest.raises(ValueError, match=msg):
        ckpt_lib.restore_params(workdir, ModelConfig(**{**MODEL, "scan_layers": True}))
    c = make_config()
    c.model.scan_layers = True
    never = lambda *a, **k: pytest.fail("must fail before building data or compiling")  # noqa: E731
    with pytest.raises(ValueError, match=msg):
        T.train_and_evaluate(c, workdir, progress=False, make_iterator=never)
