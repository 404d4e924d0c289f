"""Tiny Hugging Face models and tokenizers made on the spot (transformers on CPU torch; nothing downloaded)."""

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("transformers")  # the test extra installs it (with torch==2.13.0, CPU)
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (GemmaConfig, GemmaForCausalLM, GemmaTokenizer, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, PreTrainedTokenizerFast)

# the passkey prompt's sentences and a little of everything else a tokenizer meets
TEXT = ["There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
        "you about the important information there.", "The grass is green. The sky is blue. The sun is yellow. Here "
        "we go. There and back again.", "The pass key is 90542. Remember it. 90542 is the pass key.",
        "What is the pass key? The pass key is 12345 67890.", "Ünïcödé ✓ 日本語,\ttabs\nand  two spaces."] * 8
SAMPLE = "The pass key is 31415. Remember it.\n\nÜnï ✓ 日本語  x<|end_of_text|> y<eos>"

# name: (architecture, key/value heads, tied embeddings, head_dim, Llama 3 RoPE scaling)
CASES = {
    "llama_tied_rope_scaling": ("llama", 2, True, 8, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=64)),
    "llama_untied": ("llama", 2, False, 8, None),
    "gemma_tied": ("gemma", 2, True, 16, None),  # head_dim 16 ≠ d_model / heads = 8
    "gemma_untied_mqa": ("gemma", 1, False, 16, None),
}


@dataclasses.dataclass
class HFModel:
    directory: str
    torch_model: object

    def logits(self, tokens) -> np.ndarray:
        with torch.no_grad():
            return self.torch_model(torch.tensor(np.asarray(tokens))).logits.numpy()


def save_model(case: str, directory, vocab_size: int = 97, seed: int = 0) -> HFModel:
    """A random 2-layer model of CASES[case] (d_model 32, 4 heads), its RMSNorm weights perturbed so that
    Gemma's (1 + w) matters, saved with save_pretrained (config.json + model.safetensors)."""
    arch, kv, tied, head_dim, rope_scaling = CASES[case]
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied, initializer_range=0.2,
              rms_norm_eps=1e-5, attn_implementation="eager")
    if arch == "llama":
        rope = dict(rope_scaling or dict(rope_type="default"), rope_theta=500.0)
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_parameters=rope, max_position_embeddings=1024))
    else:
        model = GemmaForCausalLM(GemmaConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if arch == "llama" else 0.0) + 0.3 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    return HFModel(str(directory), model)


def save_byte_level_tokenizer(directory, with_bos: bool = True):
    """A Llama 3-style byte-level BPE trained on TEXT (bos added by the post-processor, no pad token; digits
    split, so that every passkey is as many tokens long)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>" if with_bos else None,
                                 eos_token="<|end_of_text|>")
    hf.save_pretrained(directory)
    return hf


def save_gemma_tokenizer(directory):
    """A Gemma-style BPE (spaces as '▁', byte fallback) trained on TEXT, saved through GemmaTokenizer."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=360, special_tokens=specials))
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in spec["merges"]]
    hf = GemmaTokenizer(vocab=spec["vocab"], merges=merges)
    hf.save_pretrained(directory)
    return hf
