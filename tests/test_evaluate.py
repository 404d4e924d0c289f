"""infini_jax/evals: streamed perplexity over every segment, knock-out, passkey streaming, footprint."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infini_jax import evals as ev
from infini_jax.data.tokenizers import ByteTokenizer
from infini_jax.data.windows import WindowIterator, Windows
from infini_jax.model import InfiniTransformer, ModelConfig

SEG = 8


@nnx.jit
def fwd(model, tokens):
    return model(tokens)


def tiny(attention="infini", seed=0, gates=True, **kw) -> InfiniTransformer:
    cfg = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64, segment_len=SEG,
                      n_segments=2, attention=attention, remat=False, **kw)
    model = InfiniTransformer(cfg, rngs=nnx.Rngs(seed))
    if attention == "infini" and gates:  # spread the gates so memory matters
        for i, block in enumerate(model.blocks):
            block.attn.gate_logit[...] = jnp.asarray([1.5, -0.5]) + i
    return model


def make_docs(seed=0, lengths=(37, 5, 50, 17)):
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        seq = np.concatenate([[1], rng.integers(3, 259, n - 2), [2]]).astype(np.int32)
        score = np.ones(n, np.float32)
        score[0] = 0
        docs.append((seq, score))
    return docs


def reference_nll(model, docs):
    """One long forward pass per document (no streaming): total NLL, tokens, per-segment-position sums and
    per-offset-within-a-segment sums [SEG, 2]."""
    tot, count, curve, offset = 0.0, 0.0, {}, np.zeros((SEG, 2))
    longest = -(-max(len(s) - 1 for s, _ in docs) // SEG) * SEG  # one shape: one compile
    for seq, score in docs:
        n = len(seq) - 1
        padded = -(-n // SEG) * SEG
        toks = np.zeros(longest, np.int32)
        toks[:n] = seq[:-1]
        logits, _ = fwd(model, jnp.asarray(toks[None]))
        logp = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
        nll = -logp[np.arange(n), seq[1:]] * score[1:]
        tot += nll.sum()
        count += score[1:].sum()
        for s in range(padded // SEG):
            c = curve.setdefault(s, [0.0, 0.0])
            c[0] += nll[s * SEG:(s + 1) * SEG].sum()
            c[1] += score[1:][s * SEG:(s + 1) * SEG].sum()
        np.add.at(offset, (np.arange(n) % SEG, 0), nll)
        np.add.at(offset, (np.arange(n) % SEG, 1), score[1:])
    return tot, count, curve, offset


@pytest.mark.parametrize("attention", ["infini", "xl"])
def test_streaming_windows_equal_one_long_pass(attention):
    model = tiny(attention)
    docs = make_docs()
    it = WindowIterator(len(docs), lambda i: docs[i], Windows(seq_len=2 * SEG, batch_size=2, pad_id=0, train=False))
    res = ev.evaluate_perplexity(model, it, tokenizer=ByteTokenizer())
    tot, count, curve, offset = reference_nll(model, docs)
    assert res["tokens"] == count == sum(len(s) - 1 for s, _ in docs)
    np.testing.assert_allclose(res["loss"], tot / count, rtol=2e-5)
    assert res["documents"] == len(docs)
    got = dict(zip(res["segment_curve"]["segment"], res["segment_curve"]["loss"]))
    for s, (nll, c) in curve.items():
        if c:
            np.testing.assert_allclose(got[s], nll / c, rtol=2e-5)
    assert res["offset_curve"]["tokens"] == offset[:, 1].astype(int).tolist()
    np.testing.assert_allclose(res["offset_curve"]["loss"], offset[:, 0] / offset[:, 1], rtol=2e-5)
    # bytes: every target but eos is a byte token
    assert res["bytes"] == count - len(docs)
    np.testing.assert_allclose(res["bits_per_byte"], tot / math.log(2) / (count - len(docs)), rtol=2e-5)


def test_memory_is_carried_across_windows():
    """Resetting memory every window (no carry) must change the loss of an infini model: the carry is real."""
    model = tiny()
    docs = make_docs(lengths=(60,))
    batches = list(WindowIterator(1, lambda i: docs[i], Windows(seq_len=2 * SEG, batch_size=1, pad_id=0, train=False)))
    carried = ev.evaluate_perplexity(model, batches)["loss"]
    no_carry = ev.evaluate_perplexity(model, [dict(b, reset=np.ones(1, bool)) for b in batches])["loss"]
    assert abs(carried - no_carry) > 1e-4


def test_padding_does_not_count():
    model = tiny()
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 259, (2, 2 * SEG)).astype(np.int32)
    targets = rng.integers(3, 259, (2, 2 * SEG)).astype(np.int32)
    mask = np.ones((2, 2 * SEG), np.float32)
    mask[1, 5:] = 0
    batch = dict(tokens=tokens, targets=targets, loss_mask=mask, reset=np.ones(2, bool))
    base = ev.evaluate_perplexity(model, [batch])
    noisy = dict(batch, targets=np.where(mask > 0, targets, rng.integers(3, 259, targets.shape)).astype(np.int32))
    noisy["tokens"] = np.where(np.arange(2 * SEG) >= 6, rng.integers(3, 259, tokens.shape), tokens).astype(np.int32)
    noisy["tokens"][0] = tokens[0]
    other = ev.evaluate_perplexity(model, [noisy])
    assert base["tokens"] == other["tokens"] == 2 * SEG + 5
    np.testing.assert_allclose(base["loss"], other["loss"], rtol=1e-6)


def test_hand_computed_nll():
    """All-zero weights give zero logits: NLL = ln(vocab) per scored token, bpb = log2(vocab)."""
    model = tiny()
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state))
    tokens = np.full((1, 2 * SEG), 70, np.int32)
    targets = np.full((1, 2 * SEG), 71, np.int32)
    mask = np.zeros((1, 2 * SEG), np.float32)
    mask[0, :3] = 1
    res = ev.evaluate_perplexity(model, [dict(tokens=tokens, targets=targets, loss_mask=mask,
                                              reset=np.ones(1, bool))], tokenizer=ByteTokenizer())
    assert res["tokens"] == 3
    np.testing.assert_allclose(res["loss"], math.log(259), rtol=1e-6)
    np.testing.assert_allclose(res["perplexity"], 259, rtol=1e-5)
    np.testing.assert_allclose(res["bits_per_byte"], math.log2(259), rtol=1e-6)


def test_knockout_equals_local_attention():
    model = tiny()
    ko = ev.knockout_model(model)
    local = tiny("local")
    src = nnx.to_flat_state(nnx.state(model, nnx.Param))
    nnx.update(local, nnx.from_flat_state([(p, v) for p, v in src if p[-1] != "gate_logit"]))
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 259, (2, 4 * SEG)), jnp.int32)
    ko_logits, _ = fwd(ko, tokens)
    local_logits, _ = fwd(local, tokens)
    full_logits, _ = fwd(model, tokens)
    np.testing.assert_allclose(np.asarray(ko_logits), np.asarray(local_logits), atol=2e-5)
    assert np.abs(np.asarray(full_logits) - np.asarray(local_logits))[:, SEG:].max() > 1e-3  # memory mattered
    np.testing.assert_allclose(np.asarray(full_logits)[:, :SEG], np.asarray(local_logits)[:, :SEG], atol=2e-5)
    assert float(model.blocks[0].attn.gate_logit[...][0]) == 1.5  # original untouched
    with pytest.raises(ValueError, match="knock-out"):
        ev.knockout_model(tiny("xl"))


def test_passkey_streaming_matches_direct_forward():
    from infini_jax.data.passkey import make_passkey_example

    model, tok = tiny(), ByteTokenizer()
    length, depths = 400, [0.0, 1.0]
    a = ev.passkey_length(model, tok, length, depths, ev.PasskeyOptions(chunk_segments=1, seed=3))
    b = ev.passkey_length(model, tok, length, depths, ev.PasskeyOptions(chunk_segments=7, seed=3))
    for ca, cb in zip(a, b):
        assert ca["token_accuracy"] == cb["token_accuracy"]
        np.testing.assert_allclose(ca["answer_nll"], cb["answer_nll"], rtol=1e-4)
    # direct: one forward over the whole prompt
    ex = make_passkey_example(tok, length, 1.0, passkey=a[1]["passkeys"][0])
    n = len(ex.tokens) - 1
    toks = np.zeros(-(-n // SEG) * SEG, np.int32)
    toks[:n] = ex.tokens[:-1]
    logits, _ = fwd(model, jnp.asarray(toks[None]))
    pos = np.arange(ex.answer_start - 1, ex.answer_start - 1 + len(ex.answer_ids))
    pred = np.asarray(jnp.argmax(logits[0], -1))[pos]
    assert a[1]["token_accuracy"] == pytest.approx(float((pred == ex.answer_ids).mean()))
    logp = np.asarray(jax.nn.log_softmax(logits[0]))[pos, ex.answer_ids]
    np.testing.assert_allclose(a[1]["answer_nll"], -logp.mean(), rtol=1e-4)


def test_passkey_sweep_shape():
    res = ev.passkey_sweep(tiny(), ByteTokenizer(), [300, 500], [0.0, 0.5, 1.0], trials=2)
    assert np.asarray(res["accuracy"]).shape == (3, 2)
    assert len(res["cells"]) == 6 and all(len(c["passkeys"]) == 2 for c in res["cells"])


def test_footprint_matches_paper_table1():
    cfg = ModelConfig(num_layers=12, num_heads=8, head_dim=128, segment_len=2048, d_model=1024)
    fp = ev.memory_footprint(cfg, [32768])
    assert fp["rows"]["infini"]["numbers"] == 12 * 8 * 128 * 129  # ≈ 1.6M
    assert fp["rows"]["xl"]["numbers"] == (128 + 128) * 8 * 2048 * 12  # ≈ 50M
    assert fp["rows"]["full@32768"]["numbers"] == 256 * 8 * 32768 * 12
    assert round(fp["rows"]["xl"]["x_infini"], 1) == 31.8
    assert "infini" in ev.format_footprint(fp)


# ---- loading and the CLI ------------------------------------------------------------------------------------

def _tiny_config(**model_overrides):
    from infini_jax.config import load_config

    config = load_config("tiny")
    with config.unlocked():
        for k, v in model_overrides.items():
            config.model[k] = v
    return config


def test_load_model_roundtrip_and_errors(tmp_path):
    from types import SimpleNamespace

    from infini_jax.checkpoint import Checkpointer
    from infini_jax.config import model_config

    config = _tiny_config()
    with pytest.raises(ValueError, match="--workdir"):
        ev.load_model(config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_model(config, workdir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ev.load_model(config, workdir=str(tmp_path / "empty"))

    model = InfiniTransformer(model_config(config), rngs=nnx.Rngs(5))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = SimpleNamespace(params=params, opt_state={"m": np.zeros(2, np.float32)}, step=np.int32(7),
                            rng=np.zeros(2, np.uint32))
    ckpt = Checkpointer(tmp_path / "w", async_save=False)
    ckpt.save(7, state, None, config)
    ckpt.close()
    loaded, info = ev.load_model(config, workdir=str(tmp_path / "w"))
    assert info["step"] == 7
    tokens = jnp.asarray(np.arange(3, 3 + 128).reshape(1, 128), jnp.int32)
    np.testing.assert_allclose(np.asarray(loaded(tokens)[0]), np.asarray(model(tokens)[0]), atol=1e-6)
    with pytest.raises(ValueError, match="different model"):
        ev.load_model(_tiny_config(rule="delta"), workdir=str(tmp_path / "w"))


def _run_cli(*args, timeout=240):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, str(repo / "eval.py"), "--config", "tiny",
                           "--noprogress", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=repo)


def test_cli_smoke_and_bad_input(tmp_path):
    out = tmp_path / "out"
    r = _run_cli("--init_random", "--out_dir", str(out), "--tasks", "footprint,gates,passkey",
                 "--passkey_lengths", "1K", "--passkey_depths", "0,1")
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    res = json.loads((out / "results.json").read_text())
    assert np.asarray(res["passkey"]["accuracy"]).shape == (2, 1) and len(res["gates"]) == 2
    assert (out / "passkey.png").exists() and (out / "gates.png").exists()
    assert "Memory footprint" in r.stdout
    bad = _run_cli("--init_random", "--out_dir", str(out), "--config.model.vocab_size=300")
    assert bad.returncode == 2 and "vocab" in bad.stderr  # before any model is built
