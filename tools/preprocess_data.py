"""Tokenizes text into megatron-core indexed datasets (OUTPUT_PREFIX_<key>_document.bin/.idx).

Example:
    python tools/preprocess_data.py --input corpus.jsonl.gz --json-keys text \
        --tokenizer-model out/tokenizer.model --output-prefix out/corpus --workers 8
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model out/bpe --output-prefix out/corpus

Inputs: JSON lines (.jsonl/.json, optionally .gz), Parquet (.parquet, needs pyarrow) or plain
text (documents separated by blank lines). One dataset is written per --json-keys value.
Progress lines (docs/s, tokens/s) and a final summary go to stderr and stdout. Exit code 2:
the input or the arguments are unusable (e.g. a bad record with --on-bad-line error).
"""

import argparse
import sys

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)

from megatron_nitp.cli import ArgumentParser
from megatron_nitp.data.preprocess import ON_BAD_LINE, preprocess_corpus
from megatron_nitp.data.tokenizer import DEFAULT_TOKENIZER_TYPE, TOKENIZER_TYPES


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl/.json (one JSON object per line; .gz too), .parquet, or "
                             "plain text files (documents separated by blank lines)")
    parser.add_argument("--json-keys", "--json-key", dest="json_keys", nargs="+",
                        default=["text"],
                        help="keys (Parquet: columns) of the texts; one dataset per key, "
                             "OUTPUT_PREFIX_<key>_document")
    parser.add_argument("--tokenizer-type", default=DEFAULT_TOKENIZER_TYPE,
                        choices=TOKENIZER_TYPES,
                        help="Megatron-LM's tokenizer kind (train with the same one)")
    parser.add_argument("--tokenizer-model",
                        help="the tokenizer's file or folder: a SentencePiece .model, a Hugging "
                             "Face folder with tokenizer.json, a tiktoken .json")
    parser.add_argument("--vocab-file",
                        help="GPT2BPETokenizer: GPT-2's vocab.json (Megatron-LM's flag)")
    parser.add_argument("--merge-file",
                        help="GPT2BPETokenizer: GPT-2's merges.txt (Megatron-LM's flag)")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the EOD token (default: on)")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizing processes in all (a good value: the CPU cores)")
    parser.add_argument("--partitions", type=int, default=1,
                        help="split the input into this many contiguous parts, each read, "
                             "tokenized (by workers/partitions processes) and written in "
                             "parallel, then merged in order; the result is the same")
    parser.add_argument("--on-bad-line", choices=ON_BAD_LINE, default="error",
                        help="a record with invalid JSON, a missing key or a non-string "
                             "value: stop with its file:line (error, default), or leave it "
                             "out and list it in the summary (skip)")
    parser.add_argument("--log-interval", type=float, default=10.0,
                        help="seconds between progress lines (docs/s, tokens/s) on stderr")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.partitions < 1:
        parser.error("--workers and --partitions must be >= 1")
    if args.tokenizer_type == "GPT2BPETokenizer":
        if not (args.vocab_file and args.merge_file) or args.tokenizer_model:
            parser.error("--tokenizer-type GPT2BPETokenizer reads --vocab-file and --merge-file "
                         "(not --tokenizer-model)")
        args.tokenizer_model = args.vocab_file
    elif args.vocab_file or args.merge_file:
        parser.error("--vocab-file / --merge-file are GPT2BPETokenizer's: add --tokenizer-type "
                     "GPT2BPETokenizer")
    elif not args.tokenizer_model:
        parser.error("--tokenizer-model is required (the tokenizer's file or folder)")

    try:
        result = preprocess_corpus(
            args.input,
            args.tokenizer_model,
            args.output_prefix,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            partitions=args.partitions,
            on_bad_line=args.on_bad_line,
            progress_interval=args.log_interval,
            tokenizer_type=args.tokenizer_type,
            merge_file=args.merge_file,
        )
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result.summary())


if __name__ == "__main__":
    main()
