"""The paper's 1M-token passkey experiment (Section 4.2, Table 3) with a ~1B-parameter LLM.

The paper takes "a 1B LLM", replaces its attention by Infini-attention, continually pre-trains it on 4K-token
inputs (segment 2K) for 30K steps at batch 64 and lr 1e-4, then fine-tunes 400 steps on ~5K-token passkey
inputs. Which 1B model is not said. Two open shapes are offered (arg `arch`):

  arch=llama (default)  Llama-3.2-1B: 16 layers, d_model 2048, 32 heads × 64, 8 KV heads (GQA), gated SiLU
                        FFN 8192, vocab 128,256, tied embeddings, RoPE base 500,000 with Llama 3's frequency
                        scaling (factor 32, original length 8192). 1,235,814,400 parameters (+512 gate scalars):
                        the published 1.24B. Chosen as the default because it IS ~1B and its weights are public:
                        --config.train.init_from=hf:DIR starts from them (infini_jax.convert).
  arch=gemma            Gemma-2B: 18 layers, d_model 2048, 8 heads × 256, multi-query (1 KV head), gated GeLU
                        FFN 16,384, vocab 256,000, tied, embeddings × sqrt(d_model). 2,506,172,416 parameters:
                        "Gemma-2B" is 2.5B with its 256K vocabulary (0.52B of it embeddings), so it is NOT the
                        paper's 1B. --config.train.init_from=hf:DIR starts from google/gemma-2b.

Stages (arg `stage`):
  pretrain  inputs 4096 = 2 segments of 2048, 30K steps, batch 64, AdamW lr 1e-4; data.name 'text': a folder of
            documents longer than 4K tokens (PG19, Arxiv-math, C4 in the paper). Start from the published
            weights with --config.train.init_from=hf:DIR (params only, fresh optimizer, gates from gate_init).
  finetune  passkey inputs of 3 segments = 6144 tokens (the paper's "5K" is 2.5 segments of 2048; inputs must
            be whole segments, so examples are drawn 5120..6145 tokens long and right-padded with loss_mask 0
            to 6144), 400 steps, batch 64, lr 1e-4, loss on the answer tokens only; starts from the
            pretrain checkpoint's parameters (--config.train.init_from=<pretrain workdir>).
Other args: rule=linear|delta, attention=infini|xl|local|full, mode=scan|parallel.
data.tokenizer is empty by default: the tokenizer of train.init_from is used (hf:DIR: DIR's tokenizer.json; an
infini-jax checkpoint: the tokenizer it was trained with). The README's "Llama-3.2-1B → Infini-Transformer →
passkey fine-tune" is the whole recipe.

    infini-train --config passkey_1b:stage=pretrain,rule=delta --config.data.data_dir=... \
        --config.train.init_from=hf:Llama-3.2-1B --workdir runs/pre
    infini-train --config passkey_1b:stage=finetune --config.train.init_from=runs/pre --workdir runs/ft
"""

from infini_jax.config import parse_arg
from infini_jax.configs import base

ARGS = dict(stage=("pretrain", "finetune"), arch=("llama", "gemma"), rule=("linear", "delta"),
            attention=("infini", "xl", "local", "full"), mode=("scan", "parallel"))

# The published shapes (Hugging Face config.json of meta-llama/Llama-3.2-1B and google/gemma-2b).
ARCHS = dict(
    llama=dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
               d_ff=8192, activation="silu", tie_embeddings=True, embed_scale=False, rope_base=500000.0,
               rope_scaling=(32.0, 1.0, 4.0, 8192.0), norm_eps=1e-5),
    gemma=dict(vocab_size=256000, d_model=2048, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256,
               d_ff=16384, activation="gelu", tie_embeddings=True, embed_scale=True, rope_base=10000.0,
               norm_eps=1e-6),
)
PUBLISHED_PARAMS = dict(llama=1_235_814_400, gemma=2_506_172_416)  # without the Infini-attention gates
SEGMENT_LEN = 2048
PASSKEY_MIN_LEN = 5120  # the paper's "5K-token" fine-tuning inputs


def get_config(arg=None):
    arg = parse_arg(arg, ARGS)
    pretrain = arg.stage == "pretrain"
    n_segments = 2 if pretrain else -(-PASSKEY_MIN_LEN // SEGMENT_LEN)  # 4K, or 5K rounded up to 3 segments
    config = base.get_config()
    config.model.update(**ARCHS[arg.arch], segment_len=SEGMENT_LEN, n_segments=n_segments, attention=arg.attention,
                        rule=arg.rule, mode=arg.mode, dtype="bfloat16", scan_layers=True)
    if pretrain:
        config.data.update(name="text", tokenizer="")
    else:
        config.data.update(name="passkey", tokenizer="", passkey_min_len=PASSKEY_MIN_LEN)
    config.train.update(steps=30_000 if pretrain else 400, batch_size=64, log_every=50 if pretrain else 10,
                        eval_every=2000 if pretrain else 100, eval_batches=8, ckpt_every=1000 if pretrain else 200)
    config.optim.update(lr=1e-4, gate_lr=1e-2, warmup_steps=1000 if pretrain else 40, weight_decay=0.1)
    config.mesh.update(data=1, fsdp=-1)
    return config
