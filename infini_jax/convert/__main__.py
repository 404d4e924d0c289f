"""infini-convert (python -m infini_jax.convert): Hugging Face checkpoints ↔ infini-jax.

    infini-convert fields DIR              the --config.model.* flags DIR/config.json implies (paste them into
                                           infini-train when the experiment config has another shape)
    infini-convert export --checkpoint WORKDIR_OR_STEP --out DIR [--like HF_DIR]
                                           an infini-jax checkpoint as a Hugging Face Llama / Gemma directory:
                                           config.json, safetensors, infini_gates.safetensors, and the tokenizer
                                           files of --like (default: the run's init_from=hf:DIR, if any)

Importing needs no command: --config.train.init_from=hf:DIR reads the Hugging Face directory directly.
Bad input is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def export_checkpoint(checkpoint: str, out: str, like_dir: str | None = None,
                      max_shard_bytes: int = 2 << 30) -> list[str]:
    """An infini-jax checkpoint (its saved config says which model) → a Hugging Face directory `out`; the
    parameters are restored sharded over every device and written one tensor at a time."""
    from etils import epath

    from infini_jax import checkpoint as ckpt_lib
    from infini_jax import convert
    from infini_jax import sharding as shd
    from infini_jax.model import ModelConfig

    step_dir = ckpt_lib.find_step_dir(checkpoint)
    saved = json.loads((step_dir / "config" / "metadata").read_text())
    cfg = ModelConfig.from_dict(saved["model"])
    like_dir = like_dir or convert.hf_dir((saved.get("train") or {}).get("init_from"))
    like = None
    if like_dir:
        like = json.loads((epath.Path(like_dir) / "config.json").read_text())
    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    params = ckpt_lib.restore_params(step_dir, cfg, mesh)
    files = convert.export_hf(params, cfg, out, like=like, max_shard_bytes=max_shard_bytes)
    for name in TOKENIZER_FILES if like_dir else ():
        if (epath.Path(like_dir) / name).is_file():
            shutil.copyfile(epath.Path(like_dir) / name, epath.Path(out) / name)
            files.append(name)
    return files


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="infini-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fields", help="the --config.model flags a Hugging Face config.json implies")
    f.add_argument("dir")
    e = sub.add_parser("export", help="an infini-jax checkpoint as a Hugging Face directory")
    e.add_argument("--checkpoint", required=True, help="workdir, its checkpoints/ dir or one step dir")
    e.add_argument("--out", required=True)
    e.add_argument("--like", default=None, help="the Hugging Face directory the model came from")
    e.add_argument("--max_shard_mb", type=int, default=2048)
    args = parser.parse_args(argv)
    from infini_jax.sharding import choose_platform

    choose_platform()  # no libtpu start-up on a host without an accelerator
    try:
        if args.cmd == "fields":
            from infini_jax.convert import hf_config, hf_fields

            print(" ".join(hf_config.overrides(hf_fields(args.dir))))
        else:
            files = export_checkpoint(args.checkpoint, args.out, args.like, args.max_shard_mb << 20)
            print(f"wrote {args.out}: {', '.join(files)}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
