"""Hugging Face config.json ↔ the ModelConfig fields a checkpoint fixes (Llama and Gemma).

`model_fields(config_json)` reads what the weights decide (shapes, activation, embeddings, RoPE, RMSNorm ε);
everything else (segment_len, attention, rule, dtype, ...) stays the experiment config's. `check_matches`
refuses an experiment config that disagrees, naming every field and the override that fixes it.
`hf_config(model_config)` writes the config.json of an export.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from etils import epath

ARCHS = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM"}
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")  # = jax.nn.gelu (its default is the tanh approximation)
# Hugging Face's defaults for keys a config.json may leave out
HF_DEFAULTS = {"llama": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0),
               "gemma": dict(tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)}
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "mlp",
          "activation", "tie_embeddings", "embed_scale", "rope_base", "rope_scaling", "norm_eps")


def read_config_json(hf_dir: epath.PathLike) -> dict:
    path = epath.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint directory holds config.json and "
                                "*.safetensors (download it with `huggingface-cli download MODEL --local-dir DIR`)")
    return json.loads(path.read_text())


def arch_of(hf: Mapping[str, Any], where: str = "config.json") -> str:
    """'llama' or 'gemma'; any other model_type is an error naming the supported ones."""
    arch = hf.get("model_type")
    if arch not in ARCHS:
        raise ValueError(f"{where}: model_type {arch!r} ({', '.join(hf.get('architectures') or [])}) is not "
                         f"supported; infini-jax imports {sorted(ARCHS)}")
    return arch


def _rope(hf: Mapping[str, Any], arch: str, where: str) -> tuple[float, tuple]:
    """(θ, Llama 3 scaling or ()) from rope_parameters (transformers 5) or rope_theta/rope_scaling (4)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS[arch]["rope_theta"]))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor is not supported (infini-jax rotates the whole head)")
    if kind == "default":
        return float(theta), ()
    if kind == "llama3":
        missing = [k for k in LLAMA3_ROPE if k not in params]
        if missing:
            raise ValueError(f"{where}: rope type 'llama3' lacks {missing}")
        return float(theta), tuple(float(params[k]) for k in LLAMA3_ROPE)
    raise ValueError(f"{where}: rope type {kind!r} is not supported (infini-jax has plain RoPE and 'llama3')")


def _activation(hf: Mapping[str, Any], arch: str, where: str) -> str:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if arch == "gemma" else "silu")
    if act == "silu":
        return "silu"
    if act in TANH_GELU or (arch == "gemma" and act == "gelu"):  # transformers runs Gemma's "gelu" as tanh
        return "gelu"
    raise ValueError(f"{where}: hidden_act {act!r} is not supported: infini-jax has silu and the tanh GeLU "
                     f"({', '.join(TANH_GELU)})")


def model_fields(hf: Mapping[str, Any], where: str = "config.json") -> dict:
    """The ModelConfig fields (FIELDS) a Llama or Gemma config.json fixes. Features infini-jax lacks (biases,
    other RoPE scalings, bidirectional attention) are errors naming the key."""
    arch = arch_of(hf, where)
    unsupported = [k for k in ("attention_bias", "mlp_bias", "use_bidirectional_attention") if hf.get(k)]
    if unsupported:
        raise ValueError(f"{where}: {', '.join(f'{k}=true' for k in unsupported)} is not supported")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, scaling = _rope(hf, arch, where)
    defaults = HF_DEFAULTS[arch]
    return dict(
        vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or d // heads),
        d_ff=int(hf["intermediate_size"]), mlp="gated", activation=_activation(hf, arch, where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        embed_scale=arch == "gemma", rope_base=theta, rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])))


def check_matches(fields: Mapping[str, Any], model_cfg, where: str) -> None:
    """One error line naming every field where the experiment's config.model differs from the checkpoint's."""
    now = {k: getattr(model_cfg, k) for k in fields}
    now["num_kv_heads"] = model_cfg.kv_heads  # None means "= num_heads"
    diff = [k for k in fields if now[k] != fields[k]]
    if diff:
        raise ValueError(f"{where} does not match config.model: "
                         + "; ".join(f"{k} {now[k]!r} in the config, {fields[k]!r} in the checkpoint" for k in diff)
                         + ". Fix: " + " ".join(_override(k, fields[k]) for k in diff))


def _override(key: str, value) -> str:
    """The flag, written so that a shell passes it on unchanged (no quotes, no spaces)."""
    text = f"({','.join(map(repr, value))})" if isinstance(value, tuple) else \
        value if isinstance(value, str) else repr(value)
    return f"--config.model.{key}={text}"


def overrides(fields: Mapping[str, Any]) -> list[str]:
    """The --config.model.* flags that make an experiment config describe this checkpoint."""
    return [_override(k, v) for k, v in fields.items()]


def arch_for(model_cfg) -> str:
    """The Hugging Face architecture a ModelConfig is, or an error naming the fields that fit none."""
    problems = [] if model_cfg.mlp == "gated" else ["mlp='plain' (Llama and Gemma have gated MLPs)"]
    if model_cfg.rope_base is None:
        problems.append("rope_base=None (Llama and Gemma use RoPE)")
    arch = "gemma" if model_cfg.embed_scale else "llama"
    if (model_cfg.activation == "gelu") != (arch == "gemma"):
        problems.append(f"activation={model_cfg.activation!r} with embed_scale={model_cfg.embed_scale} (Llama: "
                        "silu without the embedding scale; Gemma: gelu with it)")
    if model_cfg.rope_scaling and arch == "gemma":
        problems.append("rope_scaling with Gemma")
    if problems:
        raise ValueError("this model has no Hugging Face counterpart: " + "; ".join(problems))
    return arch


def hf_config(model_cfg, like: Optional[Mapping[str, Any]] = None, dtype: str = "float32") -> dict:
    """config.json for `model_cfg` as a LlamaForCausalLM or GemmaForCausalLM. `like`: the config.json the model
    came from; its other keys (token ids, max_position_embeddings, ...) are kept."""
    arch = arch_for(model_cfg)
    out = {k: v for k, v in dict(like or {}).items()
           if k not in ("rope_parameters", "rope_scaling", "rope_theta", "hidden_activation", "torch_dtype")}
    out.update(
        architectures=[ARCHS[arch]], model_type=arch, vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.d_model, intermediate_size=model_cfg.d_ff, num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.kv_heads,
        head_dim=model_cfg.head_dim, hidden_act="silu" if arch == "llama" else TANH_GELU[0],
        rms_norm_eps=model_cfg.norm_eps, tie_word_embeddings=model_cfg.tie_embeddings, attention_bias=False,
        rope_theta=model_cfg.rope_base, dtype=dtype)
    if arch == "llama":
        out["mlp_bias"] = False
    if model_cfg.rope_scaling:
        factor, low, high, original = model_cfg.rope_scaling
        out["rope_scaling"] = dict(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                                   original_max_position_embeddings=int(original))
    out.setdefault("max_position_embeddings", 131072 if model_cfg.rope_scaling else 8192)  # Llama 3.2's / 3's
    return out
