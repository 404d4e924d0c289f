"""Tokenizers: a byte-level tokenizer and a SentencePiece wrapper with one interface.

Interface (CONTRACT.md): vocab_size, pad_id, bos_id, eos_id, encode(str) -> list[int], decode(list[int]) -> str.
Extras used by the data pipelines: encode_np(str) -> int32 array (fast path for whole books) and
``space_prefix``: True when encode() itself puts a word-boundary marker in front of the text (SentencePiece's
dummy prefix), False when a separating space must be written out (bytes). The passkey builder uses it to join
independently encoded pieces of text so that they decode to the pieces joined by single spaces.
"""

from __future__ import annotations

import os
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
                "path of a SentencePiece .model file (train one with `python -m infini_jax.tokenizer train`)."
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


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def load_tokenizer(spec) -> Tokenizer:
    """'byte' (or None) -> ByteTokenizer; a path to a SentencePiece .model -> SentencePieceTokenizer.

    An empty string is an error (configs use "" as "must be set"), so a forgotten tokenizer never silently
    becomes bytes. An object that already looks like a tokenizer (has encode/decode) is returned unchanged.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("byte", "bytes")):
        return ByteTokenizer()
    if isinstance(spec, str) and not spec.strip():
        raise ValueError("config.data.tokenizer is empty: set it to 'byte' or to the path of a SentencePiece "
                         ".model file (train one with `python -m infini_jax.tokenizer train`)")
    if hasattr(spec, "encode") and hasattr(spec, "decode") and not isinstance(spec, (str, bytes)):
        return spec
    return SentencePieceTokenizer(spec)
