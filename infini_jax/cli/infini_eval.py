"""Evaluate an Infini-Transformer checkpoint: perplexity over every segment, memory knock-out, passkey sweep,
gate plot (paper Figure 3), memory-footprint table (paper Table 1) and streaming generation.

    infini-eval --config tiny --workdir /tmp/tiny          # latest checkpoint there (in a checkout: python eval.py)
    infini-eval --config tiny --checkpoint /tmp/tiny/checkpoints/300 --tasks passkey \
        --passkey_lengths 1K,32K,128K,1M --passkey_depths 0,0.5,1
    infini-eval --config tiny --workdir /tmp/tiny --tasks generate --prompt "The pass key is"

Results: <out_dir>/results.json and PNGs (passkey.png, gates.png, segment_loss.png), where out_dir defaults to
<workdir>/eval/step_<N>. A readable summary goes to stdout.

The tasks are the evaluators of infini_jax/evals, the ones training runs from config.evals, on the same loss.
The params are restored straight into their shardings on the mesh of config.mesh (`--config.mesh.fsdp=8`
for a 1B/8B checkpoint); several processes (--multihost or --coordinator_address ...) each read their own rows
and take the same number of batches; process 0 writes the results.
"""

import json
import sys

from absl import app, flags

from infini_jax.cli import define_multihost_flags, start_processes
from infini_jax.config import define_config_flag, run_cli

define_config_flag("NAME[:arg] of a shipped config or path/to/config.py[:arg] (must describe the checkpoint's "
                   "model)")
flags.DEFINE_string("workdir", None, "train.py workdir: evaluates its latest checkpoint, writes to <workdir>/eval.")
flags.DEFINE_string("checkpoint", None, "A checkpoint path instead (workdir, its checkpoints/ dir or a step dir).")
flags.DEFINE_bool("init_random", False, "Evaluate a freshly initialised model (smoke test; needs --out_dir).")
flags.DEFINE_string("out_dir", None, "Where results go (default <workdir>/eval/step_<N>).")
flags.DEFINE_list("tasks", None, "Comma list of perplexity,knockout,passkey,gates,footprint,generate,summarize "
                  "(default: all; knockout/gates only for attention=infini; summarize only for BookSum data).")
flags.DEFINE_string("split", "validation", "Data split for perplexity.")
flags.DEFINE_integer("batch_size", None, "Eval rows per batch (default config.train.batch_size).")
flags.DEFINE_integer("max_docs", None, "Score only the first N documents.")
flags.DEFINE_integer("max_batches", None, "Stop perplexity after N batches.")
flags.DEFINE_list("passkey_lengths", ["1K", "4K", "32K", "128K"], "Prompt lengths in tokens (K = 1024, M = 2^20).")
flags.DEFINE_list("passkey_depths", ["0", "0.25", "0.5", "0.75", "1"], "Passkey depths in [0, 1].")
flags.DEFINE_integer("passkey_trials", 1, "Passkeys per (length, depth) cell.")
flags.DEFINE_string("passkey_haystack", None, "A folder of .txt books (and its subfolders): hide the paper's passkey "
                    "sentences in their prose instead of the paper's filler.")
flags.DEFINE_integer("chunk_segments", 16, "Segments per streamed chunk (passkey).")
flags.DEFINE_string("prompt", None, "Prompt for 'generate' (default: a passkey prompt, answer withheld).")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; the paper's BookSum decoding used 0.5 with top_p 0.95.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Passkey and sampling seed.")
flags.DEFINE_bool("progress", True, "tqdm progress bars.")
define_multihost_flags(__name__)
FLAGS = flags.FLAGS


def parse_length(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"bad passkey length {text!r}: use integers or 1K / 32K / 1M") from None


TASKS = ("perplexity", "knockout", "passkey", "gates", "footprint", "generate", "summarize")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        sys.exit(_main())
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def evaluators_for(tasks, lengths, depths, haystack) -> list:
    """--tasks (and their flags) as the evaluators of infini_jax/evals, the ones training runs."""
    from infini_jax import evals

    f = FLAGS
    make = {
        "perplexity": lambda: evals.Perplexity("perplexity", split=f.split, batches=f.max_batches,
                                               batch_size=f.batch_size, max_docs=f.max_docs),
        "knockout": lambda: evals.Perplexity("knockout", split=f.split, batches=f.max_batches,
                                             batch_size=f.batch_size, max_docs=f.max_docs, knockout=True),
        "passkey": lambda: evals.Passkey("passkey", lengths=lengths, depths=depths, trials=f.passkey_trials,
                                         knockout=False, seed=f.seed, chunk_segments=f.chunk_segments,
                                         haystack=haystack),
        "gates": lambda: evals.Gates("gates"),
        "footprint": lambda: evals.Footprint("footprint", lengths=lengths if "passkey" in tasks else ()),
        "generate": lambda: evals.Generate("generate", prompt=f.prompt, max_new_tokens=f.max_new_tokens,
                                           temperature=f.temperature, top_p=f.top_p, seed=f.seed),
        "summarize": lambda: evals.Summarize("summarize", split=f.split, max_docs=f.max_docs,
                                             max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                                             top_p=f.top_p, seed=f.seed),
    }
    return [make[t]() for t in TASKS if t in tasks]


def _main() -> int:
    import dataclasses

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
    from infini_jax import evals, paths, plots
    from infini_jax import sharding as shd
    from infini_jax.config import model_config
    from infini_jax.data.passkey import Haystack, PasskeyStream
    from infini_jax.data.tokenizers import check_vocab, load_tokenizer, with_default_tokenizer

    config = FLAGS.config
    if config is None:
        raise ValueError("--config is required, e.g. --config tiny")
    config = with_default_tokenizer(config)  # init_from=hf:DIR with no data.tokenizer: DIR's own
    cfg = model_config(config)
    default_tasks = [t for t in TASKS if t != "summarize" or config.data.name == "booksum"]
    tasks = FLAGS.tasks or default_tasks
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown --tasks {unknown}; valid: {','.join(TASKS)}")
    if sum(bool(x) for x in (FLAGS.workdir or FLAGS.checkpoint, FLAGS.init_random)) != 1:
        raise ValueError("pass --workdir DIR (latest checkpoint) or --checkpoint PATH (or --init_random for a smoke "
                         "test)")
    if FLAGS.init_random and not FLAGS.out_dir and not FLAGS.workdir:
        raise ValueError("--init_random needs --out_dir (or --workdir) for the results")
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_vocab(tokenizer, cfg.vocab_size, config.data.tokenizer)
    lengths = [parse_length(x) for x in FLAGS.passkey_lengths]
    depths = [float(x) for x in FLAGS.passkey_depths]
    if "summarize" in tasks and (config.data.name != "booksum" or not config.data.get("data_dir")):
        raise ValueError("--tasks summarize needs a BookSum config: config.data.name='booksum' and "
                         "--config.data.data_dir pointing at (document, summary) JSONL")
    if "passkey" in tasks:
        for d in depths:
            if not 0 <= d <= 1:
                raise ValueError(f"--passkey_depths must be in [0, 1], got {d}")
        PasskeyStream(tokenizer, min(lengths), 0.0)  # raises if shorter than the prompt without filler
    haystack = Haystack(tokenizer, FLAGS.passkey_haystack) if FLAGS.passkey_haystack else ""  # no books: raises
    needs_memory = {"knockout", "gates"} & set(tasks)
    if cfg.attention != "infini" and needs_memory:
        print(f"skipping {sorted(needs_memory)}: attention={cfg.attention!r} has no memory gates")
        tasks = [t for t in tasks if t not in needs_memory]

    start_processes(config)
    import jax

    mesh = shd.make_mesh(config.mesh)
    if {"perplexity", "knockout"} & set(tasks):
        shd.check_divisibility(mesh, num_heads=cfg.num_heads, batch_size=FLAGS.batch_size or config.train.batch_size)
    subject, info = evals.load_subject(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                                       init_random=FLAGS.init_random, mesh=mesh)
    subject = dataclasses.replace(subject, tokenizer=tokenizer, progress=FLAGS.progress)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *_: None)
    log(f"model: {info['source']} (step {info['step']}), attention={cfg.attention}, rule={cfg.rule}, "
        f"segment_len={cfg.segment_len}, seq_len={cfg.seq_len}, mesh={dict(mesh.shape)}")
    results = evals.run_all(evaluators_for(tasks, lengths, depths, haystack), subject, log)
    if "perplexity" in results and "knockout" in results:
        results["knockout_delta_loss"] = results["knockout"]["loss"] - results["perplexity"]["loss"]
        log(f"memory knock-out raises the loss by {results['knockout_delta_loss']:+.4f} nats/token")
    results["model"] = {"source": info["source"], "step": info["step"], "config": config.model.to_dict()}
    results["split"] = FLAGS.split
    if not is_main:
        return 0

    tag = f"step_{info['step']}" if info["step"] is not None else "random_init"
    out_dir = paths.resolve(FLAGS.out_dir) if FLAGS.out_dir else \
        paths.resolve(FLAGS.workdir or _workdir_of(FLAGS.checkpoint)) / "eval" / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    pngs = plots.plot_all(results, out_dir, gates_lh=results.get("gates"))
    print(f"wrote {out_dir / 'results.json'}" + "".join(f", {p.name}" for p in pngs))
    return 0


def _workdir_of(checkpoint: str):
    """<workdir>/checkpoints/<step> → <workdir>; otherwise the checkpoint path itself."""
    from infini_jax import paths

    p = paths.resolve(checkpoint)
    for parent in (p, *p.parents):
        if parent.name == "checkpoints":
            return parent.parent
    return p


def run():
    """The `infini-eval` console script (and `python eval.py` in a checkout)."""
    run_cli(main, __name__)


if __name__ == "__main__":
    run()
