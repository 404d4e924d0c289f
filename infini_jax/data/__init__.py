"""Data pipelines for infini-jax: tokenizers, passkey, documents, long-document windows, BookSum.

Every iterator yields per-host numpy batches in the contract format
{"tokens": int32 [B, L], "targets": int32 [B, L], "loss_mask": float32 [B, L], "reset": bool [B]}
with B = batch_size // process_count, and has get_state() -> JSON-able dict / set_state(dict).

``make_iterator(data_cfg, *, seq_len, batch_size, split, process_index=0, process_count=1, train=True)``
reads these fields of ``config.data`` (missing fields take the default shown):

common     name (required: 'passkey' | 'text' | 'pg19' | 'booksum'), tokenizer='byte' ('byte' or a
           SentencePiece .model path), seed=0 (train: document shuffling / passkey sampling),
           num_batches=None (eval only: yield exactly this many batches, padding after the data runs out;
           set it for multi-host eval so every host takes the same number of steps)
passkey    passkey_digits=5, passkey_min_len=None (total example length drawn from [min_len, seq_len+1];
           None = always seq_len+1), passkey_depth_min=0.0, passkey_depth_max=1.0,
           passkey_loss_on_all=False (True: loss on every non-pad token, not only the answer),
           passkey_intro=True (False drops the paper's intro sentence: ~150 fewer tokens for short windows; a
           number in [0, 1] is the probability that an example has it),
           passkey_haystack='' (a folder of .txt books: real prose replaces the filler; its `split` subfolder
           is used when there is one), passkey_mass_prob=0.0, passkey_mass_max=128 and passkey_mass_after=0
           (memory-mass augmentation in training from that batch on, see PasskeyIterator; needs
           make_iterator(segment_len=...)),
           eval_batches=4 (eval: number of batches when num_batches is unset; eval seed = seed + 1_000_003).
           No data_dir.
text       data_dir (required: folder with train/validation/test subfolders or flat; .txt/.tex/.md/.jsonl),
           text_field='text' (JSONL), extensions=('.txt', '.tex', '.md', '.jsonl')
pg19       data_dir (required: tensorflow-datasets data_dir holding the 'pg19' ArrayRecord build;
           build with `python -m infini_jax.data.documents build-pg19 --source DIR --data_dir OUT`)
booksum    data_dir (required: a .jsonl file, or folder of them as for 'text'), document_field='document',
           summary_field='summary', separator='\\n\\nSummary:\\n', max_document_tokens=None
"""

from __future__ import annotations

import grain

from infini_jax.data.booksum import BookSumSource, booksum_example, booksum_prompt, rouge_scores
from infini_jax.data.documents import DirectorySource, DocumentSource, PG19Source, build_pg19
from infini_jax.data.passkey import (Haystack, PasskeyExample, PasskeyIterator, PasskeyStream,
                                     make_passkey_example, passkey_text)
from infini_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, load_tokenizer
from infini_jax.data.windows import WindowIterator, example_window, iter_example_windows, text_example

VALID_NAMES = ("passkey", "text", "pg19", "booksum")

__all__ = [
    "BookSumSource", "ByteTokenizer", "DirectorySource", "DocumentSource", "Haystack", "PG19Source",
    "PasskeyExample",
    "PasskeyIterator", "PasskeyStream", "SentencePieceTokenizer", "VALID_NAMES", "WindowIterator",
    "booksum_example", "booksum_prompt", "build_pg19", "check_data_config", "example_window", "iter_example_windows",
    "load_tokenizer", "make_iterator", "make_passkey_example", "passkey_text", "rouge_scores", "text_example",
]


def _get(cfg, key, default):
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


_COMMON_KEYS = {"name", "tokenizer", "seed", "num_batches", "data_dir"}  # data_dir: unused by passkey
_KEYS = {
    "passkey": {"passkey_digits", "passkey_min_len", "passkey_depth_min", "passkey_depth_max",
                "passkey_loss_on_all", "passkey_intro", "passkey_haystack", "passkey_mass_prob",
                "passkey_mass_max", "passkey_mass_after", "eval_batches"},
    "text": {"text_field", "extensions"},
    "pg19": set(),
    "booksum": {"document_field", "summary_field", "separator", "max_document_tokens"},
}


def check_data_config(data_cfg) -> None:
    """A misspelt config.data key is an error (a silently ignored key trains on the wrong data). Keys that
    belong to another source are allowed, so `--config.data.name=text` works on a passkey config."""
    name = _get(data_cfg, "name", None)
    if name not in VALID_NAMES:
        raise ValueError(f"unknown data source config.data.name={name!r}; valid: {list(VALID_NAMES)}")
    keys = set(data_cfg.keys()) if hasattr(data_cfg, "keys") else set(vars(data_cfg))
    known = _COMMON_KEYS.union(*_KEYS.values())
    unknown = sorted(keys - known)
    if unknown:
        raise ValueError(f"config.data has unknown keys {unknown}; source {name!r} reads "
                         f"{sorted(_COMMON_KEYS | _KEYS[name])}")


def make_iterator(data_cfg, *, seq_len: int, batch_size: int, split: str, process_index: int = 0,
                  process_count: int = 1, train: bool = True, segment_len: int | None = None):
    """The per-host batch iterator for config.data (see the module docstring for the fields read).
    segment_len: the model's, for sources that mark segments (passkey memory-mass augmentation)."""
    check_data_config(data_cfg)
    name = _get(data_cfg, "name", None)
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    local_batch = batch_size // process_count
    tokenizer = load_tokenizer(_get(data_cfg, "tokenizer", "byte"))
    seed = int(_get(data_cfg, "seed", 0))
    num_batches = _get(data_cfg, "num_batches", None) if not train else None

    if name == "passkey":
        if not train and num_batches is None:
            num_batches = int(_get(data_cfg, "eval_batches", 4))
        haystack = _get(data_cfg, "passkey_haystack", "")
        if haystack:
            from etils import epath

            sub = epath.Path(haystack) / split
            haystack = Haystack(tokenizer, sub if sub.is_dir() else haystack)
        return PasskeyIterator(
            tokenizer, seq_len=seq_len, batch_size=local_batch,
            seed=seed if train else seed + 1_000_003, process_index=process_index,
            n_digits=int(_get(data_cfg, "passkey_digits", 5)),
            min_len=_get(data_cfg, "passkey_min_len", None),
            depth_min=float(_get(data_cfg, "passkey_depth_min", 0.0)),
            depth_max=float(_get(data_cfg, "passkey_depth_max", 1.0)),
            loss_on_all=bool(_get(data_cfg, "passkey_loss_on_all", False)),
            intro=float(_get(data_cfg, "passkey_intro", True)), num_batches=num_batches, haystack=haystack or None,
            segment_len=segment_len, mass_prob=float(_get(data_cfg, "passkey_mass_prob", 0.0)) if train else 0.0,
            mass_max=float(_get(data_cfg, "passkey_mass_max", 128.0)),
            mass_after=int(_get(data_cfg, "passkey_mass_after", 0)))

    data_dir = _get(data_cfg, "data_dir", None)
    if name == "text":
        source = DirectorySource(data_dir, split, text_field=_get(data_cfg, "text_field", "text"),
                                 extensions=tuple(_get(data_cfg, "extensions", (".txt", ".tex", ".md", ".jsonl"))))
    elif name == "pg19":
        source = PG19Source(data_dir, split)  # tfds.data_source: ArrayRecord, random access, no TensorFlow
    if name in ("text", "pg19"):
        def to_example(record):
            return text_example(tokenizer, record[1])
    else:  # booksum
        source = BookSumSource(data_dir, split, document_field=_get(data_cfg, "document_field", "document"),
                               summary_field=_get(data_cfg, "summary_field", "summary"))
        separator = _get(data_cfg, "separator", "\n\nSummary:\n")
        max_doc = _get(data_cfg, "max_document_tokens", None)

        def to_example(record):
            _, document, summary = record
            return booksum_example(tokenizer, document, summary, separator=separator, max_document_tokens=max_doc)

    # documents -> tokens as a Grain MapDataset: random access by document index, tokenized lazily
    docs = grain.MapDataset.source(source).map(to_example)
    n_docs, example_fn = len(docs), docs.__getitem__
    return WindowIterator(n_docs, example_fn, seq_len=seq_len, batch_size=local_batch, pad_id=tokenizer.pad_id,
                          train=train, seed=seed, process_index=process_index, process_count=process_count,
                          num_batches=None if num_batches is None else int(num_batches))
