"""Passkey evidence plumbing: right padding (training = evaluation layout), digit accuracy, memory-mass
augmentation marks, and the book-text haystack."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infini_jax import evals as ev
from infini_jax.evals import passkey_retrieval
from infini_jax.data import ByteTokenizer, Haystack, PasskeyIterator, PasskeyStream, make_passkey_example
from infini_jax.data.passkey import FILLER, INTRO, KEY_TEMPLATE, QUESTION
from infini_jax.model import InfiniTransformer, ModelConfig

TOK = ByteTokenizer()
CFG = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64, segment_len=64,
                  n_segments=8)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_same_example_padded_differently_gives_the_same_answer_logits(rule):
    """Right padding: nothing precedes the prompt, so the amount of padding cannot change the answer."""
    model = InfiniTransformer(ModelConfig(**{**CFG.__dict__, "rule": rule}), rngs=nnx.Rngs(0))
    batch = next(PasskeyIterator(TOK, seq_len=512, batch_size=2, seed=5, min_len=300))
    rows = []
    for b in range(2):  # the two rows hold examples of different lengths: different amounts of padding
        scored = np.flatnonzero(batch["loss_mask"][b])
        n = scored[-1] + 1
        for total in (512, 640):  # and each again with more padding
            toks = np.full((1, total), TOK.pad_id, np.int32)
            toks[0, :n] = batch["tokens"][b][:n]
            logits, _ = model(jnp.asarray(toks))
            rows.append((b, np.asarray(logits[0, scored])))
    assert rows[0][1].shape == rows[2][1].shape
    np.testing.assert_allclose(rows[0][1], rows[1][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows[2][1], rows[3][1], rtol=1e-5, atol=1e-5)
    assert int(batch["loss_mask"][0].sum()) == int(batch["loss_mask"][1].sum()) == 6
    assert np.flatnonzero(batch["loss_mask"][0])[0] != np.flatnonzero(batch["loss_mask"][1])[0]


def test_digit_accuracy_scores_only_the_digits(monkeypatch):
    """An oracle that gets every digit right and the leading space wrong: digit accuracy 1, token 5/6."""
    model = InfiniTransformer(CFG, rngs=nnx.Rngs(0))

    def oracle(steps, params, memory, batch):
        targets_bl, weight_bl = batch["targets"], batch["loss_mask"]
        pred = jnp.where(targets_bl == TOK.encode(" ")[0], TOK.encode("x")[0], targets_bl)  # space -> wrong
        return {"nll": jnp.zeros(targets_bl.shape), "correct": (pred == targets_bl) * weight_bl}, memory

    monkeypatch.setattr(passkey_retrieval, "answer_losses", oracle)
    sweep = ev.passkey_sweep(model, TOK, [600], [0.0, 1.0], trials=2)
    for cell in sweep["cells"]:
        assert cell["digit_accuracy"] == 1.0
        assert cell["token_accuracy"] == pytest.approx(5 / 6)
        assert cell["exact_match"] == 0.0
        assert {"answer_nll", "passkeys", "seconds"} <= set(cell)
    assert sweep["digit_accuracy"] == [[1.0], [1.0]]
    assert "digit accuracy" in ev.format_passkey(sweep)


def test_mass_augmentation_scales_every_segment_but_the_key_lines():
    it = PasskeyIterator(TOK, seq_len=1024, batch_size=64, seed=1, min_len=400, segment_len=64, mass_prob=0.5,
                         mass_max=128.0)
    batch = next(it)
    scale = batch["write_scale"]
    assert scale.shape == (64, 16)
    augmented = (scale != 1).any(1)
    assert 16 < augmented.sum() < 48  # about half the rows
    for b in range(64):
        text = TOK.decode(batch["tokens"][b])
        key = text.index("The pass key is ") + 1  # +1: the bos byte is not text
        first, last = key // 64, (key + len(KEY_TEMPLATE.format(key="12345")) - 1) // 64
        assert (scale[b, first:last + 1] == 1).all()
        if augmented[b]:
            others = np.delete(scale[b], range(first, last + 1))
            assert np.all(others == others[0]) and 1 <= others[0] <= 128
    assert "write_scale" not in next(PasskeyIterator(TOK, seq_len=1024, batch_size=2, seed=1))
    with pytest.raises(ValueError, match="segment_len"):
        PasskeyIterator(TOK, seq_len=1024, batch_size=2, mass_prob=0.5)


def test_loss_on_key_scores_the_key_lines_second_copy_and_the_answer_only():
    it = PasskeyIterator(TOK, seq_len=320, batch_size=16, seed=3, min_len=104, intro=0.5, loss_on_key=True)
    batch = next(it)
    for b in range(16):
        text = TOK.decode(batch["tokens"][b])
        key = text[text.index("The pass key is ") + 16:][:5]
        scored = TOK.decode(batch["targets"][b][batch["loss_mask"][b] > 0])
        assert scored == f" {key} {key}"  # the key line's second copy, then the answer
        second = text.index(f"Remember it. {key}") + len("Remember it.") + 1  # +1: bos
        assert (batch["loss_mask"][b][second - 1:second + 5] == 1).all()  # targets of positions second..second+5
    plain = next(PasskeyIterator(TOK, seq_len=320, batch_size=16, seed=3, min_len=104, intro=0.5))
    assert (plain["loss_mask"].sum(1) == 6).all()


def test_shift_puts_the_key_line_at_every_offset_and_keeps_the_prompt_words():
    def key_offsets(it):
        out = set()
        for _ in range(4):
            batch = next(it)
            for b in range(64):
                text = TOK.decode(batch["tokens"][b])
                out.add((text.index("The pass key is") + 1) % 32)
                # before the key line: the intro (or nothing), then whole filler words, single spaces
                head = text[:text.index("The pass key is")].removeprefix(INTRO)
                assert "  " not in text  # (without the intro the prompt starts with " ", as without the shift)
                assert set(head.split()) <= set(FILLER.split())
                assert text.endswith(QUESTION + " " + text[text.index("The pass key is ") + 16:][:5])
        return out

    kw = dict(seq_len=320, batch_size=64, seed=0, min_len=104, intro=0.5, segment_len=32)
    assert len(key_offsets(PasskeyIterator(TOK, **kw))) <= 4  # whole units: a handful of offsets
    assert len(key_offsets(PasskeyIterator(TOK, shift=1.0, **kw))) >= 24
    batch = next(PasskeyIterator(TOK, shift=1.0, loss_on_key=True, mass_prob=1.0, **kw))
    assert (batch["loss_mask"].sum(1) == 12).all()
    assert len(key_offsets(PasskeyIterator(TOK, shift=0.5, shift_after=1, **kw))) >= 20  # half the rows of 1..3
    assert next(PasskeyIterator(TOK, **kw))["tokens"].tolist() == \
        next(PasskeyIterator(TOK, shift=1.0, shift_after=1, **kw))["tokens"].tolist()  # batch 0: not yet shifted
    with pytest.raises(ValueError, match="passkey_shift"):
        PasskeyIterator(TOK, shift=0.5, haystack=object(), **kw)
    for b in range(64):  # the augmentation still spares the key line's segments after the shift
        key = TOK.decode(batch["tokens"][b]).index("The pass key is ") + 1
        first, last = key // 32, (key + len(KEY_TEMPLATE.format(key="12345")) - 1) // 32
        assert (batch["write_scale"][b, first:last + 1] == 1).all()


def test_book_haystack_hides_the_key_line_in_prose(tmp_path):
    book = " ".join(f"Word{i} went to the market on day {i % 7}." for i in range(400))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "book.txt").write_text(book)
    hay = Haystack(TOK, tmp_path)
    for depth in (0.0, 0.5, 1.0):
        ex = make_passkey_example(TOK, 2000, depth, seed=3, haystack=hay)
        text = TOK.decode(ex.tokens)
        assert len(ex.tokens) == 2000
        assert text.endswith(QUESTION + " " + ex.passkey)
        key_line = KEY_TEMPLATE.format(key=ex.passkey)
        assert TOK.decode(ex.tokens[ex.key_start:ex.key_start + ex.key_len]).strip() == key_line
        before = TOK.decode(ex.tokens[:ex.key_start])
        assert before[-1].isspace() and "market" in text and "grass" not in text
        prose = len(ex.tokens) - ex.key_len - len(TOK.encode(QUESTION)) - 200
        assert abs(ex.key_start - 150 - depth * prose) < 60  # at the word start nearest the depth
    stream = PasskeyStream(TOK, 2000, 0.5, seed=3, haystack=hay, chunk_tokens=77)
    np.testing.assert_array_equal(np.concatenate(list(stream)),
                                  make_passkey_example(TOK, 2000, 0.5, seed=3, haystack=hay).tokens)
    with pytest.raises(ValueError, match="no .txt files"):
        Haystack(TOK, tmp_path / "a" / "nothing")


def test_distractors_hide_numbers_in_the_prose_away_from_the_key_line(tmp_path):
    """data.passkey_distractors: random numbers before words of the prose (never touching the key line, the
    intro or the question), rows still within seq_len + 1, the key line's segments still spared by the mass
    augmentation and its loss positions moved with it; training only, and refused without prose."""
    import re

    from infini_jax.configs.tiny import get_config
    from infini_jax.data import make_iterator

    (tmp_path / "book.txt").write_text(" ".join(f"Anna went to the market on a {w} day." for w in
                                                ["cold", "warm", "grey", "long"] * 300))
    kw = dict(seq_len=320, batch_size=64, seed=0, min_len=104, intro=0.5, segment_len=32,
              haystack=Haystack(TOK, tmp_path), mass_prob=1.0, loss_on_key=True)
    batch, plain = next(PasskeyIterator(TOK, distractors=2.0, **kw)), next(PasskeyIterator(TOK, **kw))
    counts = []
    for b in range(64):
        text = TOK.decode(batch["tokens"][b][batch["tokens"][b] != TOK.pad_id])
        key = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", text)
        assert key and text.endswith(QUESTION + " " + key.group(1))
        others = re.findall(r"\d+", text.replace(key.group(0), "KEY").removesuffix(key.group(1)))
        counts.append(len(others))
        assert all(1 <= len(n) <= 6 for n in others)
        assert all(re.search(rf"(^|\S) {n}\s\S", text) for n in others)  # a word of its own
        assert re.search(r"\d KEY|KEY \d", text.replace(key.group(0), "KEY")) is None  # a word away from the key
        start = text.index(key.group(0)) + 1  # + [bos], which decodes to nothing
        first, last = start // 32, (start + len(key.group(0)) - 1) // 32
        assert (batch["write_scale"][b, first:last + 1] == 1).all()
        scored = TOK.decode(batch["targets"][b][batch["loss_mask"][b] > 0])
        assert scored == f" {key.group(1)} {key.group(1)}"  # the key's second copy and the answer, moved along
    counts = np.array(counts)  # a Poisson count of 2 on average in the rows with prose (a third have none)
    assert counts.max() >= 4 and 1.5 <= counts[counts > 0].mean() <= 3.5 and (counts > 0).sum() >= 24
    assert all(len(re.findall(r"\d+", TOK.decode(r))) == 3 for r in plain["tokens"])  # key ×2 and the answer
    assert next(PasskeyIterator(TOK, distractors=1.0, distractors_after=1, **kw))["tokens"].tolist() == \
        plain["tokens"].tolist()  # batch 0: not yet
    with pytest.raises(ValueError, match="passkey_distractors"):
        PasskeyIterator(TOK, distractors=0.5, **{**kw, "haystack": None})
    config = get_config()
    config.data.update(passkey_haystack=str(tmp_path), passkey_distractors=1.0, passkey_shift=0.0)
    evaluation = next(make_iterator(config.data, seq_len=320, batch_size=8, split="validation", train=False))
    assert all(len(re.findall(r"\d+", TOK.decode(r))) == 3 for r in evaluation["tokens"])  # key ×2, answer


def test_passkey_sweep_on_a_haystack(shared_dir):
    model = InfiniTransformer(CFG, rngs=nnx.Rngs(0))
    hay = Haystack(TOK, shared_dir / "corpus" / "pg19" / "test")
    sweep = ev.passkey_sweep(model, TOK, [1024, 4096], [0.0, 1.0], trials=2, haystack=hay)
    assert sweep["haystack"].endswith("test") and len(sweep["digit_accuracy"]) == 2
    assert all(c["tokens"] in (1024, 4096) for c in sweep["cells"])


def test_passkey_report_from_config_evals():
    """config.evals → the table train.py prints at the end: lengths are multiples of the training length."""
    import ml_collections

    from infini_jax.step import validate_config

    cfg = ModelConfig(**{**CFG.__dict__, "n_segments": 5})  # 320 tokens
    model = InfiniTransformer(cfg, rngs=nnx.Rngs(0))
    lines = []
    out = ev.passkey_report(model, TOK, dict(x=(1, 2), depths=(0.0, 1.0), trials=2),
                            log=lines.append)
    assert out["passkey"]["lengths"] == [320, 640] and out["passkey_knockout"]["lengths"] == [320, 640]
    assert len(out["passkey"]["digit_accuracy"]) == 2 and "knocked out" in lines[1]
    assert ev.passkey_report(model, TOK, dict(x=())) == {}
    from infini_jax.config import load_config

    config = load_config("tiny")
    validate_config(config)
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.evals.passkey_trails = 3
    with pytest.raises(ValueError, match="unknown config.evals keys"):
        validate_config(bad)
