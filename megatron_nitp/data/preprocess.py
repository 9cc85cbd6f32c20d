"""Tokenizes documents into megatron-core's indexed dataset format (`.bin` + `.idx`).

Each document becomes one sequence of token ids followed by the EOD id, which is what
megatron-core's `GPTDataset` concatenates and cuts into training samples.
"""

from __future__ import annotations

import multiprocessing
import os

import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_nitp.data.tokenizer import DEFAULT_TOKENIZER_TYPE, build_tokenizer, iter_documents

_PROGRESS_MIN_DOCUMENTS = 5000

_worker_tokenizer = None


def _init_worker(tokenizer_type: str, tokenizer_model: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)


def _encode(text: str) -> list[int]:
    return _worker_tokenizer.tokenize(text)


def _count_documents(input_files: list[str]) -> int:
    """Counts documents cheaply (no JSON parsing) to decide whether to show progress."""
    count = 0
    for path in input_files:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".jsonl", ".json")):
                count += sum(1 for line in f if line.strip())
            else:
                previous_blank = True
                for line in f:
                    blank = not line.strip()
                    count += previous_blank and not blank
                    previous_blank = blank
    return count


def preprocess(
    input_files: list[str],
    tokenizer_model: str,
    output_prefix: str,
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
    tokenizer_type: str = DEFAULT_TOKENIZER_TYPE,
) -> str:
    """Tokenizes text files into `{output_prefix}_text_document.bin/.idx`.

    Documents are read as described in `tokenizer.iter_documents`: one per line of a `.jsonl`
    file (from `json_key`), one per blank-line-separated block of any other file.

    The files are written under temporary names and renamed into place, the `.idx` last, so
    an interrupted run never leaves a dataset that loads: a prefix without its `.idx` is
    rejected by `datasets.build_datasets`.

    Args:
        input_files: Plain text or `.jsonl` files.
        tokenizer_model: The tokenizer's file or folder (`build_tokenizer`'s `tokenizer_model`).
        output_prefix: Output path prefix; `_text_document` is appended as in Megatron.
        json_key: Key of the document text in JSON-lines records.
        append_eod: Whether to end every document with the EOD token, so that samples that
            span documents show where one ends.
        workers: Number of tokenizer processes; 1 tokenizes in this process.
        tokenizer_type: Megatron-LM's `--tokenizer-type` (`build_tokenizer`).

    Returns:
        The data prefix `{output_prefix}_text_document`, as accepted by `build_datasets`.

    Raises:
        FileNotFoundError: If an input file or the tokenizer model does not exist.
        ValueError: If the inputs hold no document, or the tokenizer is unusable.
    """
    input_files = list(input_files)
    for path in input_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)

    data_prefix = f"{output_prefix}_text_document"
    os.makedirs(os.path.dirname(os.path.abspath(data_prefix)), exist_ok=True)
    bin_path, idx_path = data_prefix + ".bin", data_prefix + ".idx"
    tmp_bin, tmp_idx = f"{bin_path}.tmp{os.getpid()}", f"{idx_path}.tmp{os.getpid()}"

    num_documents = _count_documents(input_files)
    documents = iter_documents(input_files, json_key)
    pool = None
    if workers > 1:
        # Forked workers start instantly (no re-import of torch/megatron-core) and, unlike
        # spawned ones, also work when the caller's main module cannot be re-imported.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_type, tokenizer_model))
        encoded = pool.imap(_encode, documents, chunksize=32)
    else:
        encoded = map(tokenizer.tokenize, documents)
    if num_documents > _PROGRESS_MIN_DOCUMENTS:
        encoded = tqdm(encoded, total=num_documents, unit="doc", desc="tokenizing")

    builder = IndexedDatasetBuilder(tmp_bin, dtype=DType.optimal_dtype(tokenizer.vocab_size))
    written = 0
    try:
        for ids in encoded:
            if append_eod:
                ids = ids + [tokenizer.eod]
            if not ids:
                continue
            builder.add_item(torch.tensor(ids, dtype=torch.int64, device="cpu"))
            builder.end_document()
            written += 1
        builder.finalize(tmp_idx)
        if written == 0:
            raise ValueError(f"no documents found in {input_files} (json key {json_key!r})")
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        if pool is not None:
            pool.terminate()
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return data_prefix
