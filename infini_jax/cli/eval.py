"""Evaluate an Infini-Transformer checkpoint: perplexity over every segment, memory knock-out, passkey sweep,
gate plot (paper Figure 3), memory-footprint table (paper Table 1) and streaming generation.

    infini-eval --config tiny --workdir /tmp/tiny          # latest checkpoint there (in a checkout: python eval.py)
    infini-eval --config tiny --checkpoint /tmp/tiny/checkpoints/300 --tasks passkey \
        --passkey_lengths 1K,32K,128K,1M --passkey_depths 0,0.5,1
    infini-eval --config tiny --workdir /tmp/tiny --tasks generate --prompt "The pass key is"

Results: <out_dir>/results.json and PNGs (passkey.png, gates.png, segment_loss.png), where out_dir defaults to
<workdir>/eval/step_<N>. A readable summary goes to stdout. Single process; the model sits on one device.
"""

import json
import sys

from absl import app, flags

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
FLAGS = flags.FLAGS


def parse_length(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"bad passkey length {text!r}: use integers or 1K / 32K / 1M") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        sys.exit(_main())
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _main() -> int:
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
    from infini_jax import evaluate as ev
    from infini_jax import paths, plots
    from infini_jax.config import model_config
    from infini_jax.data.passkey import Haystack, PasskeyStream
    from infini_jax.data.tokenizers import load_tokenizer, with_default_tokenizer

    config = FLAGS.config
    if config is None:
        raise ValueError("--config is required, e.g. --config tiny")
    config = with_default_tokenizer(config)  # init_from=hf:DIR with no data.tokenizer: DIR's own
    cfg = model_config(config)
    default_tasks = [t for t in ev.TASKS if t != "summarize" or config.data.name == "booksum"]
    tasks = FLAGS.tasks or default_tasks
    unknown = sorted(set(tasks) - set(ev.TASKS))
    if unknown:
        raise ValueError(f"unknown --tasks {unknown}; valid: {','.join(ev.TASKS)}")
    if sum(bool(x) for x in (FLAGS.workdir or FLAGS.checkpoint, FLAGS.init_random)) != 1:
        raise ValueError("pass --workdir DIR (latest checkpoint) or --checkpoint PATH (or --init_random for a smoke "
                         "test)")
    if FLAGS.init_random and not FLAGS.out_dir and not FLAGS.workdir:
        raise ValueError("--init_random needs --out_dir (or --workdir) for the results")
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer {config.data.tokenizer!r} has vocab {tokenizer.vocab_size} but "
                         f"config.model.vocab_size is {cfg.vocab_size}: fix one of them in the config")
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
    haystack = Haystack(tokenizer, FLAGS.passkey_haystack) if FLAGS.passkey_haystack else None

    model, info = ev.load_model(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                                init_random=FLAGS.init_random)
    print(f"model: {info['source']} (step {info['step']}), attention={cfg.attention}, rule={cfg.rule}, "
          f"segment_len={cfg.segment_len}, seq_len={cfg.seq_len}")
    results = ev.run(config, model, tokenizer, tasks=tasks, split=FLAGS.split, batch_size=FLAGS.batch_size,
                     max_docs=FLAGS.max_docs, max_batches=FLAGS.max_batches, passkey_lengths=lengths,
                     passkey_depths=depths, passkey_trials=FLAGS.passkey_trials,
                     chunk_segments=FLAGS.chunk_segments, prompt=FLAGS.prompt,
                     max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                     seed=FLAGS.seed, progress=FLAGS.progress, passkey_haystack=haystack)
    results["model"] = {"source": info["source"], "step": info["step"], "config": config.model.to_dict()}
    results["split"] = FLAGS.split

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
