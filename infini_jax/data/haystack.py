"""Book prose for the passkey prompt (`Haystack`), and the distractor numbers that training hides in it.

A real haystack holds numbers of its own (dates, chapters, prices: ~2,000 digits in a 1M-byte book). At 2^20
tokens those are hundreds of numbers in the memory beside the pass key, and a model that keys its reads on
"a number" rather than on "the number after 'The pass key is'" reads a blend of them. `insert_number` puts such
a number into a training row's prose (data.passkey_distractors), where memory-mass augmentation then repeats
it as often as its segment.
"""

from __future__ import annotations

import numpy as np


class Haystack:
    """Real prose to hide the passkey in: the .txt files in `directory` and its subfolders (sorted; `directory`
    may be gs://), tokenized once and joined by blank lines. `span(n, rng)` returns n tokens starting at a random
    word start (wrapping around at the end), and `insert_at(prose, k, tokenizer)` moves index k to a word start."""

    def __init__(self, tokenizer, directory):
        from etils import epath

        root = epath.Path(directory)
        files = sorted([*root.glob("*.txt"), *root.glob("*/*.txt")]) if root.is_dir() else []
        if not files:
            raise ValueError(f"passkey haystack {directory!r} holds no .txt files: point it at a folder of books")
        text = "\n\n".join(f.read_text() for f in files)
        self.ids_T = np.asarray(tokenizer.encode_np(text) if hasattr(tokenizer, "encode_np")
                                else tokenizer.encode(text), np.int32)
        self.starts_T = word_starts(tokenizer, self.ids_T)
        self.candidates_W = np.flatnonzero(self.starts_T)  # the W word starts, found once (per span: 164 ms a batch)
        self.lead = 0 if getattr(tokenizer, "space_prefix", False) else 1  # bytes: keep the whitespace before
        self.directory, self.n_files = str(directory), len(files)

    def span(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, np.int32)
        start = int(self.candidates_W[rng.integers(len(self.candidates_W))]) - self.lead
        idx_N = (start + np.arange(n)) % len(self.ids_T)
        return self.ids_T[idx_N]

    def insert_at(self, prose_N: np.ndarray, k: int, tokenizer) -> int:
        """The first word start at or after token k, else the last one before it."""
        starts = np.flatnonzero(word_starts(tokenizer, prose_N))
        after = starts[starts >= k]
        return int(after[0]) if len(after) else int(starts[-1]) if len(starts) else len(prose_N)


def word_starts(tokenizer, ids_T: np.ndarray) -> np.ndarray:
    """bool [T]: token i begins a word (bytes: the previous byte is whitespace; SentencePiece: a '▁' piece)."""
    offset = getattr(tokenizer, "offset", None)
    if offset is not None:
        prev_T = np.concatenate([[offset + ord(" ")], ids_T[:-1]]) - offset
        return np.isin(prev_T, [ord(" "), ord("\n"), ord("\t")]) & ~np.isin(ids_T - offset, [ord(" "), ord("\n")])
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None:
        marks_V = np.array([sp.IdToPiece(i).startswith("\u2581") for i in range(sp.GetPieceSize())])
        return marks_V[ids_T]
    return np.ones(len(ids_T), bool)


def insert_number(tokens_T: np.ndarray, allowed_T: np.ndarray, number_N: np.ndarray, lead: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(tokens_T with number_N inserted before one random word start where allowed_T, at the index it went in),
    or (tokens_T, -1) when allowed_T allows none. number_N carries its own whitespace in front (" 1850" in
    bytes, "▁1850" in SentencePiece), so it goes in `lead` tokens before the word start: "the 1850 year"."""
    starts = np.flatnonzero(allowed_T)
    if not len(starts):
        return tokens_T, -1
    at = int(starts[rng.integers(len(starts))]) - lead
    return np.concatenate([tokens_T[:at], number_N, tokens_T[at:]]), at
