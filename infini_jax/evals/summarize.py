"""BookSum-style evaluation (`type="summarize"`): generate a summary of each document with bounded memory,
score with ROUGE.

The document streams through the model segment by segment (infini_jax/generate.py), so a 500K-token book needs
no more memory than one segment; decoding follows the paper's setting by default (temperature 0.5, top-p 0.95).
"""

from __future__ import annotations

import time
from typing import Mapping, Optional

from infini_jax.data.booksum import DEFAULT_SEPARATOR, BookSumSource, booksum_prompt, rouge_scores
from infini_jax.evals.core import Evaluator, Subject
from infini_jax.generate import Sampling, generate


def summarize_and_score(model, tokenizer, data_cfg, options: Optional[Mapping] = None, log=print) -> dict:
    """Summaries for the first `max_docs` (document, summary) records of `split`; mean ROUGE-1/2/L/Lsum F1 x100.
    options: Summarize.OPTIONS's keys (split, max_docs, max_new_tokens, temperature, top_p, seed); the rest
    keep their defaults there."""
    o = Summarize("summarize", **(options or {})).options  # an unknown key fails here
    if data_cfg.get("name") != "booksum":
        raise ValueError(f"the summarize task needs config.data.name='booksum', got {data_cfg.get('name')!r}")
    if not data_cfg.get("data_dir"):
        raise ValueError("the summarize task needs config.data.data_dir: a .jsonl file or folder of them")
    source = BookSumSource(data_cfg.data_dir, o["split"], document_field=data_cfg.get("document_field", "document"),
                           summary_field=data_cfg.get("summary_field", "summary"))
    n = len(source) if o["max_docs"] is None else min(o["max_docs"], len(source))
    predictions, references, records = [], [], []
    t0 = time.time()
    for i in range(n):
        doc_id, document, summary = source[i]
        prompt = booksum_prompt(tokenizer, document, separator=data_cfg.get("separator", DEFAULT_SEPARATOR),
                                max_document_tokens=data_cfg.get("max_document_tokens", None))
        sampling = Sampling(o["temperature"], o["top_p"], o["seed"] + i, tokenizer.eos_id)
        ids = [int(t) for t in generate(model, prompt, o["max_new_tokens"], sampling, pad_id=tokenizer.pad_id)]
        if tokenizer.eos_id in ids:
            ids = ids[:ids.index(tokenizer.eos_id)]
        predictions.append(tokenizer.decode(ids))
        references.append(summary)
        records.append({"id": doc_id, "prompt_tokens": int(len(prompt)), "summary": predictions[-1]})
        log(f"summarized {doc_id} ({len(prompt):,} prompt tokens)")
    scores = rouge_scores(predictions, references)
    return {"rouge": scores, "documents": n, "records": records, "seconds": time.time() - t0,
            "temperature": o["temperature"], "top_p": o["top_p"], "max_new_tokens": o["max_new_tokens"]}


class Summarize(Evaluator):
    """BookSum: summaries of the first `max_docs` (None: all) records of `split`, scored with ROUGE."""

    type = "summarize"
    OPTIONS = dict(split="validation", max_docs=None, max_new_tokens=1024, temperature=0.5, top_p=0.95, seed=0)

    def run(self, subject: Subject, log=print) -> dict:
        res = summarize_and_score(subject.model(), subject.tokenizer, subject.config.data, self.options, log)
        log("summarize ROUGE F1: " + ", ".join(f"{k} {v:.2f}" for k, v in res["rouge"].items()))
        return {self.name: res}
