"""The README recipe on a tiny Hugging Face Llama made on the spot: passkey_1b fine-tuning with
--config.train.init_from=hf:DIR (its tokenizer by default, sharded over 8 devices), then infini-convert export,
which Hugging Face loads and infini-jax imports back to the trained parameters."""

import json

import jax
import numpy as np

from _hf import save_byte_level_tokenizer, save_model
from infini_jax import checkpoint as ckpt_lib
from infini_jax import loop as T
from infini_jax.config import load_config
from infini_jax.convert import hf_fields, load_hf_params
from infini_jax.convert.__main__ import main as convert_main


def test_init_from_hf_trains_and_exports(tmp_path, capsys):
    hf_dir, run, out = tmp_path / "tiny_llama", tmp_path / "run", tmp_path / "export"
    tok = save_byte_level_tokenizer(hf_dir)
    save_model("llama_untied", hf_dir, vocab_size=len(tok))
    convert_main(["fields", str(hf_dir)])
    flags = capsys.readouterr().out.split()
    assert "--config.model.num_kv_heads=2" in flags and "--config.model.rope_scaling=()" in flags

    config = load_config("passkey_1b:stage=finetune")  # Llama-3.2-1B's shape: the tiny model's overrides it
    config.model.update(**hf_fields(hf_dir), segment_len=128)
    config.data.passkey_min_len = 300
    config.train.update(init_from=f"hf:{hf_dir}", steps=2, batch_size=8, eval_batches=1)
    assert config.data.tokenizer == "" and config.mesh.fsdp == -1 and config.model.scan_layers
    result = T.train_and_evaluate(config, run, progress=False)
    assert result["step"] == 2 and np.isfinite(result["train"]["loss"])
    saved = json.loads((ckpt_lib.find_step_dir(run) / "config" / "metadata").read_text())
    assert saved["data"]["tokenizer"] == str(hf_dir)  # the default: the Hugging Face directory's tokenizer

    convert_main(["export", "--checkpoint", str(run), "--out", str(out)])
    assert "tokenizer.json" in capsys.readouterr().out  # copied from the run's init_from=hf:DIR
    cfg = ckpt_lib.param_targets(saved["model"])[0]
    trained = ckpt_lib.restore_params(run, cfg)
    back = load_hf_params(out, cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, trained))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(out)("The pass key").input_ids[0] == tok.bos_token_id
