"""Hugging Face Llama / Gemma ↔ infini-jax (infini_jax/convert): logits equal Hugging Face's, one segment and
local-forced gates, export → import round trip and Hugging Face loading the export, tensor-by-tensor loading
into the shardings of an 8-device mesh, one-line errors, and the published configs the big experiments copy."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from _hf import CASES, save_model
from infini_jax import sharding as shd
from infini_jax.configs import booksum_8b, passkey_1b
from infini_jax.convert import check_hf_checkpoint, export_hf, hf_config, hf_fields, hf_params, load_hf_params
from infini_jax.model import InfiniTransformer, ModelConfig

L = 32  # tokens per test input


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case: save_model(case, root / case) for case in CASES}


def model_config(directory, **kw) -> ModelConfig:
    return ModelConfig(**{**hf_fields(directory), "segment_len": L, "n_segments": 1, "remat": False, **kw})


def forward(params, cfg, tokens) -> np.ndarray:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: InfiniTransformer(cfg, rngs=nnx.Rngs(0))))
    return np.asarray(nnx.merge(graphdef, params)(tokens)[0])


def tokens(vocab=97, batch=2, length=L):
    return np.random.default_rng(1).integers(0, vocab, (batch, length)).astype(np.int32)


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case,scan_layers", [(c, s) for c in CASES for s in (False, True)
                                               if s == c.startswith("gemma")])
def test_logits_equal_hugging_face(hf_models, case, scan_layers):
    hf = hf_models[case]
    cfg = model_config(hf.directory, attention="full", scan_layers=scan_layers)
    params = load_hf_params(hf.directory, cfg)
    want = hf.logits(tokens())
    assert rel_err(forward(params, cfg, tokens()), want) <= 1e-4
    if cfg.rope_scaling:  # the test sees the RoPE frequencies: plain RoPE would be off
        assert rel_err(forward(params, dataclasses.replace(cfg, rope_scaling=()), tokens()), want) > 1e-3


def test_one_segment_and_local_gates(hf_models):
    hf = hf_models["llama_tied_rope_scaling"]
    want = hf.logits(tokens())
    for attention in ("local", "infini"):  # one segment: the memory is empty, attention is local = full
        cfg = model_config(hf.directory, attention=attention)
        assert rel_err(forward(load_hf_params(hf.directory, cfg), cfg, tokens()), want) <= 1e-4
    # four segments, every gate at β → −∞: exactly local attention
    local = model_config(hf.directory, attention="local", segment_len=L // 4, n_segments=4)
    infini = dataclasses.replace(local, attention="infini", gate_init=-1e9)
    assert rel_err(forward(load_hf_params(hf.directory, infini), infini, tokens()),
                   forward(load_hf_params(hf.directory, local), local, tokens())) <= 1e-5  # float32 round-off


def random_params(cfg, seed=0):
    """Initialised params with every RMSNorm scale and gate moved off its initial value."""
    params = nnx.to_pure_dict(nnx.state(InfiniTransformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = path[-1].key
        if name == "scale":
            return x + rng.uniform(-0.4, 0.4, x.shape).astype(x.dtype)  # (1 + w) - 1 is exact in [0.5, 2]
        return rng.normal(0, 2, x.shape).astype(x.dtype) if name == "gate_logit" else x

    return jax.tree_util.tree_map_with_path(perturb, params)


@pytest.mark.parametrize("case", ["llama_tied_rope_scaling", "gemma_untied_mqa"])
def test_export_import_round_trip_and_hugging_face_loads_it(hf_models, case, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = model_config(hf_models[case].directory, attention="infini", segment_len=8, n_segments=4,
                       scan_layers=case.startswith("gemma"))
    params = random_params(cfg)
    files = export_hf(params, cfg, tmp_path, max_shard_bytes=20_000)  # several shards and an index
    assert "model.safetensors.index.json" in files and hf_params.GATES_FILE in files
    back = load_hf_params(tmp_path, cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, params))
    fresh = load_hf_params(tmp_path, dataclasses.replace(cfg, attention="full"))  # the backbone alone
    full = dataclasses.replace(cfg, attention="full", segment_len=L, n_segments=1)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    import torch

    with torch.no_grad():
        want = hf(torch.tensor(tokens())).logits.numpy()
    assert rel_err(forward(fresh, full, tokens()), want) <= 1e-4


def test_loads_tensor_by_tensor_into_mesh_shardings(hf_models, monkeypatch):
    """On a data 2 × fsdp 2 × tensor 2 mesh every parameter is built on its NamedSharding from per-device
    blocks: no read is bigger than the block one device holds, and each device holds only its block."""
    hf = hf_models["llama_untied"]
    cfg = model_config(hf.directory, attention="infini", scan_layers=True)
    mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
    single = load_hf_params(hf.directory, cfg)
    reads = []
    read = hf_params.SafetensorsDir.read
    monkeypatch.setattr(hf_params.SafetensorsDir, "read",
                        lambda self, name, index: reads.append((name, read(self, name, index))) or reads[-1][1])
    params = load_hf_params(hf.directory, cfg, mesh)
    want_sh = shd.param_shardings(nnx.eval_shape(lambda: InfiniTransformer(cfg, rngs=nnx.Rngs(0))), mesh)
    sharded = 0
    for (path, x), sh, one in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want_sh),
                                  jax.tree.leaves(single)):
        assert x.sharding == sh, path
        block = sh.shard_shape(x.shape)
        assert all(s.data.shape == block for s in x.addressable_shards), path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(one))
        sharded += block != x.shape
    assert sharded >= 9  # every matrix is split (fsdp and/or tensor); norms and gates are replicated
    sizes = {}
    for name, block in reads:
        sizes[name] = max(sizes.get(name, 0), block.size)
    whole = {n: int(np.prod(hf_params.SafetensorsDir(hf.directory).shape(n))) for n in sizes}
    matrices = [n for n in sizes if n.endswith("proj.weight") or n.endswith("_tokens.weight") or n == "lm_head.weight"]
    assert matrices and all(sizes[n] <= whole[n] // 2 for n in matrices)  # never a whole matrix at once


def test_bfloat16_checkpoint_loads_into_float32(hf_models, tmp_path):
    """Published checkpoints are bfloat16: read as such (no torch) and cast to model.param_dtype."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    src = hf_models["gemma_tied"].directory
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    tensors = load_file(f"{src}/model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    cfg = model_config(src)
    got = load_hf_params(tmp_path, cfg)
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                           load_hf_params(src, cfg))
    rounded["final_norm"]["scale"] = 1 + tensors["model.norm.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert got["embed_vd"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got["embed_vd"]), rounded["embed_vd"])
    np.testing.assert_array_equal(np.asarray(got["blocks"][1]["attn"]["wo_hkd"]), rounded["blocks"][1]["attn"]["wo_hkd"])
    np.testing.assert_array_equal(np.asarray(got["final_norm"]["scale"]), rounded["final_norm"]["scale"])


def test_errors_are_one_line_naming_the_problem(hf_models, tmp_path):
    src = hf_models["llama_untied"].directory
    cfg = model_config(src)

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(src, d)
        edit(d)
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            check_hf_checkpoint(d, cfg)
        assert "\n" not in str(err.value)
        return str(err.value)

    def set_config(**kw):
        return lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                                     **kw}))

    def rewrite(drop=None, reshape=None):
        def edit(d):
            from safetensors.numpy import load_file, save_file
            t = load_file(d / "model.safetensors")
            t.pop(drop, None)
            if reshape:
                t[reshape] = t[reshape][:-1]
            save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        return edit

    assert "config.json not found" in broken("no_config", lambda d: (d / "config.json").unlink())
    assert "neither model.safetensors" in broken("no_weights", lambda d: (d / "model.safetensors").unlink())
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    assert "model-00002-of-00002.safetensors, which is missing" in broken(
        "no_shard", lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(index)))
    assert "model.layers.1.mlp.up_proj.weight is not in" in broken(
        "no_tensor", rewrite(drop="model.layers.1.mlp.up_proj.weight"))
    assert "model.layers.0.self_attn.k_proj.weight" in broken(
        "bad_shape", rewrite(reshape="model.layers.0.self_attn.k_proj.weight"))
    assert "model_type 'mistral'" in broken("mistral", set_config(model_type="mistral"))
    msg = broken("vocab", set_config(vocab_size=128))
    assert "vocab_size 97 in the config, 128 in the checkpoint" in msg and "--config.model.vocab_size=128" in msg
    assert "attention_bias=true" in broken("bias", set_config(attention_bias=True))
    assert "'yarn'" in broken("yarn", set_config(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)))
    with pytest.raises(ValueError, match="no Hugging Face counterpart.*mlp='plain'"):
        export_hf({}, dataclasses.replace(cfg, mlp="plain"), tmp_path / "plain")


# config.json of the checkpoints the big configs are shaped after (meta-llama/Llama-3.2-1B,
# meta-llama/Meta-Llama-3-8B, google/gemma-2b), as published (transformers 4 layout)
LLAMA_32_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
                   intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=64, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                   rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                     original_max_position_embeddings=8192, rope_type="llama3"),
                   attention_bias=False, mlp_bias=False, max_position_embeddings=131072)
LLAMA_3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                  max_position_embeddings=8192)
GEMMA_2B = dict(architectures=["GemmaForCausalLM"], model_type="gemma", vocab_size=256000, hidden_size=2048,
                intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                head_dim=256, hidden_act="gelu", rms_norm_eps=1e-6, rope_theta=10000.0)


@pytest.mark.parametrize("published,config,arg", [(LLAMA_32_1B, passkey_1b, "arch=llama"),
                                                  (GEMMA_2B, passkey_1b, "arch=gemma"),
                                                  (LLAMA_3_8B, booksum_8b, "")])
def test_published_configs_match_the_experiments(published, config, arg):
    cfg = ModelConfig.from_dict(config.get_config(arg).model)
    hf_config.check_matches(hf_config.model_fields(published), cfg, "published config.json")
    exported = hf_config.hf_config(cfg, like=published)
    assert hf_config.model_fields(exported) == hf_config.model_fields(published)
