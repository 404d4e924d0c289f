"""Passkey retrieval to 2^20 tokens after training on short inputs (the tiny config), linear vs delta, with the
memory knock-out; on the paper's filler or hidden in book prose.

    python experiments/passkey_1m.py --out runs/passkey_1m                          # the paper's filler
    python experiments/passkey_1m.py --out runs/passkey_books --rules linear --steps 18000 \
        --haystack ../shared/corpus/pg19 --config.train.seed=1
        # trains on prose from DIR/train, evaluates on prose from DIR/test (--eval_haystack to change it);
        # 18,000 steps: 100% at 2^20 (README Evidence a; 6,000 steps: 86-98%)
    python experiments/passkey_1m.py --out runs/passkey_books --eval_only --eval_haystack OTHER_BOOKS
    python experiments/passkey_1m.py --out runs/passkey_books --eval_only --strip_digits   # prose without numbers
    python experiments/passkey_1m.py --out runs/m4096 --rules linear --config.data.passkey_mass_max=4096
        # any --config.<section>.<key>=value of the tiny config, applied after --steps' rescaling

With --haystack, training hides random numbers in its prose from the mass phase on, a Poisson count of 0.5 per
row on average (data.passkey_distractors=0.5; --config.data.passkey_distractors=0 turns it off): book prose holds
numbers of its own, and the key line's must be told apart from them.

Writes OUT/results.json, OUT/passkey_1m.md (digit accuracy tables), OUT/passkey_<rule>.png heatmaps and
OUT/gates_<rule>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

K, M = 1024, 2**20


def parse_length(s: str) -> int:
    s = s.strip().upper()
    return int(s[:-1]) * (M if s.endswith("M") else K) if s[-1] in "KM" else int(s)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/passkey_1m")
    p.add_argument("--rules", default="linear,delta")
    p.add_argument("--haystack", default="", help="folder of books: train on DIR/train prose (and evaluate on "
                   "DIR/test unless --eval_haystack)")
    p.add_argument("--eval_haystack", default=None)
    p.add_argument("--strip_digits", action="store_true", help="evaluate in the eval haystack with every digit "
                   "removed (a diagnostic: how much of the loss the prose's own numbers cause)")
    p.add_argument("--steps", type=int, default=None, help="default: the tiny config's")
    p.add_argument("--lengths", default="1K,4K,16K,64K,256K,1M")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--knockout", default="linear", help="rules whose memory knock-out is evaluated")
    p.add_argument("--knockout_lengths", default="1K,4K,16K,64K", help="lengths of the knock-out sweep")
    p.add_argument("--eval_only", action="store_true")
    a, overrides = p.parse_known_args()  # and --config.<section>.<key>=value: any tiny-config key, applied last
    if bad := [o for o in overrides if not o.startswith("--config.")]:
        p.error(f"unknown arguments {bad}")
    from infini_jax.config import apply_overrides
    from infini_jax.configs.tiny import get_config
    from infini_jax.sharding import choose_platform, set_cpu_devices

    choose_platform()  # no libtpu start-up noise on a CPU host
    set_cpu_devices(get_config().train.cpu_devices)  # the tiny config's, before JAX uses a device

    import jax

    from infini_jax import evals as ev
    from infini_jax import plots
    from infini_jax.data import Haystack, load_tokenizer
    from infini_jax.model import gate_values
    from infini_jax.loop import train_and_evaluate

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("byte")
    lengths = [parse_length(x) for x in a.lengths.split(",")]
    depths = [float(x) for x in a.depths.split(",")]
    eval_dir = a.eval_haystack if a.eval_haystack is not None else (
        str(Path(a.haystack) / "test") if a.haystack and (Path(a.haystack) / "test").is_dir() else a.haystack)
    if a.strip_digits:
        if not eval_dir:
            p.error("--strip_digits needs a prose haystack (--haystack or --eval_haystack)")
        eval_dir = strip_digits(eval_dir, out / "haystack_without_digits")
    haystack = Haystack(tok, eval_dir) if eval_dir else None
    results = {"lengths": lengths, "depths": depths, "trials": a.trials, "haystack_train": a.haystack,
               "haystack_eval": eval_dir, "rules": {}}
    lines = []
    for rule in a.rules.split(","):
        config = get_config(f"rule={rule}")
        config.data.passkey_haystack = a.haystack
        if a.haystack:  # prose already puts the key line at every offset; the shift's tail is the paper's filler
            config.data.passkey_shift = 0.0
            # prose holds numbers of its own, hundreds in 2^20 tokens: train the key line's apart from them, once
            # retrieval is learnt (from the start, the distractors kept a seed that learns it without them at 0.60)
            config.data.update(passkey_distractors=0.5, passkey_distractors_after=config.data.passkey_mass_after)
        config.evals.passkey.x = ()  # this script evaluates
        if a.steps:  # the shift and mass-augmentation phases keep their share of training
            for key in ("passkey_mass_after", "passkey_shift_after", "passkey_distractors_after"):
                config.data[key] = int(round(a.steps * config.data[key] / config.train.steps))
            config.train.steps = a.steps
        config = apply_overrides(config, overrides)
        workdir = out / rule
        r = results["rules"][rule] = {}
        if not a.eval_only:
            t0 = time.time()
            train_and_evaluate(config, workdir, progress=False)
            r["train_seconds"] = round(time.time() - t0, 1)
        model, info = ev.load_model(config, workdir=workdir)
        r["step"], r["gates"] = info["step"], jax.device_get(gate_values(model)).tolist()
        for tag, m in (("memory", model), ("knockout", ev.knockout_model(model))):
            if tag == "knockout" and rule not in a.knockout.split(","):
                continue
            t0 = time.time()
            ls = lengths if tag == "memory" else [parse_length(x) for x in a.knockout_lengths.split(",")]
            sweep = ev.passkey_sweep(m, tok, ls, depths, trials=a.trials, seed=777, haystack=haystack)
            r[tag] = sweep
            text = f"{rule}, {tag}: " + ev.format_passkey(sweep)
            print(text, f"\n({time.time() - t0:.0f} s)", flush=True)
            lines.append(text)
            title = f"{rule}{' (memory knocked out)' if tag == 'knockout' else ''}: digit accuracy (%)"
            plots.passkey_heatmap(sweep, out / f"passkey_{rule}{'_knockout' if tag == 'knockout' else ''}.png",
                                  title=title)
        plots.gate_plot(r["gates"], out / f"gates_{rule}.png", title=f"Gates after passkey training ({rule})")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "passkey_1m.md").write_text("\n\n".join(lines) + "\n")


def strip_digits(src: str, dst: Path) -> str:
    """A copy of the .txt books under src (and its subfolders) with every digit removed, in dst."""
    from etils import epath

    root = epath.Path(src)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted([*root.glob("*.txt"), *root.glob("*/*.txt")]):
        (dst / f"{f.parent.name}_{f.name}").write_text(f.read_text().translate(str.maketrans("", "", "0123456789")))
    return str(dst)


if __name__ == "__main__":
    main()
