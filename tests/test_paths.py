"""gs:// paths stay URIs end to end. The test serves gs:// from fsspec's in-memory file system through epath's
fsspec backend (a real non-local backend, no network), so anything that turned a path into a local one
(pathlib, open(str), os.path) would write under the working directory instead and fail the test. Orbax
writes arrays through TensorStore's own GCS driver, which cannot be served here: its CheckpointManager is
replaced by a recorder that checks it is handed the gs:// directory as a path object."""

import json
import os

import importlib
import pytest
from etils import epath
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from infini_jax import checkpoint as ckpt_lib
from infini_jax import paths
from infini_jax import loop as T
from test_checkpoint import fake_make_iterator, make_config


@pytest.fixture
def memory_gcs(monkeypatch, tmp_path):
    """gs:// → an empty in-memory file system; cwd → an empty temp dir (where a local 'gs:' would appear)."""
    registry = importlib.import_module("fsspec.registry")._registry  # fsspec's own table of protocols
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(registry, protocol, MemoryFileSystem)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's fsspec backend, not tf.io.gfile
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]
    monkeypatch.chdir(tmp_path)
    yield
    assert os.listdir(tmp_path) == [], "a gs:// path was written as a local path"
    MemoryFileSystem.store.clear()


class RecordingManager:
    """Stands in for ocp.CheckpointManager (TensorStore's GCS driver needs a real bucket)."""
    instances: list = []

    def __init__(self, directory, options=None, item_names=None):
        self.directory, self.steps = directory, []
        RecordingManager.instances.append(self)

    def save(self, step, args=None, force=False):
        self.steps.append(step)
        return True

    def all_steps(self):
        return list(self.steps)

    def latest_step(self):
        return max(self.steps) if self.steps else None

    def wait_until_finished(self):
        pass

    def close(self):
        pass


def test_resolve_keeps_uris_and_absolutizes_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
    assert os.fspath(paths.resolve("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert paths.resolve("rel/x") == epath.Path(tmp_path) / "rel" / "x"
    assert not paths.is_local(paths.resolve("gs://b/x")) and paths.is_local(paths.resolve("x"))


def test_training_with_a_gs_workdir(memory_gcs, monkeypatch):
    monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", RecordingManager)
    RecordingManager.instances.clear()
    c = make_config()
    c.train.steps, c.train.eval_every, c.train.ckpt_every = 3, 0, 2
    out = T.train_and_evaluate(c, "gs://bucket/run", progress=False, make_iterator=fake_make_iterator())
    assert out["step"] == 3
    (manager,) = RecordingManager.instances
    assert isinstance(manager.directory, epath.Path)
    assert os.fspath(manager.directory) == "gs://bucket/run/checkpoints" and manager.steps == [2, 3]
    run = epath.Path("gs://bucket/run")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]  # appended through a rewrite
    assert json.loads((run / "eval_results.json").read_text())["step"] == 3


def test_documents_tokenizer_and_plots_through_gs(memory_gcs, shared_dir):
    from infini_jax import plots
    from infini_jax.data.documents import DirectorySource
    from infini_jax.data.tokenizers import load_tokenizer

    books = epath.Path("gs://bucket/books")
    local = sorted((shared_dir / "corpus" / "pg19" / "test").glob("*.txt"))[:2]
    for i, src in enumerate(local):
        (books / "train" / "sub").mkdir(parents=True, exist_ok=True)
        (books / "train" / ("sub" if i else "") / src.name).write_text(src.read_text())
    source = DirectorySource("gs://bucket/books", "train")
    assert len(source) == 2 and {doc_id for doc_id, _ in source} == {local[0].name, f"sub/{local[1].name}"}
    with pytest.raises(FileNotFoundError, match="gs://bucket/nothing"):
        DirectorySource("gs://bucket/nothing", "train")

    from sentencepiece import SentencePieceTrainer

    model = epath.Path("gs://bucket/tok.model")
    import io

    buf = io.BytesIO()
    SentencePieceTrainer.train(sentence_iterator=iter(source[0][1].splitlines()[:2000]), model_writer=buf,
                               vocab_size=200, bos_id=1, eos_id=2, pad_id=3, unk_id=0)
    model.write_bytes(buf.getvalue())
    tok = load_tokenizer("gs://bucket/tok.model")
    assert tok.vocab_size == 200 and tok.decode(tok.encode("the sky")) == "the sky"

    made = plots.plot_all({"passkey": None}, "gs://bucket/run/eval", gates_lh=[[0.1, 0.9]])
    assert [os.fspath(p) for p in made] == ["gs://bucket/run/eval/gates.png"]
    assert made[0].read_bytes()[:4] == b"\x89PNG"
