"""Tokenizer loading and SentencePiece training.

    python -m infini_jax.tokenizer train --input DIR_OR_FILES... --vocab_size N --output PREFIX

writes PREFIX.model / PREFIX.vocab. Inputs: files, or folders searched recursively for .txt/.tex/.md (one
sentence per line, as SentencePiece reads them) and .jsonl (field --text_field). Point it at a *train* folder so
validation/test text does not leak into the vocabulary. Ids: 0 = pad, 1 = bos, 2 = eos, 3 = unk (like
ByteTokenizer for the first three); identity normalisation, whitespace kept, byte fallback on (newlines become
byte pieces), digits split: decode(encode(text)) == text for any UTF-8 text.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from infini_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer", "collect_files",
           "train_sentencepiece", "main"]

TEXT_EXTS = (".txt", ".tex", ".md")


def collect_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(os.path.expanduser(item))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTS + (".jsonl",))
            if not found:
                raise ValueError(f"no .txt/.tex/.md/.jsonl files under {str(path)!r}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"tokenizer training input {str(path)!r} does not exist")
    if not files:
        raise ValueError("no tokenizer training input given")
    return files


def train_sentencepiece(inputs: list[str], vocab_size: int, output: str, *, model_type: str = "unigram",
                        text_field: str = "text", character_coverage: float = 0.9995,
                        input_sentence_size: int = 2_000_000, max_sentence_length: int = 16384,
                        num_threads: int | None = None) -> str:
    """Train a SentencePiece model on the inputs; returns the path of the .model file."""
    import sentencepiece as spm

    files = collect_files(inputs)
    out = Path(os.path.expanduser(output))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_files = []
        for i, path in enumerate(files):
            if path.suffix.lower() == ".jsonl":  # extract the text field into a plain file
                plain = Path(tmp) / f"{i}.txt"
                with open(path, encoding="utf-8") as src, open(plain, "w", encoding="utf-8") as dst:
                    for line in src:
                        if line.strip():
                            dst.write(json.loads(line)[text_field] + "\n")
                train_files.append(str(plain))
            else:
                train_files.append(str(path))
        spm.SentencePieceTrainer.Train(
            input=train_files, model_prefix=str(out), vocab_size=int(vocab_size), model_type=model_type,
            character_coverage=character_coverage, byte_fallback=True,
            # lossless for language modelling: keep newlines (byte fallback) and runs of spaces, digits split
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            input_sentence_size=int(input_sentence_size), shuffle_input_sentence=True,
            max_sentence_length=int(max_sentence_length), num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    return str(out) + ".model"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infini_jax.tokenizer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model")
    t.add_argument("--input", nargs="+", required=True, help="files or folders (searched recursively)")
    t.add_argument("--vocab_size", type=int, required=True)
    t.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    t.add_argument("--text_field", default="text", help="JSONL field holding the text")
    t.add_argument("--character_coverage", type=float, default=0.9995)
    t.add_argument("--input_sentence_size", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    model = train_sentencepiece(args.input, args.vocab_size, args.output, model_type=args.model_type,
                                text_field=args.text_field, character_coverage=args.character_coverage,
                                input_sentence_size=args.input_sentence_size)
    tok = SentencePieceTokenizer(model)
    print(json.dumps({"model": model, "vocab_size": tok.vocab_size}))


if __name__ == "__main__":
    main()
