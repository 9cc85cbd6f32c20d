"""Trains a tokenizer for megatron-nitp: SentencePiece BPE, or byte-level BPE (tokenizer.json).

Examples:
    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix out/tokenizer \
        --vocab-size 8192
    python tools/train_tokenizer.py --type bpe --input corpus.jsonl --output-prefix out/bpe \
        --vocab-size 8192

The default (``--type sentencepiece``) writes OUTPUT_PREFIX.model, read by
``--tokenizer-type SentencePieceTokenizer`` (the default). ``--type bpe`` trains a byte-level
BPE with Hugging Face ``tokenizers`` and writes the folder OUTPUT_PREFIX/ (tokenizer.json and
tokenizer_config.json), read by ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model
OUTPUT_PREFIX`` and by ``transformers.AutoTokenizer``.
"""


import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)

from megatron_nitp.cli import ArgumentParser
from megatron_nitp.data.tokenizer import build_tokenizer, train_bpe, train_sentencepiece


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="plain text files (documents separated by blank lines) or .jsonl")
    parser.add_argument("--type", choices=("sentencepiece", "bpe"), default="sentencepiece",
                        help="sentencepiece: OUTPUT_PREFIX.model (SentencePieceTokenizer); bpe: "
                             "byte-level BPE folder OUTPUT_PREFIX/ (HuggingFaceTokenizer)")
    parser.add_argument("--output-prefix", required=True,
                        help="sentencepiece: writes OUTPUT_PREFIX.model and .vocab; bpe: the "
                             "folder OUTPUT_PREFIX/")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--json-key", "--json-keys", dest="json_key", default="text",
                        help="key of the document text in .jsonl records")
    parser.add_argument("--seed", type=int, default=1234, help="sentencepiece: sampling seed")
    args = parser.parse_args(argv)

    if args.type == "bpe":
        model = train_bpe(args.input, args.output_prefix, args.vocab_size, json_key=args.json_key)
        kind = "HuggingFaceTokenizer"
    else:
        model = train_sentencepiece(args.input, args.output_prefix, args.vocab_size,
                                    json_key=args.json_key, seed=args.seed)
        kind = "SentencePieceTokenizer"
    tokenizer = build_tokenizer(kind, model)
    print(f"wrote {model} (vocab size {tokenizer.vocab_size}, eod id {tokenizer.eod}; "
          f"--tokenizer-type {kind} --tokenizer-model {model})")


if __name__ == "__main__":
    main()
