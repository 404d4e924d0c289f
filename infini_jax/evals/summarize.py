"""BookSum-style evaluation (`type="summarize"`): generate a summary of each document with bounded memory,
score with ROUGE.

The document streams through the model segment by segment (infini_jax/generate.py), so a 500K-token book needs
no more memory than one segment; decoding follows the paper's setting by default (temperature 0.5, top-p 0.95).
"""

from __future__ import annotations

import time
from typing import Optional

from infini_jax.data.booksum import DEFAULT_SEPARATOR, BookSumSource, booksum_prompt, rouge_scores
from infini_jax.evals.core import Evaluator, Subject
from infini_jax.generate import generate


def summarize_and_score(model, tokenizer, data_cfg, *, split: str = "validation", max_docs: Optional[int] = None,
                        max_new_tokens: int = 1024, temperature: float = 0.5, top_p: float = 0.95,
                        seed: int = 0, log=print) -> dict:
    """Summaries for the first `max_docs` (document, summary) records of `split`; mean ROUGE-1/2/L/Lsum F1 x100."""
    if data_cfg.get("name") != "booksum":
        raise ValueError(f"the summarize task needs config.data.name='booksum', got {data_cfg.get('name')!r}")
    if not data_cfg.get("data_dir"):
        raise ValueError("the summarize task needs config.data.data_dir: a .jsonl file or folder of them")
    source = BookSumSource(data_cfg.data_dir, split, document_field=data_cfg.get("document_field", "document"),
                           summary_field=data_cfg.get("summary_field", "summary"))
    n = len(source) if max_docs is None else min(max_docs, len(source))
    predictions, references, records = [], [], []
    t0 = time.time()
    for i in range(n):
        doc_id, document, summary = source[i]
        prompt = booksum_prompt(tokenizer, document, separator=data_cfg.get("separator", DEFAULT_SEPARATOR),
                                max_document_tokens=data_cfg.get("max_document_tokens", None))
        ids = [int(t) for t in generate(model, prompt, max_new_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed + i, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)]
        if tokenizer.eos_id in ids:
            ids = ids[:ids.index(tokenizer.eos_id)]
        predictions.append(tokenizer.decode(ids))
        references.append(summary)
        records.append({"id": doc_id, "prompt_tokens": int(len(prompt)), "summary": predictions[-1]})
        log(f"summarized {doc_id} ({len(prompt):,} prompt tokens)")
    scores = rouge_scores(predictions, references)
    return {"rouge": scores, "documents": n, "records": records, "seconds": time.time() - t0,
            "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}


class Summarize(Evaluator):
    """BookSum: summaries of the first `max_docs` (None: all) records of `split`, scored with ROUGE."""

    type = "summarize"
    OPTIONS = dict(split="validation", max_docs=None, max_new_tokens=1024, temperature=0.5, top_p=0.95, seed=0)

    def run(self, subject: Subject, log=print) -> dict:
        res = summarize_and_score(subject.model(), subject.tokenizer, subject.config.data, log=log, **self.options)
        log("summarize ROUGE F1: " + ", ".join(f"{k} {v:.2f}" for k, v in res["rouge"].items()))
        return {self.name: res}
