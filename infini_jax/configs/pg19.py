"""The paper's long-context language model on PG19 (Section 4.1, Table 2; follows Memorizing Transformers).

12 layers, 8 heads × 128 (d_model = 8 × 128 = 1024), FFN 4096, segment N = 2048, input 32,768 tokens
(16 segments), Adafactor lr 0.01 (1000 linear warm-up steps, then cosine decay), batch 64, a 32K
SentencePiece vocabulary. The paper does not give the step count, the FFN kind or the positions; chosen here:
a plain GeLU FFN (two matrices, as in the T5-style decoder Memorizing Transformers used), tied embeddings,
RoPE on the local path, bfloat16 compute with float32 parameters, remat per block, 100K steps.

    infini-train --config pg19:rule=delta --config.data.data_dir=$TFDS_DIR \
        --config.data.tokenizer=/path/to/spm32k.model --workdir gs://bucket/pg19_delta
    infini-train --config pg19:attention=xl ...      # the Transformer-XL baseline

Args (comma-separated key=value after the colon):
    rule=linear|delta, attention=infini|xl|local|full, mode=scan|parallel.
data.tokenizer must be set to the 32K SentencePiece model (`infini-tokenizer train ...`).
Memory per sequence (Table 1): num_layers × num_heads × head_dim × (head_dim + 1) = 12·8·128·129 ≈ 1.6M.
"""

from infini_jax.config import parse_arg
from infini_jax.configs import base

ARGS = dict(rule=("linear", "delta"), attention=("infini", "xl", "local", "full"), mode=("scan", "parallel"))
NUM_HEADS, HEAD_DIM = 8, 128


def get_config(arg=None):
    arg = parse_arg(arg, ARGS)
    config = base.get_config()
    config.model.update(
        vocab_size=32000, d_model=NUM_HEADS * HEAD_DIM, num_layers=12, num_heads=NUM_HEADS, head_dim=HEAD_DIM,
        d_ff=4096, segment_len=2048, n_segments=16, attention=arg.attention, rule=arg.rule, mode=arg.mode,
        mlp="plain", activation="gelu", dtype="bfloat16",
        scan_layers=True,  # stacked layers: one compiled block, FSDP gathers a layer at a time
    )
    config.data.update(name="pg19", tokenizer="")
    config.train.update(steps=100_000, batch_size=64, log_every=100, eval_every=5000, eval_batches=32,
                        ckpt_every=1000, keep_checkpoints=3)
    config.optim.update(
        name="adafactor", lr=0.01, gate_lr=0.01, warmup_steps=1000, min_lr_ratio=0.0,
        b1=0.0,  # no first moment
        adafactor_decay_rate=0.8,  # second-moment decay t^-0.8 (Adafactor default; b2 is AdamW-only)
    )
    return config
