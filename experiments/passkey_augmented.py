"""Does memory-mass augmentation imitate a long haystack? A trained passkey model (experiments/passkey_1m.py)
on short prompts whose key-less segments are written c times (the training augmentation), next to what it
scored on real prompts of the same mass; and, on random keys, how far each way of writing c repeats is from the
memory an interleaved haystack leaves.

    python experiments/passkey_augmented.py --workdir runs/passkey_1m_delta6000/delta --rule delta --mass_passes 1
    python experiments/passkey_augmented.py --workdir runs/passkey_books/linear --rule linear \
        --haystack ../shared/corpus/pg19/test                       # a model trained on book prose
    python experiments/passkey_augmented.py --fidelity_only

Table 1 (a trained model): digit accuracy (%) of prompts of --length tokens (the training rows' size; without
the intro, so that two filler units fit and the depth moves the key line), each segment without a token of
the key line written with scale c (batch["write_scale"] in training), so that the
memory holds the mass of c × --length tokens, at the depths given, --trials passkeys each. A model that scores
here but not on real prompts of that length has learnt the augmentation, not the haystack.

Table 2 (no model; the math of attention.py): random keys/values, S segments written c times three ways, then
compared by what random queries read (relative L2 difference) against the interleaved haystack (the S segments
repeated c times in order, the way a haystack repeats its filler): one write of scale c per segment (today's
augmentation), and model.mass_passes = P interleaved passes of c / P (mass.interleaved_passes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def augmented_accuracy(a) -> None:
    import jax
    import jax.numpy as jnp

    from infini_jax import evals as ev
    from infini_jax.configs.tiny import get_config
    from infini_jax.data import load_tokenizer
    from infini_jax.data.passkey import make_passkey_example
    from infini_jax.model import logits_from_hidden

    config = get_config(f"rule={a.rule}")
    if a.mass_passes is not None:  # how the augmented rows are written (the tiny config's by default)
        config.model.mass_passes = a.mass_passes
    model, info = ev.load_model(config, workdir=a.workdir)
    tok, n = load_tokenizer("byte"), model.cfg.segment_len
    haystack = None
    if a.haystack:
        from infini_jax.data import Haystack

        haystack = Haystack(tok, a.haystack)
    forward = jax.jit(lambda t, s: logits_from_hidden(model.hidden(t, None, None, s)[0], model.output_embedding(),
                                                      model.cfg.dtype))
    depths = [float(x) for x in a.depths.split(",")]
    print(f"{a.workdir} (step {info['step']}), prompts of {a.length} tokens"
          f"{' of prose from ' + a.haystack if a.haystack else ''}, {a.trials} passkeys per cell: "
          f"digit accuracy (%) with the key-less segments written c times (mass_passes={model.cfg.mass_passes})")
    print("| c | memory mass (tokens) | " + " | ".join(f"{d:.0%}" for d in depths) + " |")
    print("|---:|---:|" + "---:|" * len(depths))
    for c in [int(x) for x in a.scales.split(",")]:
        cells = []
        for d in depths:
            exs = [make_passkey_example(tok, a.length, d, seed=1000 + t, intro=False, haystack=haystack)
                   for t in range(a.trials)]
            width = -(-max(len(e.tokens) for e in exs) // n) * n
            tokens = np.full((len(exs), width), tok.pad_id, np.int32)
            scale = np.full((len(exs), width // n), float(c), np.float32)
            for i, e in enumerate(exs):
                tokens[i, :len(e.tokens)] = e.tokens
                scale[i, e.key_start // n:(e.key_start + e.key_len - 1) // n + 1] = 1.0  # as the training data
            predicted = np.asarray(forward(jnp.asarray(tokens), jnp.asarray(scale))).argmax(-1)
            hits = [predicted[i, e.answer_start - 1 + j] == t for i, e in enumerate(exs)
                    for j, t in enumerate(e.answer_ids) if tok.decode([int(t)]).strip().isdigit()]
            cells.append(100.0 * np.mean(hits))
        print(f"| {c:,} | {c * a.length:,} | " + " | ".join(f"{x:.0f}" for x in cells) + " |", flush=True)


def fidelity() -> None:
    import jax
    import jax.numpy as jnp

    from infini_jax import attention as A

    b, s, n, h, d = 4, 8, 32, 4, 16
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(x, (b, s * n, h, d)) for x in ks[:3])
    queries = jax.random.normal(ks[3], (b, 256, h, d))
    beta = jnp.zeros((h,))

    def read(memory):
        return A.retrieve(memory, queries)  # eq. 7

    print(f"\nrandom keys: {s} segments of {n} tokens, {h} heads x {d}; relative difference of what 256 random queries "
          "read, against the interleaved haystack")
    print("| c | one write of scale c | " + " | ".join(f"{p} passes" for p in (2, 4, 8)) + " |")
    print("|---:|---:|---:|---:|---:|")
    for c in (8, 64, 512):
        ref = read(A.infini_attention_sequence(*(jnp.concatenate([x] * c, 1) for x in (q, k, v)), beta,
                                               A.SequenceOptions(n, "delta"))[1])
        row = []
        for p in (1, 2, 4, 8):
            got = read(A.infini_attention_sequence(q, k, v, beta, A.SequenceOptions(n, "delta", mass_passes=p),
                                                   write_scale_bs=jnp.full((b, s), float(c)))[1])
            row.append(float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)))
        print(f"| {c} | " + " | ".join(f"{x:.3f}" for x in row) + " |", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", help="a passkey_1m.py model: OUT/<rule>")
    p.add_argument("--rule", default="delta")
    p.add_argument("--length", type=int, default=320)
    p.add_argument("--scales", default="1,16,256,3277,65536")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--haystack", default="", help="hide the key line in the prose of this folder's .txt books")
    p.add_argument("--mass_passes", type=int, default=None, help="model.mass_passes (default: the tiny config's)")
    p.add_argument("--fidelity_only", action="store_true")
    a = p.parse_args()
    if not a.fidelity_only and not a.workdir:
        p.error("--workdir (a trained passkey_1m.py model) is needed, or --fidelity_only")
    from infini_jax.sharding import choose_platform

    choose_platform()  # no libtpu start-up noise on a CPU host
    if not a.fidelity_only:
        augmented_accuracy(a)
    fidelity()


if __name__ == "__main__":
    main()
