"""The experiment configs, shipped with the package: `--config tiny`, `--config pg19:rule=delta`.

base.py holds every key and its default; each other module's get_config(arg) starts from it and overrides
what differs. infini_jax.config.load_config resolves a name here (or a path to any config file).
"""
