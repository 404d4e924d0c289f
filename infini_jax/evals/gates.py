"""The gates sigmoid(β) per layer and head (`type="gates"`; the paper's Figure 3), read by model.gate_values."""

from __future__ import annotations

import jax
import numpy as np

from infini_jax import sharding as shd
from infini_jax.evals.core import Evaluator, Subject
from infini_jax.model import gate_values


class Gates(Evaluator):
    """Results: {name: [layer][head] of sigmoid(β)}; nothing for a model without Infini-attention gates."""

    type = "gates"
    OPTIONS = {}

    def run(self, subject: Subject, log=print) -> dict:
        if subject.model_cfg.attention != "infini":
            return {}
        gates_lh = jax.jit(gate_values, out_shardings=shd.replicated(subject.mesh))(subject.params)
        gates = np.asarray(jax.device_get(gates_lh)).tolist()
        log("gates sigmoid(beta) [layer][head]: " + "; ".join(" ".join(f"{g:.2f}" for g in row) for row in gates))
        return {self.name: gates}

    def scalars(self, results: dict) -> dict:
        return {f"layer{layer}/head{h}": g for layer, heads in enumerate(results.get(self.name, []))
                for h, g in enumerate(heads)}
