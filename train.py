"""`python train.py ...` in a checkout is the `infini-train` command: infini_jax/cli/infini_train.py (flags: --help)."""

from infini_jax.cli.infini_train import run

if __name__ == "__main__":
    run()
