"""Trains a SentencePiece BPE tokenizer for megatron-nitp.

Example:
    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix out/tokenizer \
        --vocab-size 8192
"""

import argparse

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)

from megatron_nitp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="plain text files (documents separated by blank lines) or .jsonl")
    parser.add_argument("--output-prefix", required=True,
                        help="writes OUTPUT_PREFIX.model and OUTPUT_PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--json-key", "--json-keys", dest="json_key", default="text",
                        help="key of the document text in .jsonl records")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    model = train_sentencepiece(
        args.input, args.output_prefix, args.vocab_size, json_key=args.json_key, seed=args.seed
    )
    tokenizer = SentencePieceTokenizer(model)
    print(f"wrote {model} (vocab size {tokenizer.vocab_size}, eod id {tokenizer.eod})")


if __name__ == "__main__":
    main()
