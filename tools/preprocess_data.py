"""Tokenizes text into megatron-core's indexed dataset (OUTPUT_PREFIX_text_document.bin/.idx).

Example:
    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \
        --tokenizer-model out/tokenizer.model --output-prefix out/corpus --workers 4
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model out/bpe --output-prefix out/corpus
"""

import argparse

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_nitp.data.preprocess import preprocess
from megatron_nitp.data.tokenizer import DEFAULT_TOKENIZER_TYPE, TOKENIZER_TYPES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl files (one document per line) or plain text files "
                             "(documents separated by blank lines)")
    parser.add_argument("--json-keys", "--json-key", dest="json_keys", nargs="+",
                        default=["text"], help="key of the document text in .jsonl records")
    parser.add_argument("--tokenizer-type", default=DEFAULT_TOKENIZER_TYPE,
                        choices=TOKENIZER_TYPES,
                        help="Megatron-LM's tokenizer kind (train with the same one)")
    parser.add_argument("--tokenizer-model", required=True,
                        help="the tokenizer's file or folder: a SentencePiece .model, a Hugging "
                             "Face folder with tokenizer.json, a tiktoken .json")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the EOD token (default: on)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = parser.parse_args(argv)
    if len(args.json_keys) != 1:
        parser.error("exactly one --json-keys value is supported")

    data_prefix = preprocess(
        args.input,
        args.tokenizer_model,
        args.output_prefix,
        json_key=args.json_keys[0],
        append_eod=args.append_eod,
        workers=args.workers,
        tokenizer_type=args.tokenizer_type,
    )
    dataset = IndexedDataset(data_prefix)
    print(
        f"wrote {data_prefix}.bin/.idx: {len(dataset.document_indices) - 1} documents, "
        f"{int(dataset.sequence_lengths.sum())} tokens"
    )


if __name__ == "__main__":
    main()
