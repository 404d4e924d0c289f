"""Data pipelines: passkey, long-document windows, make_iterator (its errors, config keys, prefetching). The
document sources (directories, BookSum, PG19 via tfds) and tokenizers are in tests/test_data_sources.py."""

import json

import numpy as np
import pytest
from _data import TOK, _cfg, _check_batch
from _shared import CORPUS, needs_corpus

from infini_jax.data import (PasskeyIterator, PasskeyStream, WindowIterator, Windows, iter_example_windows,
                             make_iterator, make_passkey_example, passkey_text, text_example)
from infini_jax.data.passkey import FILLER, INTRO, QUESTION


# ----------------------------------------------------------------------------------------------- passkey
def test_passkey_exact_prompt_text():
    ex = make_passkey_example(TOK, 1000, 0.5, passkey="9054")
    prompt, answer = passkey_text(ex.n_filler, 0.5, "9054")
    assert TOK.decode(ex.tokens[:ex.prompt_len]) == prompt
    assert TOK.decode(ex.tokens[ex.answer_start:]) == answer == " 9054"
    assert ex.tokens[0] == TOK.bos_id
    assert prompt.startswith(INTRO + " " + FILLER + " ")
    assert prompt.endswith(" " + QUESTION) and prompt.endswith("What is the pass key? The pass key is")
    assert "The pass key is 9054. Remember it. 9054 is the pass key." in prompt
    assert prompt.count(FILLER) == ex.n_filler
    # length semantics: total <= length and within one filler of it
    assert 1000 - len(TOK.encode(" " + FILLER)) < len(ex.tokens) <= 1000


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_depth(depth):
    ex = make_passkey_example(TOK, 5000, depth, seed=3)
    text = TOK.decode(ex.tokens[:ex.prompt_len])
    key_line = f"The pass key is {ex.passkey}."
    assert len(ex.passkey) == 5 and ex.passkey.isdigit()
    # token position of the key line (bytes: char index + 1 for bos)
    assert text.index(key_line) + 1 == ex.key_start + 1  # +1: the leading space is part of the key unit
    fillers_before = text[:text.index(key_line)].count(FILLER)
    assert fillers_before == round(depth * ex.n_filler)
    assert abs(ex.key_start / ex.prompt_len - depth) < 0.1
    if depth == 0.0:
        assert text.startswith(INTRO + " " + key_line)
    if depth == 1.0:
        assert text.endswith(f"{ex.passkey} is the pass key. " + QUESTION)


def test_passkey_seed_and_digits():
    a = make_passkey_example(TOK, 800, 0.5, seed=1)
    b = make_passkey_example(TOK, 800, 0.5, seed=1)
    c = make_passkey_example(TOK, 800, 0.5, seed=2, n_digits=7)
    assert a.passkey == b.passkey and np.array_equal(a.tokens, b.tokens)
    assert len(c.passkey) == 7 and c.passkey[0] != "0"
    with pytest.raises(ValueError, match="shorter than the prompt"):
        make_passkey_example(TOK, 50, 0.5)
    with pytest.raises(ValueError, match="depth"):
        make_passkey_example(TOK, 800, 1.5)


def test_passkey_stream_matches_example_small():
    ex = make_passkey_example(TOK, 3000, 0.3, passkey="12345")
    stream = PasskeyStream(TOK, 3000, 0.3, passkey="12345", chunk_tokens=97)
    chunks = list(stream)
    assert all(len(c) <= 97 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), ex.tokens)
    assert (stream.answer_start, stream.key_start) == (ex.answer_start, ex.key_start)


def test_passkey_stream_1m_tokens_bounded():
    stream = PasskeyStream(TOK, 1_000_000, 0.5, seed=7, chunk_tokens=1 << 16)
    total, biggest, answer_seen = 0, 0, None
    a0, na = stream.answer_start, len(stream.answer_ids)
    for chunk in stream:
        biggest = max(biggest, len(chunk))
        lo, hi = max(a0, total), min(a0 + na, total + len(chunk))
        if lo < hi:  # collect the answer tokens where the stream says they are
            answer_seen = (answer_seen if answer_seen is not None else []) + list(chunk[lo - total:hi - total])
        total += len(chunk)
    assert biggest <= 1 << 16
    assert total == stream.total_len and 1_000_000 - 100 < total <= 1_000_000
    assert answer_seen == list(stream.answer_ids) and TOK.decode(answer_seen) == " " + stream.passkey
    assert stream.answer_start + na == total
    assert abs(stream.key_start / total - 0.5) < 0.01


def test_passkey_iterator_windows():
    it = PasskeyIterator(TOK, seq_len=512, batch_size=4, seed=0, min_len=300)
    batch = next(it)
    _check_batch(batch, 4, 512)
    assert batch["reset"].all()
    for b in range(4):
        mask = batch["loss_mask"][b]
        # right-padded: the example starts at position 0 and the answer targets end where the padding starts
        assert batch["tokens"][b][0] == TOK.bos_id
        scored = np.flatnonzero(mask)
        n = len(scored)
        assert n == 6 and np.array_equal(scored, np.arange(scored[0], scored[0] + n))
        end = scored[-1] + 1
        assert (batch["targets"][b][end:] == TOK.pad_id).all()
        answer = TOK.decode(batch["targets"][b][scored])
        assert answer.startswith(" ") and answer[1:].isdigit()
        text = TOK.decode(batch["tokens"][b][:end])
        assert text.endswith("What is the pass key? The pass key is" + answer[:-1])
        assert f"The pass key is {answer[1:]}." in text
        np.testing.assert_array_equal(batch["tokens"][b][1:], batch["targets"][b][:-1])
    assert (batch["tokens"] == TOK.pad_id).any()  # min_len < seq_len + 1 gave (right) padding
    # deterministic, resumable
    it2 = PasskeyIterator(TOK, seq_len=512, batch_size=4, seed=0, min_len=300)
    np.testing.assert_array_equal(next(it2)["tokens"], batch["tokens"])
    [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))
    want = next(it)
    it3 = PasskeyIterator(TOK, seq_len=512, batch_size=4, seed=0, min_len=300)
    it3.set_state(state)
    np.testing.assert_array_equal(next(it3)["tokens"], want["tokens"])
    # loss on all non-pad tokens: every target from the first to the last real token, none on the padding
    full = next(PasskeyIterator(TOK, seq_len=512, batch_size=2, seed=0, min_len=300, loss_on_all=True))
    for b in range(2):
        n_real = int((full["targets"][b] != TOK.pad_id).sum())
        assert (full["loss_mask"][b][:n_real] == 1).all() and (full["loss_mask"][b][n_real:] == 0).all()


def test_make_iterator_passkey_eval_finite():
    cfg = _cfg(name="passkey", tokenizer="byte", seed=0, eval_batches=3, passkey_intro=False)
    batches = list(make_iterator(cfg, seq_len=256, batch_size=4, split="validation", train=False))
    assert len(batches) == 3
    train_first = next(make_iterator(cfg, seq_len=256, batch_size=4, split="train"))
    assert not np.array_equal(train_first["tokens"], batches[0]["tokens"])
    assert not TOK.decode(batches[0]["tokens"][0]).lstrip("\x00").startswith("There is an important")


# --------------------------------------------------------------------------------------------- windows
def _docs(n, seed=0, max_len=900):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 259, size=int(rng.integers(0, max_len))).astype(np.int32) for _ in range(n)]


def _example_fn(docs):
    def fn(i):
        seq = np.concatenate([[1], docs[i], [2]]).astype(np.int32)
        score = np.ones(len(seq), np.float32)
        score[0] = 0
        return seq, score
    return fn


def _collect(it):
    """Reassemble per-document token streams from an eval iterator using last_doc_index."""
    got, n_batches = {}, 0
    for batch in it:
        n_batches += 1
        for b, doc in enumerate(it.last_doc_index):
            if doc < 0:
                assert batch["loss_mask"][b].sum() == 0 and batch["reset"][b]
                assert (batch["tokens"][b] == 0).all()
                continue
            if batch["reset"][b]:
                assert doc not in got, "document started twice"
                got[doc] = ([], [])
            got[doc][0].append(batch["targets"][b][batch["loss_mask"][b] > 0])
            got[doc][1].append(batch["tokens"][b])
    return {d: np.concatenate(t) for d, (t, _) in got.items()}, n_batches


def test_windows_single_document_exact():
    seq = np.arange(3, 3 + 21, dtype=np.int32)
    score = np.ones(21, np.float32)
    wins = list(iter_example_windows((seq, score), 8, 0))
    assert len(wins) == 3  # 20 targets / 8
    toks = np.concatenate([w[0] for w in wins])
    tgts = np.concatenate([w[1] for w in wins])
    mask = np.concatenate([w[2] for w in wins])
    np.testing.assert_array_equal(toks[:21], seq)
    np.testing.assert_array_equal(tgts[mask > 0], seq[1:])
    assert mask.sum() == 20 and (toks[21:] == 0).all() and (tgts[20:] == 0).all()


def test_windows_eval_every_token_once_and_resets():
    docs = _docs(13)
    it = WindowIterator(len(docs), _example_fn(docs), Windows(seq_len=64, batch_size=3, pad_id=0, train=False))
    got, _ = _collect(it)
    assert sorted(got) == list(range(13))
    for d, toks in got.items():
        np.testing.assert_array_equal(toks, np.concatenate([docs[d], [2]]))
    # reset semantics: row keeps its document until done
    it = WindowIterator(2, _example_fn([np.arange(3, 200), np.arange(3, 50)]),
                        Windows(seq_len=64, batch_size=1, pad_id=0, train=False))
    resets = [bool(b["reset"][0]) for b in it]
    assert resets == [True, False, False, False, True]


def test_windows_text_example_reassembles_corpus_file():
    text = "Stream me window after window. é ∮\n" * 40
    ex = text_example(TOK, text)
    tgts = np.concatenate([t[m > 0] for _, t, m in iter_example_windows(ex, 128, TOK.pad_id)])
    assert TOK.decode(tgts) == text and tgts[-1] == TOK.eos_id


def test_windows_per_host_disjoint_and_covering():
    docs = _docs(11, seed=1)
    seen = []
    for p in range(3):
        it = WindowIterator(len(docs), _example_fn(docs),
                            Windows(seq_len=64, batch_size=2, pad_id=0, train=False, shard=(p, 3)))
        got, _ = _collect(it)
        for d, toks in got.items():
            np.testing.assert_array_equal(toks, np.concatenate([docs[d], [2]]))
        seen.append(set(got))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert seen[0] | seen[1] | seen[2] == set(range(11))


def test_windows_eval_num_batches_pads_and_truncates():
    docs = _docs(3, max_len=50)
    fn = _example_fn(docs)
    batches = list(WindowIterator(3, fn, Windows(seq_len=64, batch_size=2, pad_id=0, train=False, num_batches=5)))
    assert len(batches) == 5 and batches[-1]["loss_mask"].sum() == 0


def test_windows_train_shuffled_seeded_epochs():
    docs = _docs(5, max_len=100)  # every doc fits one window of 128
    def order(seed, n=15):
        it = WindowIterator(5, _example_fn(docs), Windows(seq_len=128, batch_size=1, pad_id=0, train=True, seed=seed))
        out = []
        for _ in range(n):
            b = next(it)
            assert b["reset"][0]
            out.append(int(it.last_doc_index[0]))
        return out, it.epoch
    a, epoch = order(0)
    assert a == order(0)[0] and a != order(1)[0]
    assert epoch == 2 and all(sorted(a[5 * e:5 * e + 5]) == list(range(5)) for e in range(3))
    assert a[:5] != a[5:10] or a[5:10] != a[10:]


@pytest.mark.parametrize("train", [True, False])
def test_windows_state_restore_exact(train):
    docs = _docs(9, seed=2)
    make = lambda: WindowIterator(len(docs), _example_fn(docs),
                                  Windows(seq_len=32, batch_size=3, pad_id=0, train=train, seed=5, shard=(1, 2)))
    it = make()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    it2 = make()
    it2.set_state(state)
    for w in want:
        g = next(it2)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
    bad = dict(state, seq_len=64)
    with pytest.raises(ValueError, match="does not match"):
        make().set_state(bad)


# ------------------------------------------------------------------------------------------ make_iterator
def test_make_iterator_errors(tmp_path):
    with pytest.raises(ValueError, match="valid.*passkey.*text.*pg19.*booksum"):
        make_iterator(_cfg(name="c4"), seq_len=64, batch_size=2, split="train")
    with pytest.raises(ValueError, match="divisible"):
        make_iterator(_cfg(name="passkey"), seq_len=256, batch_size=3, split="train", shard=(0, 2))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_iterator(_cfg(name="text", data_dir=str(tmp_path / "nowhere")), seq_len=64, batch_size=2, split="train")
    with pytest.raises(FileNotFoundError, match="build-pg19"):
        make_iterator(_cfg(name="pg19", data_dir=str(tmp_path)), seq_len=64, batch_size=2, split="train")
    with pytest.raises(ValueError, match="not found"):
        make_iterator(_cfg(name="passkey", tokenizer=str(tmp_path / "x.model")), seq_len=64, batch_size=2,
                      split="train")


def test_unknown_data_config_key_is_an_error():
    import ml_collections

    from infini_jax.data import make_iterator

    cfg = ml_collections.ConfigDict(dict(name="passkey", tokenizer="byte", seed=0, passkey_digit=5))
    with pytest.raises(ValueError, match="passkey_digit"):
        make_iterator(cfg, seq_len=512, batch_size=2, split="train")


def test_switching_source_keeps_other_sources_keys(tmp_path):
    """--config.data.name=text on a passkey config: the passkey_* keys are tolerated, the text is read."""
    import ml_collections

    from infini_jax.data import make_iterator

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("hello world " * 40, encoding="utf-8")
    cfg = ml_collections.ConfigDict(dict(name="text", tokenizer="byte", seed=0, data_dir=str(tmp_path),
                                         passkey_digits=5, passkey_loss_on_all=True))
    batch = next(make_iterator(cfg, seq_len=64, batch_size=2, split="train"))
    assert batch["tokens"].shape == (2, 64) and batch["loss_mask"].sum() > 0


@needs_corpus
def test_prefetched_training_iterator_is_the_same_stream_and_resumes_exactly():
    """data.prefetch runs the pipeline on Grain's thread: same batches as on the training thread, and the
    saved state is that of the last batch handed out (not the last one prepared), so a resume is exact."""
    from infini_jax.data import make_iterator

    d = dict(name="text", data_dir=str(CORPUS / "pg19"), tokenizer="byte")
    make = lambda prefetch: make_iterator(dict(d, prefetch=prefetch), seq_len=256, batch_size=4,  # noqa: E731
                                          split="train")
    plain, ahead = make(0), make(2)
    assert type(ahead).__name__ == "ThreadPrefetchDatasetIterator"
    for _ in range(5):
        a, b = next(plain), next(ahead)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    state = json.loads(json.dumps(ahead.get_state()))
    assert state == plain.get_state() and state["step"] == 5
    want = [next(ahead) for _ in range(3)]
    resumed = make(2)
    resumed.set_state(state)
    for w in want:
        g = next(resumed)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
    for it in (ahead, resumed):
        it.close()
