"""`python eval.py ...` in a checkout is the `infini-eval` command: infini_jax/cli/infini_eval.py (flags: --help)."""

from infini_jax.cli.infini_eval import run

if __name__ == "__main__":
    run()
