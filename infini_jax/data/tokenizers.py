"""Tokenizers: a byte-level tokenizer, a SentencePiece wrapper and a Hugging Face tokenizer.json wrapper with
one interface; the one vocabulary check; training a SentencePiece model (`infini-tokenizer train`, or
`python -m infini_jax.cli.infini_tokenizer train`: infini_jax/cli/infini_tokenizer.py).

SentencePiece training (`train_sentencepiece`) writes PREFIX.model / PREFIX.vocab. Inputs: files, or folders
searched recursively for .txt/.tex/.md (one sentence per line, as SentencePiece reads them) and .jsonl (field
text_field). Point it at a *train* folder so validation/test text does not leak into the vocabulary. Ids:
0 = pad, 1 = bos, 2 = eos, 3 = unk (like ByteTokenizer for the first three); identity normalisation,
whitespace kept, byte fallback on (newlines become byte pieces), digits split: decode(encode(text)) == text for
any UTF-8 text.

Interface (CONTRACT.md): vocab_size, pad_id, bos_id, eos_id, encode(str) -> list[int], decode(list[int]) -> str.
Extras used by the data pipelines: encode_np(str) -> int32 array (fast path for whole books) and
``space_prefix``: True when encode() itself puts a word-boundary marker in front of the text (SentencePiece's
dummy prefix), False when a separating space must be written out (bytes). The passkey builder uses it to join
independently encoded pieces of text so that they decode to the pieces joined by single spaces.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes. 0 = pad, 1 = bos, 2 = eos, byte b -> b + 3 (vocab 259)."""

    vocab_size = 259
    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3
    space_prefix = False

    def encode_np(self, text: str) -> np.ndarray:
        raw_N = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw_N.astype(np.int32) + self.offset

    def encode(self, text: str) -> list[int]:
        return self.encode_np(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids_N = np.asarray(ids, dtype=np.int64)
        ids_N = ids_N[(ids_N >= self.offset) & (ids_N < self.vocab_size)]
        return (ids_N - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file. encode() adds no bos/eos (the pipelines add them).

    pad_id: the model's pad id, or its unk id when the model defines no pad (e.g. Llama/Mistral models);
    padding positions always carry loss_mask 0, so the id only has to be a valid embedding row.
    """

    space_prefix = True

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        from infini_jax import paths

        gpath = paths.resolve(path)  # local or gs://: the model is read through epath
        path = os.fspath(gpath)
        if not gpath.is_file():
            raise ValueError(
                f"tokenizer model file not found: {path!r}. Set config.data.tokenizer to 'byte' or to the "
                "path of a SentencePiece .model file (train one with `infini-tokenizer train`)."
            )
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(gpath.read_bytes())
        except Exception as err:  # sentencepiece raises OSError / RuntimeError depending on the version
            raise ValueError(f"{path!r} is not a SentencePiece model file ({err})") from err
        self.vocab_size = int(self._sp.GetPieceSize())
        unk = self._sp.unk_id()
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else int(max(unk, 0))
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path!r} has no bos/eos piece; retrain it with bos_id/eos_id set")

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.pad_id]
        return self._sp.DecodeIds(ids)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer: a directory holding tokenizer.json, or the tokenizer.json file itself. Read with
    the `tokenizers` library, the one behind transformers' fast tokenizers, so the ids are Hugging Face's
    (Llama 3's byte-level BPE, Gemma's byte-fallback BPE, ...). encode() adds no bos/eos (the pipelines add
    them); special-token text inside a document is parsed as Hugging Face does.

    bos/eos/pad: the tokens named in tokenizer_config.json (or special_tokens_map.json) beside tokenizer.json;
    with no pad token (Llama 3) pad_id = eos_id (padding carries loss_mask 0). `token_bytes()` gives the exact
    UTF-8 bytes of every token for bits per byte: byte-level tokens map one character to one byte,
    byte-fallback '<0x..>' tokens are one byte, '▁' is a space, special tokens are 0.
    """

    def __init__(self, path):
        from infini_jax import paths

        gpath = paths.resolve(path)
        file = gpath / "tokenizer.json" if gpath.is_dir() else gpath
        if not file.is_file():
            raise ValueError(f"no Hugging Face tokenizer at {os.fspath(gpath)!r}: point config.data.tokenizer at a "
                             "directory holding tokenizer.json, or at the tokenizer.json file")
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ValueError("reading tokenizer.json needs the `tokenizers` package: pip install "
                             "'infini-jax[hf]'") from err
        self.path = os.fspath(file)
        self._spec = json.loads(file.read_text())
        self._tok = Tokenizer.from_str(json.dumps(self._spec))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        named = _special_tokens(file.parent)
        ids = {k: self._tok.token_to_id(v) for k, v in named.items() if v is not None}
        if ids.get("bos") is None or ids.get("eos") is None:
            raise ValueError(f"{self.path}: no bos_token/eos_token in {file.parent / 'tokenizer_config.json'} "
                             "that tokenizer.json knows; save the tokenizer with save_pretrained (it writes both)")
        self.bos_id, self.eos_id = int(ids["bos"]), int(ids["eos"])
        self.pad_id = int(ids["pad"]) if ids.get("pad") is not None else self.eos_id
        self._bytes_V = self._byte_table()
        self.space_prefix = int(self._bytes_V[self.encode_np("a")].sum()) > 1  # it writes a leading '▁' / 'Ġ'

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.pad_id]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        return self._bytes_V

    def _byte_table(self) -> np.ndarray:
        byte_level = "ByteLevel" in _types(self._spec.get("decoder"))
        added = {t["id"]: t for t in self._spec.get("added_tokens", [])}
        table_V = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or added.get(i, {}).get("special"):
                continue
            if i in added:  # a non-special added token stands for its own text
                table_V[i] = len(piece.encode("utf-8"))
            elif byte_level:  # GPT-2 / Llama 3: every character of a piece is one byte
                table_V[i] = len(piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
                table_V[i] = 1
            else:
                table_V[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        unk = self._spec.get("model", {}).get("unk_token")
        if unk is not None and self._tok.token_to_id(unk) is not None:
            table_V[self._tok.token_to_id(unk)] = 0
        return table_V

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _types(node) -> list[str]:
    """The component types of a tokenizer.json pipeline entry (a Sequence lists its parts)."""
    if not isinstance(node, dict):
        return []
    parts = node.get("decoders") or node.get("pretokenizers") or []
    return [node.get("type", "")] + [t for p in parts for t in _types(p)]


def _special_tokens(directory) -> dict:
    """{"bos", "eos", "pad"} token strings from tokenizer_config.json, else special_tokens_map.json."""
    out = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / name
        cfg = json.loads(f.read_text()) if f.is_file() else {}
        for key in ("bos", "eos", "pad"):
            value = cfg.get(f"{key}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if out.get(key) is None:
                out[key] = value
    return out


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def load_tokenizer(spec) -> Tokenizer:
    """'byte' (or None) -> ByteTokenizer; a directory holding tokenizer.json, or a .json file -> HFTokenizer;
    a path to a SentencePiece .model -> SentencePieceTokenizer.

    An empty string is an error (configs use "" as "must be set"), so a forgotten tokenizer never silently
    becomes bytes. An object that already looks like a tokenizer (has encode/decode) is returned unchanged.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("byte", "bytes")):
        return ByteTokenizer()
    if isinstance(spec, str) and not spec.strip():
        raise ValueError("config.data.tokenizer is empty: set it to 'byte', a SentencePiece .model file (train one "
                         "with `infini-tokenizer train`) or a Hugging Face tokenizer directory / "
                         "tokenizer.json (or start from --config.train.init_from=hf:DIR, whose tokenizer is used)")
    if hasattr(spec, "encode") and hasattr(spec, "decode") and not isinstance(spec, (str, bytes)):
        return spec
    from infini_jax import paths

    if str(spec).endswith(".json") or paths.resolve(spec).is_dir():
        return HFTokenizer(spec)
    return SentencePieceTokenizer(spec)


def with_default_tokenizer(config):
    """`config` with an empty data.tokenizer filled in from train.init_from: hf:DIR → DIR (the model's own
    tokenizer), an infini-jax checkpoint → the data.tokenizer it was trained with. That is the default of the
    passkey_1b and booksum_8b configs. Otherwise (or when init_from does not resolve) `config` itself."""
    from infini_jax.convert import hf_dir

    spec = config.get("train", {}).get("init_from")
    if not spec or str(config.data.get("tokenizer", "byte")).strip():
        return config
    tokenizer = hf_dir(spec) or _trained_tokenizer(spec)
    if not tokenizer:
        return config
    config = config.copy_and_resolve_references()
    config.data.tokenizer = tokenizer
    return config


def _trained_tokenizer(checkpoint) -> str:
    """data.tokenizer saved with an infini-jax checkpoint (workdir, checkpoints dir or step dir), or ''."""
    from infini_jax.checkpoint import find_step_dir

    try:
        saved = json.loads((find_step_dir(checkpoint) / "config" / "metadata").read_text())
    except (OSError, ValueError):  # no checkpoint there: train.py's init_from check says so
        return ""
    return str((saved.get("data") or {}).get("tokenizer") or "")


def check_vocab(tokenizer, vocab_size: int, spec=None) -> None:
    """The tokenizer's vocabulary must be the model's: ids past the embedding table would be silently clamped.
    The one vocabulary check (training, eval.py, generation). `spec`: what config.data.tokenizer said."""
    if tokenizer.vocab_size != vocab_size:
        name = f"config.data.tokenizer {spec!r}" if spec is not None else "the tokenizer"
        raise ValueError(f"{name} has {tokenizer.vocab_size} tokens but config.model.vocab_size is {vocab_size} "
                         f"(vocab mismatch): set --config.model.vocab_size={tokenizer.vocab_size} (or point "
                         f"data.tokenizer at the model's tokenizer)")


# --------------------------------------------------------------------------- training a SentencePiece model

TEXT_EXTS = (".txt", ".tex", ".md")


def collect_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(os.path.expanduser(item))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTS + (".jsonl",))
            if not found:
                raise ValueError(f"no .txt/.tex/.md/.jsonl files under {str(path)!r}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"tokenizer training input {str(path)!r} does not exist")
    if not files:
        raise ValueError("no tokenizer training input given")
    return files


def train_sentencepiece(inputs: list[str], vocab_size: int, output: str, *, text_field: str = "text",
                        **trainer_options) -> str:
    """Train a SentencePiece model on the inputs; returns the path of the .model file. `text_field`: the JSONL
    field holding the text. trainer_options: SentencePieceTrainer options over these defaults: model_type
    'unigram', character_coverage 0.9995, input_sentence_size 2,000,000, max_sentence_length 16384,
    num_threads (the CPU count)."""
    import sentencepiece as spm

    options = {**dict(model_type="unigram", character_coverage=0.9995, input_sentence_size=2_000_000,
                      max_sentence_length=16384, num_threads=os.cpu_count() or 1), **trainer_options}

    files = collect_files(inputs)
    out = Path(os.path.expanduser(output))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_files = []
        for i, path in enumerate(files):
            if path.suffix.lower() == ".jsonl":  # extract the text field into a plain file
                plain = Path(tmp) / f"{i}.txt"
                with open(path, encoding="utf-8") as src, open(plain, "w", encoding="utf-8") as dst:
                    for line in src:
                        if line.strip():
                            dst.write(json.loads(line)[text_field] + "\n")
                train_files.append(str(plain))
            else:
                train_files.append(str(path))
        spm.SentencePieceTrainer.Train(
            input=train_files, model_prefix=str(out), vocab_size=int(vocab_size), byte_fallback=True,
            # lossless for language modelling: keep newlines (byte fallback) and runs of spaces, digits split
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            shuffle_input_sentence=True, minloglevel=2, **options,
        )
    return str(out) + ".model"
