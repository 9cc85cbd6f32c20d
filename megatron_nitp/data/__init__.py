"""Data pipeline: tokenizers, indexed-dataset preprocessing, GPT datasets.

The default corpus (`prepare_default_corpus`) needs no network access, so training works
out of the box; any other text goes through a tokenizer (`build_tokenizer`: megatron-core's
SentencePiece, Hugging Face, tiktoken or null tokenizer; `train_sentencepiece` / `train_bpe`
make one) and `preprocess` (or the matching scripts in `tools/`).
"""

from megatron_nitp.data.corpus import prepare_default_corpus
from megatron_nitp.data.datasets import MicroBatchIterator, build_datasets, check_data_prefixes
from megatron_nitp.data.preprocess import merge_datasets, preprocess, preprocess_corpus
from megatron_nitp.data.tokenizer import build_tokenizer, train_bpe, train_sentencepiece

__all__ = [
    "MicroBatchIterator",
    "build_datasets",
    "build_tokenizer",
    "check_data_prefixes",
    "merge_datasets",
    "prepare_default_corpus",
    "preprocess",
    "preprocess_corpus",
    "train_bpe",
    "train_sentencepiece",
]
