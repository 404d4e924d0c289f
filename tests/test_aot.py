"""One small ahead-of-time TPU compile on this CPU host (infini_jax/aot.py): the tiny config's real train step
for a v5e 2x2 slice. The fit table of the paper-scale configs is benchmarks/compile_tpu.py (minutes).

conftest sets JAX_PLATFORMS=cpu: that only chooses the backend of ordinary arrays; the TPU topology
description and the XLA:TPU compiler come from libtpu regardless, so the test runs under the suite as is.
"""

import pytest

from infini_jax import aot
from infini_jax.config import load_config, model_config

def load(name, arg=None):
    return load_config(f"{name}:{arg}" if arg else name)


def test_topology_names():
    assert aot.parse_topology("v5e-16")["libtpu_name"] == "v5e:4x4"
    assert aot.parse_topology("v5e-32")["libtpu_name"] == "v5e:4x8"
    assert aot.parse_topology("v5p-8")["libtpu_name"] == "v5p:2x2x1"  # v5p-N counts TensorCores
    assert aot.parse_topology("v5p-128")["libtpu_name"] == "v5p:4x4x4"
    assert aot.parse_topology("v5p-128")["chips"] == 64
    assert aot.parse_topology("v4-8")["hbm_bytes"] == 32 * aot.GiB
    with pytest.raises(ValueError, match="unknown TPU topology"):
        aot.parse_topology("v9-8")


def test_analytic_flops_is_six_n_plus_attention():
    cfg = model_config(load("pg19"))
    f = aot.analytic_flops(cfg, tokens=1)
    d, v = cfg.d_model, cfg.vocab_size
    layer = 4 * d * d + 2 * d * cfg.d_ff  # attention projections + plain FFN
    assert f["matmul_params"] == cfg.num_layers * layer + d * v
    assert f["attention_fwd_per_token"] == cfg.num_layers * 4 * cfg.segment_len * d
    assert f["train_flops"] == 3 * (2 * f["matmul_params"] + f["attention_fwd_per_token"]
                                    + f["memory_fwd_per_token"])


def _libtpu_or_skip():
    try:
        from jax.experimental import topologies  # noqa: F401
        import libtpu  # noqa: F401
    except ImportError as e:
        pytest.skip(f"libtpu is not importable ({e}); install jax[tpu] for ahead-of-time TPU compiles")


def test_tiny_compiles_for_v5e_2x2():
    _libtpu_or_skip()
    config = load("tiny")
    report = aot.compile_for_topology(config, "v5e:2x2")
    print(aot.format_report(report))
    assert report["chips"] == 4 and "v5" in report["device_kind"].lower()
    for key in ("argument_bytes", "output_bytes", "generated_code_bytes", "total_bytes"):
        assert 0 < report[key] < report["hbm_bytes"], key
    assert 0 <= report["temp_bytes"] < report["hbm_bytes"]  # tiny: XLA may keep every temporary in VMEM
    assert report["fits"]
    # Parameters + optimizer state are arguments: at least the f32 params, replicated over data=4.
    assert report["argument_bytes"] >= 4 * report["params"]
    # Compiled FLOPs (per chip) vs 3 × forward of the analytical formula: same order of magnitude.
    assert 0.5 < report["flops_ratio"] < 2.5, report


def test_tiny_eval_step_compiles_for_v5e_2x2():
    """The eval step of eval.py and in-training evaluation (the memory streamed, sums per segment)."""
    _libtpu_or_skip()
    report = aot.compile_for_topology(load("tiny"), "v5e:2x2", step="eval")
    print(aot.format_report(report))
    assert report["step"] == "eval" and report["fits"] and report["chips"] == 4
    assert report["argument_bytes"] >= 4 * report["params"]  # f32 params (no optimizer state)
    assert report["alias_bytes"] > 0  # the memory is donated: updated in place
