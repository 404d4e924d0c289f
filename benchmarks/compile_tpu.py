"""Do the paper-scale configs fit a TPU slice? Ahead-of-time compiles of the real train step on a CPU host.

    python benchmarks/compile_tpu.py                    # every row, markdown table on stdout
    python benchmarks/compile_tpu.py --only 8b --out benchmarks/results/compile_tpu.md

Each row runs `python -m infini_jax.aot` in its own process (an out-of-memory is a compile error there; a
hung or crashed compile cannot take the table down) and reports per-chip bytes from
compiled.memory_analysis() (arguments + outputs − aliased + temporaries + code) against the chip's HBM, and
per-chip FLOPs of one step from compiled.cost_analysis() next to the analytical count of infini_jax/aot.py
(3 × forward = 6·N·tokens + attention + memory terms; remat adds a 4th forward, so ≈ ×1.33 is expected).
Needs libtpu (pip install "jax[tpu]"); no TPU. Compiles take minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3

# (key, what, config spec, topology, extra --set overrides)
ROWS = [
    ("lm", "paper LM, PG19 (linear)", "pg19:rule=linear", "v5e-32", []),
    ("lm-delta", "paper LM, PG19 (delta)", "pg19:rule=delta", "v5e-32", []),
    ("1b-v5e", "1B passkey, pretrain 4K", "passkey_1b:stage=pretrain", "v5e-16", []),
    ("1b-v5e-accum2", "1B passkey, pretrain 4K, 2 microbatches", "passkey_1b:stage=pretrain", "v5e-16",
     ["optim.grad_accum=2"]),
    ("1b-v5p", "1B passkey, pretrain 4K", "passkey_1b:stage=pretrain", "v5p-8", []),
    ("1b-ft", "1B passkey, fine-tune 6K", "passkey_1b:stage=finetune,rule=delta", "v5p-8", []),
    ("8b", "8B BookSum, fine-tune 32K", "booksum_8b:stage=finetune", "v5p-128", []),
]


def run_row(spec: str, topology: str, overrides: list[str], timeout: float, out: Path) -> dict:
    """Compiles one row in a subprocess; its report (or error) is also kept in `out` (JSON)."""
    if out.exists():
        return json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.txt"
        cmd = [sys.executable, "-m", "infini_jax.aot", "--config", spec, "--topology", topology,
               "--json", str(out)] + [f"--set={o}" for o in overrides]
        env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
        t0 = time.time()
        with log.open("w") as f:
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                return {"error": f"compile did not finish in {timeout:.0f} s"}  # not cached: may be retried
        if out.exists():
            return json.loads(out.read_text())
        text = log.read_text()
    lines = [ln for ln in text.splitlines()
             if any(w in ln for w in ("RESOURCE_EXHAUSTED", "Ran out of memory", "Error", "error"))]
    oom = [ln for ln in lines if "memory" in ln.lower()]
    result = {"error": ((oom or lines or ["exit code %d" % proc.returncode])[-1])[:400],
              "seconds": time.time() - t0}
    out.write_text(json.dumps(result))
    return result


def table(rows: list[tuple[str, str, str, list, dict]]) -> str:
    head = ("| experiment | topology (chips) | mesh | params | batch × length | per-chip: args / temp / total | "
            "HBM | fits | compiled FLOPs/chip | analytical FLOPs/chip (×ratio) | compile s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for what, spec, topology, overrides, r in rows:
        note = f" [{', '.join(overrides)}]" if overrides else ""
        if "error" in r:
            out.append(f"| {what}{note} | {topology} | | | | | | **no**: {r['error']} | | | |")
            continue
        mesh = "×".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        out.append(
            f"| {what}{note} | {topology} ({r['chips']}) | {mesh} | {r['params'] / 1e9:.3f}B | "
            f"{r['batch_size']} × {r['seq_len']} | {g(r['argument_bytes'])} / {g(r['temp_bytes'])} / "
            f"**{g(r['total_bytes'])} GiB** | {r['hbm_bytes'] / GiB:.0f} GiB | {'yes' if r['fits'] else '**no**'} | "
            f"{r['compiled_flops_per_chip']:.3e} | {r['analytic_flops_per_chip']:.3e} (×{r['flops_ratio']:.2f}) | "
            f"{r['compile_seconds']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated row keys: " + ", ".join(r[0] for r in ROWS))
    p.add_argument("--out", default="", help="also write the markdown here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
    p.add_argument("--set", action="append", default=[], help="override for every row, e.g. model.num_layers=4")
    p.add_argument("--jobs", type=int, default=1, help="compiles at a time (each uses ~2-8 GB of RAM)")
    p.add_argument("--reports", default=str(REPO / "benchmarks" / "results" / "compile_tpu"),
                   help="per-row JSON reports; a row whose report exists is not compiled again")
    a = p.parse_args(argv)
    keys = set(filter(None, a.only.split(",")))
    rows = [(k, w, s, t, o + a.set) for k, w, s, t, o in ROWS if not keys or k in keys]
    suffix = ("-" + "-".join(x.replace("=", "").replace(".", "_") for x in a.set)) if a.set else ""

    def one(row):
        key, what, spec, topology, overrides = row
        print(f"compiling {what} ({spec}) for {topology} ...", file=sys.stderr, flush=True)
        r = run_row(spec, topology, overrides, a.timeout, Path(a.reports) / f"{key}{suffix}.json")
        print(f"  {key} -> {r.get('error') or ('fits' if r['fits'] else 'does not fit')}", file=sys.stderr,
              flush=True)
        return (what, spec, topology, overrides, r)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(a.jobs, 1)) as pool:
        results = list(pool.map(one, rows))
    md = table(results)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md + "\n")
    print(md)
    return results


if __name__ == "__main__":
    main()
