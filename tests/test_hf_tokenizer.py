"""Hugging Face tokenizers (data.tokenizer = a directory or tokenizer.json): Hugging Face's ids and special tokens,
exact bytes per token, clear errors, and the default tokenizer taken from train.init_from."""

import json

import numpy as np
import pytest

from _hf import SAMPLE, TEXT, save_byte_level_tokenizer, save_gemma_tokenizer
from infini_jax.config import load_config
from infini_jax.data.tokenizers import HFTokenizer, load_tokenizer, with_default_tokenizer
from infini_jax.evals import byte_length_table


@pytest.fixture(scope="module", params=["byte_level", "gemma"])
def saved(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    (save_byte_level_tokenizer if request.param == "byte_level" else save_gemma_tokenizer)(directory)
    return directory


def test_same_ids_and_specials_as_auto_tokenizer(saved):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(saved)
    for spec in (saved, saved / "tokenizer.json"):
        tok = load_tokenizer(str(spec))
        assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(hf)
        assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
        assert tok.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
        for text in TEXT[:5] + [SAMPLE]:  # SAMPLE holds special-token text, parsed as Hugging Face does
            ids = tok.encode(text)
            assert ids == hf(text, add_special_tokens=False).input_ids
            bos = [tok.bos_id] if hf(text).input_ids[:1] == [hf.bos_token_id] else []
            assert bos + ids == hf(text).input_ids  # what the post-processor adds, we add as bos
            np.testing.assert_array_equal(tok.encode_np(text), ids)
        assert tok.decode(tok.encode(TEXT[4])) == TEXT[4]


def test_bytes_per_token_are_exact(saved):
    tok = load_tokenizer(str(saved))
    table_V = byte_length_table(tok, tok.vocab_size)
    assert not tok.space_prefix
    for text in TEXT[:5] + ["x", " leading space", "tab\tand newline\n"]:
        assert int(table_V[tok.encode_np(text)].sum()) == len(text.encode("utf-8")), text
    assert table_V[[tok.bos_id, tok.eos_id]].sum() == 0


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no Hugging Face tokenizer at .*tokenizer.json"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer.json
    nobos = tmp_path / "nobos"
    save_byte_level_tokenizer(nobos, with_bos=False)
    with pytest.raises(ValueError, match="no bos_token/eos_token in .*tokenizer_config.json"):
        load_tokenizer(str(nobos))
    with pytest.raises(ValueError, match="tokenizer is empty.*init_from=hf:DIR"):
        load_tokenizer("")


def test_default_tokenizer_comes_from_init_from(saved, tmp_path):
    config = load_config("passkey_1b:stage=finetune")
    assert config.data.tokenizer == ""
    assert with_default_tokenizer(config) is config  # nothing to take it from: stays empty (an error later)
    config.train.init_from = f"hf:{saved}"
    resolved = with_default_tokenizer(config)
    assert resolved.data.tokenizer == str(saved) and config.data.tokenizer == ""
    config.data.tokenizer = "byte"  # an explicit tokenizer wins
    assert with_default_tokenizer(config).data.tokenizer == "byte"
    step = tmp_path / "run" / "checkpoints" / "7"  # an infini-jax checkpoint: the tokenizer it was trained with
    (step / "params").mkdir(parents=True)
    (step / "config").mkdir()
    (step / "config" / "metadata").write_text(json.dumps({"model": {}, "data": {"tokenizer": str(saved)}}))
    config = load_config("booksum_8b:stage=finetune")
    config.train.init_from = str(tmp_path / "run")
    assert with_default_tokenizer(config).data.tokenizer == str(saved)
