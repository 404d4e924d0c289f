"""Long-document streaming windows (meliad-style) and a per-host, exactly resumable batcher.

An *example* is a token sequence ``seq`` (for text: [bos] + tokens + [eos]) with ``score[i]`` = the loss weight
of predicting ``seq[i]`` (score[0] is unused). It is cut into consecutive windows of L tokens:
window k has tokens = seq[kL : kL+L], targets = seq[kL+1 : kL+L+1], loss_mask = score[kL+1 : kL+L+1], the last
window padded with pad_id / loss_mask 0. There are ceil((len(seq)-1)/L) windows, so every target position is
produced exactly once.

``WindowIterator`` gives each of the B local rows one document at a time; a row streams its document window
after window (reset=True on the row's first window of a document, False afterwards) and then takes the next
document from the host's queue. Documents are split between hosts by position: host p takes the p-th, p+P-th,
... entry of the (possibly shuffled) order.
- eval (train=False): order 0..n-1, every document once; rows without a document emit padding (loss_mask 0,
  reset True); the iterator stops when every row is idle. For multi-host eval set num_batches so that all
  hosts take the same number of steps (padding after exhaustion; stops after num_batches).
- train (train=True): infinite; epoch e reads the documents in the order of Grain's seeded shuffle
  (`grain.MapDataset.range(n).shuffle(seed).repeat()`, a fresh permutation every epoch).
get_state() is a small JSON-able dict (epoch, queue cursor, per-row document and window); set_state() resumes
exactly (documents are re-tokenized on demand, which is deterministic).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import grain
import numpy as np

Example = tuple[np.ndarray, np.ndarray]  # (seq int32 [T], score float32 [T])


def text_example(tokenizer, text: str) -> Example:
    """[bos] + encode(text) + [eos] with every token after bos scored."""
    ids_N = np.asarray(tokenizer.encode_np(text) if hasattr(tokenizer, "encode_np") else tokenizer.encode(text),
                       dtype=np.int32)
    seq_T = np.concatenate([[tokenizer.bos_id], ids_N, [tokenizer.eos_id]]).astype(np.int32)
    score_T = np.ones(len(seq_T), dtype=np.float32)
    score_T[0] = 0.0
    return seq_T, score_T


def num_windows(seq_len_tokens: int, L: int) -> int:
    return max(1, -(-(seq_len_tokens - 1) // L))


def example_window(example: Example, k: int, L: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window k of an example: (tokens [L], targets [L], loss_mask [L])."""
    seq_T, score_T = example
    start = k * L
    tok = seq_T[start:start + L]
    tgt = seq_T[start + 1:start + L + 1]
    msk = score_T[start + 1:start + L + 1]
    tokens_L = np.full(L, pad_id, np.int32)
    targets_L = np.full(L, pad_id, np.int32)
    mask_L = np.zeros(L, np.float32)
    tokens_L[:len(tok)] = tok
    targets_L[:len(tgt)] = tgt
    mask_L[:len(msk)] = msk
    return tokens_L, targets_L, mask_L


def iter_example_windows(example: Example, L: int, pad_id: int):
    for k in range(num_windows(len(example[0]), L)):
        yield example_window(example, k, L, pad_id)


def host_documents(n_docs: int, *, train: bool, seed: int, epoch: int, process_index: int,
                   process_count: int) -> np.ndarray:
    """The document indices host process_index reads in the given epoch, in order."""
    if train:  # Grain's index shuffle: a new permutation for each epoch of the repeated range
        epochs = grain.MapDataset.range(n_docs).shuffle(seed=seed).repeat(epoch + 1)
        order = np.asarray(list(epochs[epoch * n_docs:(epoch + 1) * n_docs]), np.int64)
    else:
        order = np.arange(n_docs)
    return order[process_index::process_count]


@dataclasses.dataclass(frozen=True)
class Windows:
    """How a WindowIterator batches: `batch_size` rows (this host's) of `seq_len` tokens, padded with `pad_id`.
    train: the documents in a seeded (`seed`) shuffle, endlessly; else in order, once (or exactly `num_batches`
    batches). shard: (index, count), this host's place among the processes that read the data."""

    seq_len: int
    batch_size: int
    pad_id: int
    train: bool
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    num_batches: Optional[int] = None


class WindowIterator:
    def __init__(self, n_docs: int, example_fn: Callable[[int], Example], windows: Windows):
        process_index, process_count = windows.shard
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.n_docs, self.example_fn = int(n_docs), example_fn
        self.L, self.B, self.pad_id = int(windows.seq_len), int(windows.batch_size), int(windows.pad_id)
        self.train, self.seed = bool(windows.train), int(windows.seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.num_batches = windows.num_batches
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)
        if self.train and len(self._host_docs(0)) == 0:
            raise ValueError(f"host {process_index} of {process_count} gets no documents ({n_docs} in total); "
                             "use more documents or fewer processes")
        self.epoch, self.cursor, self.step = 0, 0, 0
        self.rows: list[list[int] | None] = [None] * self.B   # [doc_index, next_window, n_windows] or None
        self._cache: list[tuple[int, Example] | None] = [None] * self.B
        self.last_doc_index = np.full(self.B, -1, np.int64)  # which document each row of the last batch came from

    def _host_docs(self, epoch: int) -> np.ndarray:
        if self._order_epoch == epoch:
            return self._order
        order = host_documents(self.n_docs, train=self.train, seed=self.seed, epoch=epoch,
                               process_index=self.process_index, process_count=self.process_count)
        self._order_epoch, self._order = epoch, order
        return order

    def _next_doc(self) -> int | None:
        order = self._host_docs(self.epoch)
        if self.cursor >= len(order):
            if not self.train:
                return None
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self._host_docs(self.epoch)
        doc = int(order[self.cursor])
        self.cursor += 1
        return doc

    def _example(self, b: int, doc: int) -> Example:
        cached = self._cache[b]
        if cached is None or cached[0] != doc:
            ex = self.example_fn(doc)
            self._cache[b] = (doc, ex)
            return ex
        return cached[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.step >= self.num_batches:
            raise StopIteration
        B, L = self.B, self.L
        tokens_BL = np.full((B, L), self.pad_id, np.int32)
        targets_BL = np.full((B, L), self.pad_id, np.int32)
        mask_BL = np.zeros((B, L), np.float32)
        reset_B = np.ones(B, dtype=bool)
        doc_B = np.full(B, -1, np.int64)
        for b in range(B):
            row = self.rows[b]
            if row is None or row[1] >= row[2]:
                doc = self._next_doc()
                if doc is None:
                    self.rows[b] = None
                    self._cache[b] = None
                    continue
                ex = self._example(b, doc)
                row = self.rows[b] = [doc, 0, num_windows(len(ex[0]), L)]
            else:
                reset_B[b] = False
            ex = self._example(b, row[0])
            tokens_BL[b], targets_BL[b], mask_BL[b] = example_window(ex, row[1], L, self.pad_id)
            doc_B[b] = row[0]
            row[1] += 1
        if self.num_batches is None and not self.train and (doc_B < 0).all():
            raise StopIteration
        self.step += 1
        self.last_doc_index = doc_B
        return {"tokens": tokens_BL, "targets": targets_BL, "loss_mask": mask_BL, "reset": reset_B}

    # ---- exact resumption -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"n_docs": self.n_docs, "seq_len": self.L, "batch_size": self.B, "seed": self.seed,
                "train": self.train, "process_index": self.process_index, "process_count": self.process_count}

    def get_state(self) -> dict:
        return {"kind": "windows", **self._fingerprint(), "epoch": self.epoch, "cursor": self.cursor,
                "step": self.step, "rows": [None if r is None else [int(x) for x in r] for r in self.rows]}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "windows":
            raise ValueError(f"not a window iterator state: kind={state.get('kind')!r}")
        mismatch = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatch:
            raise ValueError(f"iterator state does not match this iterator (saved, current): {mismatch}")
        self.epoch, self.cursor, self.step = int(state["epoch"]), int(state["cursor"]), int(state["step"])
        self.rows = [None if r is None else [int(x) for x in r] for r in state["rows"]]
        self._cache = [None] * self.B
