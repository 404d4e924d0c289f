"""BookSum summarize task: streams each document, generates with bounded memory, scores ROUGE."""

import json

import ml_collections
import numpy as np
import pytest
from flax import nnx

from infini_jax.data import ByteTokenizer
from infini_jax.data.booksum import booksum_prompt
from infini_jax.model import InfiniTransformer, ModelConfig
from infini_jax.evals import summarize_and_score


def _data(tmp_path):
    records = [{"document": "The whale was white. " * 20, "summary": "A white whale."},
               {"document": "It was the best of times. " * 15, "summary": "Times were good and bad."}]
    (tmp_path / "validation").mkdir()
    with open(tmp_path / "validation" / "books.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return ml_collections.ConfigDict(dict(name="booksum", tokenizer="byte", data_dir=str(tmp_path)))


def test_summarize_and_score(tmp_path, monkeypatch):
    tok = ByteTokenizer()
    model = InfiniTransformer(ModelConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2, head_dim=16,
                                          d_ff=64, segment_len=32, n_segments=2), rngs=nnx.Rngs(0))
    data_cfg = _data(tmp_path)
    out = summarize_and_score(model, tok, data_cfg, dict(max_new_tokens=6, seed=1), log=lambda *_: None)
    assert out["documents"] == 2 and set(out["rouge"]) >= {"rouge1", "rouge2", "rougeL"}
    assert all(0.0 <= v <= 100.0 for v in out["rouge"].values())
    want = len(booksum_prompt(tok, "The whale was white. " * 20))
    assert out["records"][0]["prompt_tokens"] == want
    again = summarize_and_score(model, tok, data_cfg, dict(max_new_tokens=6, seed=1), log=lambda *_: None)
    assert [r["summary"] for r in again["records"]] == [r["summary"] for r in out["records"]]

    # A model that emits the reference exactly scores 100: the scoring path is wired to the right pairs.
    import infini_jax.evals.summarize as summ

    refs = iter(["A white whale.", "Times were good and bad."])
    monkeypatch.setattr(summ, "generate", lambda *a, **k: np.asarray(tok.encode(next(refs)) + [tok.eos_id]))
    perfect = summ.summarize_and_score(model, tok, data_cfg, dict(max_new_tokens=6), log=lambda *_: None)
    assert perfect["rouge"]["rouge1"] == pytest.approx(100.0)


def test_summarize_needs_booksum_config():
    model = InfiniTransformer(ModelConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2, head_dim=16,
                                          d_ff=64, segment_len=32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="booksum"):
        summarize_and_score(model, ByteTokenizer(), ml_collections.ConfigDict(dict(name="passkey")))
