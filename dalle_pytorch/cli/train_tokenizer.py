"""`dalle-train-tokenizer`: train a byte-level BPE tokenizer on a folder of captions.

    dalle-train-tokenizer --captions DIR --vocab-size 8000 --out tok.json

DIR is searched recursively for .txt files holding one caption per line. The result is a Hugging Face
`tokenizers` JSON file with [PAD] at id 0; load it with `HugTokenizer("tok.json")` or pass it to the
training scripts' `--bpe-path`.
"""

from __future__ import annotations

import argparse

from dalle_pytorch.text.tokenizer_training import train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-train-tokenizer",
        description="Train a byte-level BPE tokenizer (Hugging Face tokenizers JSON) on caption files.",
    )
    parser.add_argument(
        "--captions", required=True,
        help="folder searched recursively for .txt caption files, one caption per line",
    )  # fmt: skip
    parser.add_argument(
        "--vocab-size", "--vocab_size", dest="vocab_size", type=int, required=True,
        help="size of the vocabulary, counting [PAD] and the 256 byte symbols (at least 258)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="path of the tokenizer JSON file to write")
    parser.add_argument(
        "--min-frequency", "--min_frequency", dest="min_frequency", type=int, default=2,
        help="a pair of symbols is merged only if it occurs at least this often",
    )  # fmt: skip
    parser.add_argument(
        "--no-lowercase", "--no_lowercase", dest="lowercase", action="store_false",
        help="keep upper case instead of lower-casing captions",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tok = train_tokenizer(
            args.captions,
            args.vocab_size,
            args.out,
            lowercase=args.lowercase,
            min_frequency=args.min_frequency,
        )
    except (ValueError, TypeError) as err:
        parser.error(str(err))  # exits with status 2 and the usage line, like a bad flag
    print(f"wrote {args.out} (vocab_size {tok.vocab_size})")


if __name__ == "__main__":
    main()
