"""`python eval.py ...` in a checkout is the `infini-eval` command: infini_jax/cli/eval.py (flags: --help)."""

from infini_jax.cli.eval import run

if __name__ == "__main__":
    run()
