"""Tokenizers: byte tokenizer, SentencePiece loading, `infini-tokenizer train`."""

import os
import subprocess
import sys

import numpy as np
import pytest
from _shared import CORPUS, REPO, mistral_model, needs_corpus  # noqa: F401

from infini_jax.data import ByteTokenizer, SentencePieceTokenizer, load_tokenizer
from infini_jax.cli.infini_tokenizer import main as tokenizer_main





MISTRAL = mistral_model()
needs_mistral = pytest.mark.skipif(MISTRAL is None, reason="mistral-common (ships a SentencePiece model) not installed")


def test_byte_tokenizer_ids_and_roundtrip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    assert tok.encode("A") == [ord("A") + 3]
    text = "Grüße, 世界! \n\t\\int_0^1"
    ids = tok.encode(text)
    assert min(ids) >= 3 and max(ids) < 259
    assert tok.decode(ids) == text
    assert tok.decode([1] + ids + [2, 0, 0]) == text  # specials are dropped
    np.testing.assert_array_equal(tok.encode_np(text), ids)
    assert tok.encode_np(text).dtype == np.int32


def test_load_tokenizer_specs_and_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    tok = ByteTokenizer()
    assert load_tokenizer(tok) is tok
    with pytest.raises(ValueError, match="tokenizer is empty"):
        load_tokenizer("")
    with pytest.raises(ValueError, match="not found.*nope.model"):
        load_tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_text("this is not a protobuf")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(str(bad))


@needs_mistral
def test_sentencepiece_real_model():
    tok = load_tokenizer(str(MISTRAL))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert 0 <= tok.pad_id < tok.vocab_size  # model has no pad: falls back to unk
    text = "The pass key is 9054. Remember it."
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text


@needs_corpus
def test_train_sentencepiece_cli(tmp_path):
    # a small slice of the corpus, written into tmp_path (never into the repo)
    src = tmp_path / "slice"
    src.mkdir()
    book = (CORPUS / "pg19" / "train" / "84.txt").read_text(encoding="utf-8")[:60_000]
    tex = (CORPUS / "arxiv_math" / "train" / "stacks_fields.tex").read_text(encoding="utf-8")[:40_000]
    (src / "book.txt").write_text(book, encoding="utf-8")
    (src / "math.tex").write_text(tex, encoding="utf-8")
    prefix = tmp_path / "out" / "sp"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "infini_jax.cli.infini_tokenizer", "train", "--input", str(src), "--vocab_size", "400",
         "--output", str(prefix)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = load_tokenizer(str(prefix) + ".model")
    assert tok.vocab_size == 400
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    sample = book[1000:1400]
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode())  # it compresses
    assert "\n" in sample and "  " in sample
    assert tok.decode(ids) == sample  # lossless: newlines and double spaces survive
    # byte fallback: characters never seen still round-trip
    assert tok.decode(tok.encode("ξ∮")) == "ξ∮"


def test_train_cli_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_main(["train", "--input", str(tmp_path / "missing"), "--vocab_size", "100",
                        "--output", str(tmp_path / "x")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        tokenizer_main(["train", "--input", str(tmp_path / "empty"), "--vocab_size", "100",
                        "--output", str(tmp_path / "x")])
