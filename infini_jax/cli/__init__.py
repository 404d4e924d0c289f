"""The command-line tools, named after their console scripts: `infini-train` (infini_train.py), `infini-eval`
(infini_eval.py) and `infini-tokenizer` (infini_tokenizer.py); the top-level train.py and eval.py of a
checkout are thin wrappers of the first two."""

from absl import flags


def define_multihost_flags(module_name: str) -> None:
    """--multihost / --coordinator_address / --num_processes / --process_id (shown in `module_name`'s --help)."""
    flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (auto-detected coordinator).",
                      module_name=module_name)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).",
                        module_name=module_name)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).", module_name=module_name)
    flags.DEFINE_integer("process_id", None, "This process's id (multi-process).", module_name=module_name)


def start_processes(config) -> None:
    """Before JAX uses a device: config.train.cpu_devices (sharding.set_cpu_devices), then
    jax.distributed.initialize() when the multi-host flags (or JAX_* variables) ask for it."""
    from infini_jax import sharding

    sharding.set_cpu_devices(int(config.train.get("cpu_devices", 0)))
    f = flags.FLAGS
    sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, force=f.multihost)
