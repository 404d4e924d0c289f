"""A small byte-level LM on a folder of books (experiments/books_lm.py): infini vs its baselines on a CPU.

    python train.py --config configs/books.py:attention=infini,rule=delta \
        --config.data.data_dir=../shared/corpus/pg19 --workdir runs/books/infini_delta

Every attention kind gets the same model (parameters differ only by the infini gates, one scalar per head),
the same data order, tokens and steps. Inputs are 8 segments of 64 bytes; the memory starts empty in every
training window (see the README's note on training windows). 500 steps × 16 × 512 bytes = 4.1M bytes, under one
epoch of the shared corpus's 5.7 MB of training books.
"""

import ml_collections

from infini_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, dict(attention=("infini", "xl", "local", "full"), rule=("linear", "delta"),
                              mode=("scan", "parallel")))
    config = ml_collections.ConfigDict()
    config.model = dict(
        vocab_size=259, d_model=64, num_layers=3, num_heads=4, num_kv_heads=None, head_dim=16, d_ff=256,
        segment_len=64, n_segments=8, attention=arg.attention, rule=arg.rule, mode=arg.mode, mlp="gated",
        activation="silu", tie_embeddings=True, embed_scale=False, rope_base=10000.0, gate_init=0.0,
        norm_eps=1e-6, dtype="float32", param_dtype="float32", remat=False, init_std=0.02, scan_layers=False,
    )
    config.data = dict(name="text", tokenizer="byte", seed=0, data_dir="../shared/corpus/pg19")
    config.train = dict(steps=500, batch_size=16, seed=0, log_every=50, eval_every=0, eval_batches=4,
                        ckpt_every=250, keep_checkpoints=1, init_from="")
    config.optim = dict(name="adamw", lr=3e-3, gate_lr=1e-2, warmup_steps=50, schedule="cosine",
                        min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, grad_accum=1, b1=0.9, b2=0.95)
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.lock()
    return config
