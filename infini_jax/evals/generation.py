"""Streaming generation from a prompt (`type="generate"`): by default a passkey prompt of about one training
input with the answer withheld, so the output can be read against `expected`."""

from __future__ import annotations

import time

import numpy as np

from infini_jax.evals.core import Evaluator, Subject


class Generate(Evaluator):
    """`max_new_tokens` tokens after `prompt` (None: a passkey prompt), greedy at temperature 0, else sampled
    with nucleus mass `top_p`, seeded by `seed`."""

    type = "generate"
    OPTIONS = dict(prompt=None, max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0)

    def run(self, subject: Subject, log=print) -> dict:
        from infini_jax.generate import Sampling, generate

        o, tok, model = self.options, subject.tokenizer, subject.model()
        answer = None
        if o["prompt"] is None:  # a passkey prompt of about one training input, answer withheld
            from infini_jax.data.passkey import PasskeyStream

            stream = PasskeyStream(tok, max(model.cfg.seq_len, 400), 0.5, seed=o["seed"], include_answer=False)
            ids = np.concatenate(list(stream))
            answer = tok.decode(stream.answer_ids.tolist())
        else:
            ids = np.asarray([tok.bos_id] + list(tok.encode(o["prompt"])), np.int32)
        t0 = time.time()
        sampling = Sampling(o["temperature"], o["top_p"], o["seed"], tok.eos_id)
        out_ids = generate(model, ids, o["max_new_tokens"], sampling, pad_id=tok.pad_id)
        ids_out = [int(t) for t in out_ids]
        if tok.eos_id in ids_out:
            ids_out = ids_out[:ids_out.index(tok.eos_id)]
        res = {"prompt": tok.decode(ids.tolist()), "prompt_tokens": int(len(ids)), "output": tok.decode(ids_out),
               "output_ids": ids_out, "seconds": time.time() - t0}
        if answer is not None:
            res["expected"] = answer
        how = "greedy" if o["temperature"] <= 0 else f"T={o['temperature']}, top_p={o['top_p']}"
        log(f"generate ({how}): ...{res['prompt'][-60:]!r} -> {res['output']!r}")
        return {self.name: res}
