"""Data pipelines for infini-jax: tokenizers, passkey, documents, long-document windows, BookSum.

Every iterator yields per-host numpy batches in the contract format
{"tokens": int32 [B, L], "targets": int32 [B, L], "loss_mask": float32 [B, L], "reset": bool [B]}
with B = batch_size // process_count, and has get_state() -> JSON-able dict / set_state(dict).

``make_iterator(data_cfg, *, seq_len, batch_size, split, shard=(0, 1), train=True, segment_len=None)``
reads ``config.data``; every key, its default and its meaning is in infini_jax/configs/base.py (and the
README's table). By source:

common     name ('passkey' | 'text' | 'pg19' | 'booksum'), tokenizer, seed, num_batches (eval only)
passkey    passkey_* (generated examples; memory-mass augmentation needs make_iterator(segment_len=...)),
           eval_batches. No data_dir.
text       data_dir (folder with train/validation/test subfolders or flat; .txt/.tex/.md/.jsonl), text_field,
           extensions
pg19       data_dir (tensorflow-datasets data_dir holding the 'pg19' ArrayRecord build; build with
           `python -m infini_jax.data.documents build-pg19 --source DIR --data_dir OUT`)
booksum    data_dir (a .jsonl file, or folder of them as for 'text'), document_field, summary_field, separator,
           max_document_tokens
"""

from __future__ import annotations

import dataclasses

import grain

from infini_jax.data.booksum import BookSumSource, booksum_example, booksum_prompt, rouge_scores
from infini_jax.data.documents import DirectorySource, DocumentSource, PG19Source, build_pg19
from infini_jax.data.passkey import (Haystack, PasskeyExample, PasskeyIterator, PasskeyStream,
                                     make_passkey_example, passkey_text)
from infini_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, load_tokenizer
from infini_jax.data.windows import WindowIterator, Windows, example_window, iter_example_windows, text_example

VALID_NAMES = ("passkey", "text", "pg19", "booksum")

__all__ = [
    "BookSumSource", "ByteTokenizer", "DirectorySource", "DocumentSource", "Haystack", "PG19Source",
    "PasskeyExample",
    "PasskeyIterator", "PasskeyStream", "SentencePieceTokenizer", "VALID_NAMES", "WindowIterator", "Windows",
    "booksum_example", "booksum_prompt", "build_pg19", "check_data_config", "example_window", "iter_example_windows",
    "load_tokenizer", "make_iterator", "prefetched", "make_passkey_example", "passkey_text", "rouge_scores", "text_example",
]


def check_data_config(data_cfg) -> dict:
    """config.data as a dict with the base config's defaults filled in. A misspelt key is an error (a silently
    ignored key trains on the wrong data); keys of another source are allowed (`--config.data.name=text` works
    on a passkey config)."""
    from infini_jax.config import defaults, with_defaults

    d = with_defaults("data", data_cfg, defaults("data"))
    if d["name"] not in VALID_NAMES:
        raise ValueError(f"unknown data source config.data.name={d['name']!r}; valid: {list(VALID_NAMES)}")
    return d


def make_iterator(data_cfg, *, seq_len: int, batch_size: int, split: str, shard: tuple[int, int] = (0, 1),
                  train: bool = True, segment_len: int | None = None):
    """The per-host batch iterator for config.data (see the module docstring for the fields read): this host's
    rows of the global `batch_size`, shard = (index, count) as sharding.data_shard gives it.
    segment_len: the model's, for sources that mark segments (passkey memory-mass augmentation).
    Training iterators run data.prefetch batches ahead on a background thread (see `prefetched`)."""
    d = check_data_config(data_cfg)
    process_count = shard[1]
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    tokenizer = load_tokenizer(d["tokenizer"])
    windows = Windows(seq_len=seq_len, batch_size=batch_size // process_count, pad_id=tokenizer.pad_id, train=train,
                      seed=int(d["seed"]), shard=tuple(shard), num_batches=d["num_batches"] if not train else None)
    it = _source_iterator(d, tokenizer, split, windows, segment_len)
    return prefetched(it, int(d["prefetch"])) if train and int(d["prefetch"]) > 0 else it


def prefetched(iterator, buffer_size: int):
    """`iterator` (next / get_state / set_state) run `buffer_size` batches ahead on a background thread, so
    tokenising a new book overlaps the device step. Grain's ThreadPrefetchDatasetIterator does it, and its
    get_state() is the state after the batch last handed out (not the one last prepared), so resumption stays
    exact. What it wraps is still ours: Grain's batching takes consecutive elements, while meliad-style
    streaming keeps every row on its own document across steps, which needs the per-row state of
    WindowIterator (and PasskeyIterator's step-seeded examples)."""
    return grain.experimental.ThreadPrefetchDatasetIterator(iterator, buffer_size)


def _source_iterator(d: dict, tokenizer, split: str, windows: Windows, segment_len: int | None):
    """config.data's source as an iterator of this host's batches, cut as `windows` says."""
    name, train, seed, num_batches = d["name"], windows.train, windows.seed, windows.num_batches
    if name == "passkey":
        if not train and num_batches is None:
            num_batches = int(d["eval_batches"])
        haystack = d["passkey_haystack"]
        if haystack:
            from etils import epath

            sub = epath.Path(haystack) / split
            haystack = Haystack(tokenizer, sub if sub.is_dir() else haystack)
        return PasskeyIterator(
            tokenizer, seq_len=windows.seq_len, batch_size=windows.batch_size,
            seed=seed if train else seed + 1_000_003, process_index=windows.shard[0],
            n_digits=int(d["passkey_digits"]), min_len=d["passkey_min_len"],
            depth_min=float(d["passkey_depth_min"]), depth_max=float(d["passkey_depth_max"]),
            loss_on_all=bool(d["passkey_loss_on_all"]), intro=float(d["passkey_intro"]), num_batches=num_batches,
            haystack=haystack or None, segment_len=segment_len,
            mass_prob=float(d["passkey_mass_prob"]) if train else 0.0, mass_max=float(d["passkey_mass_max"]),
            mass_after=int(d["passkey_mass_after"]), loss_on_key=bool(d["passkey_loss_on_key"]) and train,
            shift=float(d["passkey_shift"]) if train else 0.0,
            shift_after=int(d["passkey_shift_after"]),
            distractors=float(d["passkey_distractors"]) if train else 0.0,
            distractors_after=int(d["passkey_distractors_after"]))

    data_dir = d["data_dir"]
    if name == "text":
        source = DirectorySource(data_dir, split, text_field=d["text_field"], extensions=tuple(d["extensions"]))
    elif name == "pg19":
        source = PG19Source(data_dir, split)  # tfds.data_source: ArrayRecord, random access, no TensorFlow
    if name in ("text", "pg19"):
        def to_example(record):
            return text_example(tokenizer, record[1])
    else:  # booksum
        source = BookSumSource(data_dir, split, document_field=d["document_field"], summary_field=d["summary_field"])
        separator, max_doc = d["separator"], d["max_document_tokens"]

        def to_example(record):
            _, document, summary = record
            return booksum_example(tokenizer, document, summary, separator=separator, max_document_tokens=max_doc)

    # documents -> tokens as a Grain MapDataset: random access by document index, tokenized lazily
    docs = grain.MapDataset.source(source).map(to_example)
    n_docs, example_fn = len(docs), docs.__getitem__
    if num_batches is not None:
        windows = dataclasses.replace(windows, num_batches=int(num_batches))
    return WindowIterator(n_docs, example_fn, windows)
