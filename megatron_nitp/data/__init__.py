"""Data pipeline: SentencePiece tokenizer, indexed-dataset preprocessing, GPT datasets.

The default corpus (`prepare_default_corpus`) needs no network access, so training works
out of the box; any other text goes through `train_sentencepiece` and `preprocess` (or the
matching scripts in `tools/`).
"""

from megatron_nitp.data.corpus import prepare_default_corpus
from megatron_nitp.data.datasets import MicroBatchIterator, build_datasets, check_data_prefixes
from megatron_nitp.data.preprocess import merge_datasets, preprocess, preprocess_corpus
from megatron_nitp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

__all__ = [
    "MicroBatchIterator",
    "SentencePieceTokenizer",
    "build_datasets",
    "check_data_prefixes",
    "merge_datasets",
    "prepare_default_corpus",
    "preprocess",
    "preprocess_corpus",
    "train_sentencepiece",
]
