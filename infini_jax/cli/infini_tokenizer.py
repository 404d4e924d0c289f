"""Train a SentencePiece tokenizer (see infini_jax/data/tokenizers.py: train_sentencepiece).

    infini-tokenizer train --input DIR_OR_FILES... --vocab_size N --output PREFIX
    (in a checkout: python -m infini_jax.cli.infini_tokenizer train ...)
"""

from __future__ import annotations

import argparse
import json

from infini_jax.data.tokenizers import SentencePieceTokenizer, train_sentencepiece


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="infini-tokenizer")
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
