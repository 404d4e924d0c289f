"""The embedded default: a tiny Infini-Transformer learning the paper's passkey task on a 2-core CPU.

Data is generated (no download): the paper's passkey prompt with its filler, byte-level tokens.
    python train.py --config configs/tiny.py --workdir /tmp/tiny
    python train.py --config configs/tiny.py:rule=delta,attention=xl --config.train.steps=50 ...

The recipe (chosen with experiments/passkey_sweep.py; see the README for what was tried):
  * 2 layers, d_model 64, 4 heads x 16, segments of 32 bytes, training inputs of 10 segments (320 bytes);
  * examples of 104..321 tokens (0 to 2 fillers), right-padded, half of them with the paper's intro sentence;
  * loss on the answer only;
  * memory-mass augmentation in the last 20% of the steps: in half the rows the writes of every segment
    without the key line count c ~ log-uniform[1, 128] times (a longer haystack at no extra compute);
  * at the end, config.evals prints the passkey digit accuracy at 1x, 16x and 64x the training length, with
    the memory and with it knocked out.
"""

import ml_collections

from infini_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, dict(rule=("linear", "delta"), attention=("infini", "xl", "local", "full"),
                              mode=("scan", "parallel")))
    config = ml_collections.ConfigDict()

    config.model = dict(
        vocab_size=259, d_model=64, num_layers=2, num_heads=4, num_kv_heads=None, head_dim=16, d_ff=256,
        segment_len=32, n_segments=10, attention=arg.attention, rule=arg.rule, mode=arg.mode,
        mlp="gated", activation="silu", tie_embeddings=True, embed_scale=False, rope_base=10000.0,
        gate_init=0.0, norm_eps=1e-6, dtype="float32", param_dtype="float32", remat=False, remat_segments=True,
        init_std=0.02, scan_layers=False,
    )
    config.data = dict(
        name="passkey", tokenizer="byte", seed=0, data_dir="",  # data_dir: for name=text|pg19|booksum
        passkey_digits=5, passkey_depth_min=0.0, passkey_depth_max=1.0, passkey_loss_on_all=False,
        passkey_min_len=104, passkey_intro=0.5, passkey_haystack="",
        passkey_mass_prob=0.5, passkey_mass_max=128.0, passkey_mass_after=2400,
    )
    config.train = dict(
        steps=3000, batch_size=8, seed=0, log_every=100, eval_every=1000, eval_batches=4,
        ckpt_every=1000, keep_checkpoints=2, init_from="",  # init_from: params-only start (fine-tuning)
    )
    config.optim = dict(
        name="adamw", lr=3e-3, gate_lr=1e-2, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1,
        weight_decay=0.1, clip_norm=1.0, grad_accum=1, b1=0.9, b2=0.95,
    )
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    # evaluators run at the end of training: passkey digit accuracy at 1x, 16x and 64x the training length
    config.evals = dict(passkey_x=(1, 16, 64), passkey_depths=(0.0, 0.5, 1.0), passkey_trials=10,
                        passkey_knockout=True, passkey_seed=12345)
    config.lock()
    return config
