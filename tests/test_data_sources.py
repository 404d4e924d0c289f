"""Data sources: folders of documents, BookSum, PG19 via tfds (built without TensorFlow at read time), and the
tokenizers the pipelines load. Passkey, windows and make_iterator are in tests/test_data.py."""

import importlib.util
import json

import numpy as np
import pytest
from _data import TOK, _cfg, _check_batch
from _shared import CORPUS, mistral_model, needs_corpus

from infini_jax.data import (ByteTokenizer, DirectorySource, booksum_example, build_pg19, load_tokenizer,
                             make_iterator, make_passkey_example, passkey_text, rouge_scores)

HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="tensorflow not installed (needed once to build pg19)")


# -------------------------------------------------------------------------------------------- documents
@needs_corpus
def test_arxiv_math_directory_source_and_iterator():
    root = CORPUS / "arxiv_math"
    sizes = {s: len(DirectorySource(root, s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 11, "validation": 2, "test": 2}
    src = DirectorySource(root, "validation")
    doc_id, text = src[0]
    assert doc_id.endswith(".tex") and text.startswith("%")
    cfg = _cfg(name="text", data_dir=str(root), tokenizer="byte")
    it = make_iterator(cfg, seq_len=4096, batch_size=2, split="validation", train=False)
    scored = 0
    for batch in it:
        _check_batch(batch, 2, 4096)
        scored += int(batch["loss_mask"].sum())
    assert scored == sum(len(t.encode()) + 1 for _, t in src)  # every byte + eos, once


def test_directory_source_flat_jsonl_and_split(tmp_path):
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    src = DirectorySource(tmp_path, "validation")  # flat dir serves any split
    assert [d for d, _ in src] == ["a.txt", "b.jsonl:1", "b.jsonl:3"]
    assert [t for _, t in src] == ["first doc", "x", "y"]
    assert len(DirectorySource(tmp_path / "b.jsonl", "train")) == 2


def test_directory_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir.*does not exist"):
        DirectorySource(tmp_path / "missing_dir", "train")
    with pytest.raises(ValueError, match="not set"):
        DirectorySource(None, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no document files.*empty"):
        DirectorySource(tmp_path / "empty", "train")
    (tmp_path / "splits" / "train").mkdir(parents=True)
    (tmp_path / "splits" / "train" / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="split 'test' has no folder.*train"):
        DirectorySource(tmp_path / "splits", "test")
    (tmp_path / "splits" / "validation").mkdir()
    with pytest.raises(ValueError, match="no document files.*split 'validation'"):
        DirectorySource(tmp_path / "splits", "validation")
    (tmp_path / "splits" / "train" / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        DirectorySource(tmp_path / "splits", "train")
    (tmp_path / "splits" / "train" / "empty.txt").unlink()
    (tmp_path / "splits" / "train" / "bad.md").write_bytes(b"\xff\xfe\xfa not utf8")
    src = DirectorySource(tmp_path / "splits", "train")
    with pytest.raises(ValueError, match="bad.md.*UTF-8"):
        src[[src.doc_id(i) for i in range(len(src))].index("bad.md")]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no field 'text'"):
        DirectorySource(tmp_path / "j", "train")[0]


# --------------------------------------------------------------------------------------------- booksum
def test_booksum_mask_and_windows(tmp_path):
    ex = booksum_example(TOK, "D" * 300, "the summary", separator="|")
    seq, score = ex
    assert TOK.decode(seq[score > 0]) == "the summary"
    assert seq[score > 0][-1] == TOK.eos_id and score.sum() == len("the summary") + 1
    rows = [{"document": "long book " * 50, "summary": "short."}, {"document": "tiny", "summary": "t."}]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "bs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(name="booksum", data_dir=str(tmp_path), separator=" => ")
    batches = list(make_iterator(cfg, seq_len=128, batch_size=1, split="train", train=False))
    assert len(batches) == 4 + 1  # 500 + 4 + 6 + 1 tokens -> 4 windows; the tiny one fits one
    assert [bool(b["reset"][0]) for b in batches] == [True, False, False, False, True]
    assert all(b["loss_mask"].sum() == 0 for b in batches[:3])  # the left part of the book is context only
    assert TOK.decode(batches[3]["targets"][0][batches[3]["loss_mask"][0] > 0]) == "short."
    assert TOK.decode(batches[3]["tokens"][0]).endswith("book  => short.")


def test_rouge_helper():
    s = rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert s["rouge1"] == pytest.approx(100) and s["rougeL"] == pytest.approx(100)
    low = rouge_scores(["dogs bark loudly"], ["the cat sat on the mat"])
    assert low["rouge1"] == 0 and set(low) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


# -------------------------------------------------------------------------------------------------- pg19
@pytest.fixture(scope="module")
def pg19_dir(tmp_path_factory):
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus {CORPUS} absent")
    if not HAS_TF:
        pytest.skip("tensorflow not installed (needed once to build pg19)")
    out = tmp_path_factory.mktemp("tfds")
    counts = build_pg19(str(CORPUS / "pg19"), str(out))
    assert counts == {"train": 8, "validation": 2, "test": 2}
    return out


@needs_corpus
@needs_tf
def test_pg19_build_and_read_tf_free(pg19_dir):
    import subprocess
    import sys
    code = ("import sys, json; import tensorflow_datasets as tfds; "
            f"ds = tfds.data_source('pg19', data_dir={str(pg19_dir)!r}, split='test'); "
            "ids = sorted(int(ds[i]['book_id']) for i in range(len(ds))); "
            "print(json.dumps([ids, 'tensorflow' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ids, tf_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert ids == [972, 18304] and not tf_loaded


@needs_corpus
@needs_tf
def test_pg19_iterator_every_token_once(pg19_dir):
    cfg = _cfg(name="pg19", data_dir=str(pg19_dir), tokenizer="byte")
    it = make_iterator(cfg, seq_len=8192, batch_size=2, split="validation", train=False)
    scored, firsts = 0, 0
    for batch in it:
        scored += int(batch["loss_mask"].sum())
        firsts += int((batch["reset"] & (it.last_doc_index >= 0)).sum())
    books = [(CORPUS / "pg19" / "validation" / f).read_text(encoding="utf-8").strip()
             for f in ("1661.txt", "14263.txt")]
    assert firsts == 2 and scored == sum(len(b.encode()) + 1 for b in books)
    train = make_iterator(cfg, seq_len=1024, batch_size=4, split="train", shard=(1, 2))
    batch = next(train)
    _check_batch(batch, 2, 1024)
    assert batch["reset"].all() and batch["loss_mask"].all()


def test_load_tokenizer_from_config_field():
    assert isinstance(load_tokenizer(_cfg(tokenizer="byte").tokenizer), ByteTokenizer)




@pytest.mark.skipif(mistral_model() is None, reason="mistral-common (ships a SentencePiece model) not installed")
def test_sentencepiece_passkey_and_windows(tmp_path):
    tok = load_tokenizer(str(mistral_model()))
    for depth in (0.0, 0.5, 1.0):
        ex = make_passkey_example(tok, 500, depth, passkey="9054")
        prompt, answer = passkey_text(ex.n_filler, depth, "9054")
        # piecewise encoding == encoding the whole text (SentencePiece's dummy prefix supplies the spaces)
        assert ex.tokens[1:].tolist() == tok.encode(prompt + answer)
        assert len(ex.tokens) <= 500 and ex.tokens[0] == tok.bos_id
    (tmp_path / "d.txt").write_text("Some text to window. " * 30)
    cfg = _cfg(name="text", data_dir=str(tmp_path), tokenizer=str(mistral_model()))
    batches = list(make_iterator(cfg, seq_len=32, batch_size=1, split="train", train=False))
    tgts = np.concatenate([b["targets"][0][b["loss_mask"][0] > 0] for b in batches])
    assert tgts.tolist() == tok.encode("Some text to window. " * 30) + [tok.eos_id]
