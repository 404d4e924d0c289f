"""BookSum-style summarisation data: JSONL records with a document and a summary.

Example = [bos] + encode(document) + encode(separator) + encode(summary) + [eos]; only the summary tokens and
the eos are scored (loss_mask 1), so the windows holding only the document (the left part of a long book) have
loss_mask 0 everywhere but still stream through the memory (same reset semantics as windows.py).
``data_dir`` is a .jsonl file, or a folder with train/validation/test subfolders (or flat) of .jsonl files.
"""

from __future__ import annotations

import numpy as np

from infini_jax.data.documents import DirectorySource, text_field
from infini_jax.data.windows import Example

DEFAULT_SEPARATOR = "\n\nSummary:\n"


class BookSumSource:
    """Random access (doc_id, document, summary) over JSONL records."""

    def __init__(self, data_dir, split: str | None = "train", *, document_field: str = "document",
                 summary_field: str = "summary"):
        self._src = DirectorySource(data_dir, split, extensions=(".jsonl",))
        self.document_field, self.summary_field = document_field, summary_field

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> tuple[str, str, str]:
        record = self._src.read_record(i)
        doc_id = self._src.doc_id(i)
        path = self._src.base
        return (doc_id, text_field(record, self.document_field, doc_id, path),
                text_field(record, self.summary_field, doc_id, path))


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def booksum_prompt(tokenizer, document: str, *, separator: str = DEFAULT_SEPARATOR,
                   max_document_tokens: int | None = None) -> np.ndarray:
    """[bos] + document (first max_document_tokens tokens, if set) + separator: the generation prompt."""
    doc_N = _encode(tokenizer, document)
    if max_document_tokens is not None:
        doc_N = doc_N[:max_document_tokens]
    return np.concatenate([[tokenizer.bos_id], doc_N, _encode(tokenizer, separator)]).astype(np.int32)


def booksum_example(tokenizer, document: str, summary: str, *, separator: str = DEFAULT_SEPARATOR,
                    max_document_tokens: int | None = None) -> Example:
    """(seq, score): score is 1 exactly on the summary tokens and the final eos."""
    prompt_P = booksum_prompt(tokenizer, document, separator=separator, max_document_tokens=max_document_tokens)
    summary_S = _encode(tokenizer, summary)
    seq_T = np.concatenate([prompt_P, summary_S, [tokenizer.eos_id]]).astype(np.int32)
    score_T = np.zeros(len(seq_T), np.float32)
    score_T[len(prompt_P):] = 1.0
    return seq_T, score_T


def rouge_scores(predictions: list[str], references: list[str],
                 types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")) -> dict[str, float]:
    """Mean ROUGE F1 (x100) over pairs, with the rouge-score package (stemming on, as in BookSum papers).

    rougeLsum splits on newlines (summary-level LCS); put one sentence per line for it to differ from rougeL.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = {t: 0.0 for t in types}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # score(target, prediction)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: 100.0 * v / len(predictions) for t, v in totals.items()}
