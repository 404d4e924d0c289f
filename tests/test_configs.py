"""Every experiment config builds a valid ModelConfig; parameter counts match the architectures followed.

Counts come from the NNX model built abstractly (nnx.eval_shape: no memory is allocated), so an 8B model is
checked in a second on a laptop.
"""

import pytest
from flax import nnx

from infini_jax import optim
from infini_jax import step as train
from infini_jax.config import load_config, model_config, seq_len
from infini_jax.data import check_data_config
from infini_jax.model import InfiniTransformer, count_params
from infini_jax.sharding import mesh_shape


def load(name: str, arg: str = ""):
    return load_config(f"{name}:{arg}" if arg else name)


def abstract_params(cfg) -> int:
    model = nnx.eval_shape(lambda: InfiniTransformer(cfg, rngs=nnx.Rngs(0)))
    return count_params(nnx.state(model, nnx.Param))


def gate_count(cfg) -> int:
    return cfg.num_layers * cfg.num_heads if cfg.attention == "infini" else 0


def lm_params(cfg) -> int:
    """Analytical count: embeddings + layers × (attention + FFN + 2 norms) + final norm (+ gates)."""
    d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff
    attn = d * h * k * 2 + d * g * k * 2  # W_Q, W_O; W_K, W_V
    ffn = (3 if cfg.mlp == "gated" else 2) * d * f
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embed + cfg.num_layers * (attn + ffn + 2 * d) + d + gate_count(cfg)


ALL = [
    ("base", ""), ("tiny", ""), ("pg19", ""), ("pg19", "rule=delta,attention=infini"), ("pg19", "attention=xl"),
    ("pg19", "attention=local,mode=parallel"), ("pg19", "attention=full"),
    ("arxiv_math", ""), ("arxiv_math", "rule=delta"),
    ("passkey_1b", ""), ("passkey_1b", "stage=finetune,rule=delta"), ("passkey_1b", "arch=gemma"),
    ("passkey_1b", "stage=finetune,arch=gemma,attention=xl"),
    ("booksum_8b", ""), ("booksum_8b", "stage=finetune,rule=delta"),
    ("books", ""), ("books", "rule=delta"), ("books", "attention=xl"), ("books", "attention=local"),
    ("books", "attention=full"),
]


@pytest.mark.parametrize("name,arg", ALL)
def test_config_builds_and_is_locked(name, arg):
    config = load(name, arg)
    cfg = model_config(config)
    assert cfg.seq_len == seq_len(config)
    assert seq_len(config) % cfg.segment_len == 0
    assert config.train.batch_size > 0 and config.train.steps > 0
    assert set(config) >= {"model", "data", "train", "optim", "mesh"}
    # Every section passes its consumer's key check (unknown keys are errors there).
    check_data_config(config.data)
    train.train_config(config.train)
    optim.optim_config(config.optim)
    mesh_shape(config.mesh, 64)
    if config.train.carry_memory:  # the books config carries infini's memory and XL's cache, nothing else
        train.check_carry_memory(config.data, cfg)
    with pytest.raises((AttributeError, KeyError)):
        config.model.not_a_field = 1  # locked: a typo in an override is an error, not a silent new key
    for key, value in (kv.split("=") for kv in filter(None, arg.split(","))):
        if key in ("rule", "attention", "mode"):
            assert getattr(cfg, key) == value


@pytest.mark.parametrize("name", ["pg19", "arxiv_math", "passkey_1b", "booksum_8b", "tiny"])
def test_unknown_arg_is_an_error(name):
    with pytest.raises(ValueError, match="unknown config arg"):
        load(name, "rulez=delta")
    with pytest.raises(ValueError, match="is not one of"):
        load(name, "rule=quadratic")


def test_paper_lm_shape_and_memory_footprint():
    config = load("pg19")
    cfg = model_config(config)
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.d_model, cfg.d_ff) == (12, 8, 128, 1024, 4096)
    assert (cfg.segment_len, cfg.n_segments, cfg.seq_len) == (2048, 16, 32768)
    assert cfg.vocab_size == 32000 and config.train.batch_size == 64
    assert (config.optim.name, config.optim.lr, config.optim.warmup_steps) == ("adafactor", 0.01, 1000)
    # Table 1: d_key × (d_value + 1) per head per layer: 12 × 8 × 128 × 129 = 1,585,152 ≈ 1.6M numbers.
    infini_memory = cfg.num_layers * cfg.num_heads * cfg.head_dim * (cfg.head_dim + 1)
    assert infini_memory == 1_585_152 and round(infini_memory / 1e6, 1) == 1.6
    # Transformer-XL caches keys and values of one segment: (d_key + d_value) × H × N × layers ≈ 50M.
    xl_memory = 2 * cfg.head_dim * cfg.num_heads * cfg.segment_len * cfg.num_layers
    assert round(xl_memory / 1e6) == 50
    n = abstract_params(cfg)
    assert n == lm_params(cfg)
    print(f"paper LM: {n:,} parameters ({n / 1e6:.1f}M); memory {infini_memory:,} vs XL {xl_memory:,} "
          f"({xl_memory / infini_memory:.0f}x)")


def test_arxiv_math_shares_pg19_except_data():
    pg19, arxiv = load("pg19", "rule=delta"), load("arxiv_math", "rule=delta")
    for section in ("model", "train", "optim", "mesh"):
        assert pg19[section].to_dict() == arxiv[section].to_dict()
    assert (pg19.data.name, arxiv.data.name) == ("pg19", "text")
    assert tuple(arxiv.data.extensions) == (".tex",)


@pytest.mark.parametrize("name,arg,published", [
    ("passkey_1b", "", 1_235_814_400),             # meta-llama/Llama-3.2-1B: 1.24B
    ("passkey_1b", "arch=gemma", 2_506_172_416),   # google/gemma-2b: 2.51B (not 1B: see the config)
    ("booksum_8b", "", 8_030_261_248),             # meta-llama/Meta-Llama-3-8B: 8.03B
    ("pg19", "", None),
])
def test_parameter_counts_match_published(name, arg, published):
    cfg = model_config(load(name, arg))
    n = abstract_params(cfg)
    assert n == lm_params(cfg)
    if published is not None:
        assert n - gate_count(cfg) == published  # exact; the gates add num_layers × num_heads scalars
        assert abs(n / published - 1) < 0.01


def test_llm_stages():
    pre, fine = load("passkey_1b", "stage=pretrain"), load("passkey_1b", "stage=finetune")
    assert (seq_len(pre), pre.train.steps, pre.train.batch_size, pre.optim.lr) == (4096, 30_000, 64, 1e-4)
    assert model_config(pre).segment_len == 2048
    assert fine.data.name == "passkey" and fine.train.steps == 400
    assert seq_len(fine) == 6144 and seq_len(fine) >= fine.data.passkey_min_len >= 5000
    assert model_config(pre).num_layers == model_config(fine).num_layers  # fine-tune loads the pretrain
    pre8, fine8 = load("booksum_8b", "stage=pretrain"), load("booksum_8b", "stage=finetune")
    assert (seq_len(pre8), seq_len(fine8)) == (8192, 32768)
    assert fine8.data.name == "booksum" and model_config(fine8).dtype == "bfloat16"
    assert fine8.data.max_document_tokens < seq_len(fine8)
