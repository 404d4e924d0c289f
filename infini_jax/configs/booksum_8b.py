"""The paper's 500K-token book summarisation experiment (Section 4.3, Table 4) with an 8B LLM.

Shape: Llama-3-8B (32 layers, d_model 4096, 32 heads × 128, 8 KV heads, gated SiLU FFN 14,336, vocab 128,256,
untied embeddings, RoPE base 500,000): 8,030,261,248 parameters (+1024 gate scalars), the published 8.03B.
bfloat16 compute, float32 parameters and AdamW state, remat per block, FSDP over every chip.

Stages (arg `stage`):
  pretrain  8K inputs (4 segments of 2048; the paper gives no segment length for this model, 2048 as for 1B),
            30K steps, batch 64, lr 1e-4 (the 1B value; the paper gives none for 8B); data.name 'text'.
  finetune  BookSum with 32K inputs (16 segments), batch 64, 1000 steps, lr 2e-5 (steps and lr are not in
            the paper); documents are cut to leave one segment for the summary. Evaluated at 500K inputs.
Other args: rule=linear|delta, attention=infini|xl|local|full, mode=scan|parallel.
Start pretraining from the published weights with --config.train.init_from=hf:DIR (meta-llama/Meta-Llama-3-8B;
infini_jax.convert). data.tokenizer is empty by default: the tokenizer of train.init_from is used (hf:DIR: DIR's
tokenizer.json; an infini-jax checkpoint: the tokenizer it was trained with).

    infini-train --config booksum_8b:stage=pretrain --config.data.data_dir=books/ \
        --config.train.init_from=hf:Meta-Llama-3-8B --workdir runs/pre8b
    infini-train --config booksum_8b:stage=finetune,rule=delta --config.data.data_dir=booksum/ \
        --config.train.init_from=runs/pre8b --workdir runs/ft8b
"""

from infini_jax.config import parse_arg
from infini_jax.configs import base

ARGS = dict(stage=("pretrain", "finetune"), rule=("linear", "delta"),
            attention=("infini", "xl", "local", "full"), mode=("scan", "parallel"))
# meta-llama/Meta-Llama-3-8B config.json
ARCH = dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
            d_ff=14336, activation="silu", tie_embeddings=False, embed_scale=False, rope_base=500000.0,
            norm_eps=1e-5)
PUBLISHED_PARAMS = 8_030_261_248
SEGMENT_LEN = 2048


def get_config(arg=None):
    arg = parse_arg(arg, ARGS)
    pretrain = arg.stage == "pretrain"
    n_segments = 4 if pretrain else 16  # 8K or 32K inputs
    config = base.get_config()
    config.model.update(**ARCH, segment_len=SEGMENT_LEN, n_segments=n_segments, attention=arg.attention,
                        rule=arg.rule, mode=arg.mode, dtype="bfloat16", scan_layers=True)
    if pretrain:
        config.data.update(name="text", tokenizer="")
    else:
        config.data.update(name="booksum", tokenizer="", max_document_tokens=(n_segments - 1) * SEGMENT_LEN)
    config.train.update(steps=30_000 if pretrain else 1000, batch_size=64, log_every=50,
                        eval_every=2000 if pretrain else 200, eval_batches=8, ckpt_every=1000 if pretrain else 200)
    config.optim.update(lr=1e-4 if pretrain else 2e-5, gate_lr=1e-2, warmup_steps=1000 if pretrain else 50,
                        weight_decay=0.1)
    config.mesh.update(data=1, fsdp=-1)
    return config
