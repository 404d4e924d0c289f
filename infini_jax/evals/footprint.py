"""Memory footprint per sequence of each design (`type="footprint"`; the paper's Table 1)."""

from __future__ import annotations

from typing import Sequence

from infini_jax.evals.core import Evaluator, Subject
from infini_jax.model import ModelConfig


def memory_footprint(cfg: ModelConfig, input_lens: Sequence[int] | int | None = None) -> dict:
    """Numbers each design keeps per sequence (one batch row), summed over layers (paper Table 1).

    infini:   d_key × (d_value + 1) × G × layers (M and z), whatever the input length
    xl:       (d_key + d_value) × G × N × layers (keys and values of one segment of N tokens)
    full@T:   (d_key + d_value) × G × T × layers (keys and values of the whole input of T tokens)
    G counts key/value heads (= num_kv_heads under grouped-query attention: memory and caches are per KV head).
    """
    dk = dv = cfg.head_dim
    g, n, layers = cfg.kv_heads, cfg.segment_len, cfg.num_layers
    lens = [cfg.seq_len] if input_lens is None else ([input_lens] if isinstance(input_lens, int) else input_lens)
    infini = dk * (dv + 1) * g * layers
    rows = {
        "infini": {"numbers": infini, "formula": "d_key*(d_value+1)*H*layers"},
        "xl": {"numbers": (dk + dv) * g * n * layers, "formula": "(d_key+d_value)*H*N*layers"},
    }
    for t in lens:
        rows[f"full@{int(t)}"] = {"numbers": (dk + dv) * g * int(t) * layers,
                                  "formula": f"(d_key+d_value)*H*T*layers, T={int(t)}"}
    for row in rows.values():
        row["x_infini"] = row["numbers"] / infini
        row["mbytes_float32"] = row["numbers"] * 4 / 2**20
    return {"config": {"head_dim": dk, "num_heads": g, "segment_len": n, "num_layers": layers}, "rows": rows}


def format_footprint(fp: dict) -> str:
    c = fp["config"]
    lines = [f"Memory footprint per sequence (d_key=d_value={c['head_dim']}, H={c['num_heads']}, "
             f"N={c['segment_len']}, layers={c['num_layers']})",
             f"  {'model':<14}{'numbers':>16}{'MB (f32)':>11}{'x infini':>10}  formula"]
    for name, row in fp["rows"].items():
        lines.append(f"  {name:<14}{row['numbers']:>16,}{row['mbytes_float32']:>11.2f}"
                     f"{row['x_infini']:>10.1f}  {row['formula']}")
    return "\n".join(lines)


class Footprint(Evaluator):
    """Table 1 for this model at its training length and `lengths` tokens."""

    type = "footprint"
    OPTIONS = dict(lengths=())

    def run(self, subject: Subject, log=print) -> dict:
        cfg = subject.model_cfg
        fp = memory_footprint(cfg, sorted({cfg.seq_len, *map(int, self.options["lengths"])}))
        log(format_footprint(fp))
        return {self.name: fp}
