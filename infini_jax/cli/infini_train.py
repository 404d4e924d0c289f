"""Train (and checkpoint, and evaluate) an Infini-Transformer.

    infini-train --config tiny --workdir /tmp/tiny          (in a checkout: python train.py ...)
    infini-train --config tiny:rule=delta --workdir /tmp/d --config.train.steps=50
    infini-train --config path/to/my_config.py:arg --workdir /tmp/mine

Prove a config fits a TPU pod from a CPU host (ahead-of-time compile with libtpu, `pip install -e ".[tpu]"`):
    infini-train --config passkey_1b --compile_only --topology v5p-8

Re-running on an existing workdir resumes from its latest checkpoint. SIGTERM saves and exits cleanly.

Multi-process (one process per host): pass --multihost on TPU pods / SLURM (JAX finds the coordinator), or
set --coordinator_address/--num_processes/--process_id (or the env vars JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID). Each process reads its own share of the data; process 0 logs.
"""

import logging
import sys

from absl import app, flags

from infini_jax.cli import define_multihost_flags, start_processes
from infini_jax.config import define_config_flag, run_cli

define_config_flag("NAME[:arg] of a shipped config (tiny, pg19:rule=delta, ...) or path/to/config.py[:arg]")
flags.DEFINE_string("workdir", None, "Output directory: checkpoints/, metrics.jsonl, tb/, eval_results.json.")
define_multihost_flags(__name__)
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar (process 0).")
flags.DEFINE_bool("compile_only", False, "Compile the real train step for --topology ahead of time, print "
                  "per-chip memory and FLOPs, and exit (no training; needs libtpu).")
flags.DEFINE_string("topology", "v5e-8", "TPU topology for --compile_only, e.g. v5e-16, v5p-8, v5p-128.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.compile_only:
        from infini_jax import aot

        try:
            print(aot.format_report(aot.compile_for_topology(FLAGS.config, FLAGS.topology)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    if not FLAGS.workdir:
        print("error: --workdir is required (a local folder or gs://bucket/run), unless --compile_only",
              file=sys.stderr)
        sys.exit(2)
    from infini_jax.loop import train_and_evaluate
    from infini_jax.step import NonFiniteLossError

    start_processes(FLAGS.config)
    import jax

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
    logging.getLogger("infini_jax").setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    try:
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    except (ValueError, FileNotFoundError) as e:  # bad config, data_dir, init_from, checkpoint: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    if jax.process_index() == 0:
        if result.get("preempted"):
            print(f"stopped at step {result['step']} (preempted); checkpoint saved in {FLAGS.workdir}")
        else:
            ev, nan = result.get("eval", {}), float("nan")
            print(f"done: step {result['step']}, final train loss {result.get('train', {}).get('loss', nan):.4f}, "
                  f"eval loss {ev.get('loss', nan):.4f}, ppl {ev.get('ppl', nan):.2f}, "
                  f"eval accuracy {ev.get('accuracy', nan):.4f}")


def run():
    """The `infini-train` console script (and `python train.py` in a checkout)."""
    run_cli(main, __name__)


if __name__ == "__main__":
    run()
