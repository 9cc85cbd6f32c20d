"""Tokenizes documents into megatron-core's indexed dataset format (`.bin` + `.idx`), at
corpus scale.

Each document becomes one sequence of token ids, followed by the EOD id unless told
otherwise, which is what megatron-core's `GPTDataset` concatenates and cuts into training
samples. One dataset is written per key (`{output_prefix}_{key}_document`, Megatron-LM's
naming), with document i of every dataset taken from record i, so the datasets stay aligned.

Where the time goes and how it is spread:

- the reading process only cuts files into raw records (`readers.iter_records`) and sends
  them in chunks to `workers` processes, which parse JSON and tokenize; `imap` returns the
  chunks in input order, so the output is byte-for-byte the same for any number of workers;
- with `partitions` > 1 the records are split into that many contiguous ranges, each read,
  tokenized (by `workers // partitions` processes) and written by its own process, and the
  partial datasets are concatenated (`merge_datasets`) in range order: the same bytes again,
  with the reading and writing also in parallel.

A bad record (invalid JSON or UTF-8, not an object, a missing key, a non-string value) is
reported with its file and line; `on_bad_line="error"` stops at the first one,
`on_bad_line="skip"` leaves the record out of every dataset and lists it in the summary.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Iterator, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    _IndexReader,
    get_bin_path,
    get_idx_path,
)

from megatron_nitp.data import readers
from megatron_nitp.data.meta import META_SUFFIX, recorded_max_token_id, write_meta
from megatron_nitp.data.tokenizer import DEFAULT_TOKENIZER_TYPE, build_tokenizer, gpt2_bpe_folder

ON_BAD_LINE = ("error", "skip")

# Records per task sent to a worker: large enough that pickling and scheduling cost little
# per document, small enough that the reading process is never far ahead of the writer.
_CHUNK_RECORDS = 64
# The summary lists this many bad records in full, then only counts the rest.
_LISTED_BAD_RECORDS = 20


class BadRecordError(ValueError):
    """A record that cannot be tokenized, with `on_bad_line="error"`; names its file:line."""


@dataclasses.dataclass
class PreprocessResult:
    """What a preprocessing run wrote and met, for the summary and for callers."""

    data_prefixes: dict[str, str]
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    empty_records: int = 0
    bad_records: int = 0
    bad_record_messages: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    max_token_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    """the largest token id per key, kept in ``<prefix>.meta.json`` (training checks it)"""

    def add(self, other: PreprocessResult) -> None:
        """Accumulates a partition's counts (in partition order, so the list stays ordered)."""
        self.documents += other.documents
        self.tokens += other.tokens
        self.input_bytes += other.input_bytes
        self.empty_records += other.empty_records
        self.bad_records += other.bad_records
        for key, largest in other.max_token_ids.items():
            self.max_token_ids[key] = max(largest, self.max_token_ids.get(key, -1))
        room = _LISTED_BAD_RECORDS - len(self.bad_record_messages)
        self.bad_record_messages.extend(other.bad_record_messages[:max(room, 0)])

    def summary(self) -> str:
        """A few lines for the end of a run: outputs, counts, throughput, skipped records."""
        seconds = max(self.seconds, 1e-9)
        lines = [f"wrote {prefix}.bin/.idx" for prefix in self.data_prefixes.values()]
        lines.append(
            f"{self.documents:,} documents, {self.tokens:,} tokens "
            f"({len(self.data_prefixes)} dataset(s)) from {self.input_bytes / 1e6:,.1f} MB in "
            f"{self.seconds:.1f} s: {self.documents / seconds:,.0f} docs/s, "
            f"{self.tokens / seconds:,.0f} tokens/s"
        )
        if self.empty_records:
            lines.append(f"skipped {self.empty_records:,} records with an empty text")
        if self.bad_records:
            lines.append(f"skipped {self.bad_records:,} bad records:")
            lines.extend(f"  {message}" for message in self.bad_record_messages)
            if self.bad_records > len(self.bad_record_messages):
                lines.append(f"  ... and {self.bad_records - len(self.bad_record_messages):,} more")
        return "\n".join(lines)


class _Progress:
    """Periodic progress lines (docs/s, tokens/s) on stderr; plain lines, so that they read the
    same in a terminal and in a batch job's log."""

    def __init__(self, interval: float | None, label: str = "") -> None:
        self.interval = interval
        self.label = label
        self.start = self.last = time.monotonic()

    def update(self, result: PreprocessResult) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        print(
            f"{self.label}{result.documents:,} docs, {result.tokens:,} tokens, "
            f"{result.input_bytes / 1e6:,.1f} MB in {elapsed:.0f} s: "
            f"{result.documents / elapsed:,.0f} docs/s, {result.tokens / elapsed:,.0f} tokens/s, "
            f"{result.input_bytes / 1e6 / elapsed:,.1f} MB/s",
            file=sys.stderr, flush=True,
        )


# State of a tokenizing process, set once by `_init_worker` (a Pool initializer, or the
# reading process itself with one worker).
_worker: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, keys: Sequence[str],
                 append_eod: bool) -> None:
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    _worker.update(tokenizer=tokenizer, keys=tuple(keys), append_eod=append_eod,
                   dtype=DType.optimal_dtype(tokenizer.vocab_size))


def _encode_chunk(chunk: tuple[str, str, list]) -> tuple[str, str, list[tuple[int, int, object]]]:
    """Decodes and tokenizes one chunk of records of one file.

    Returns the chunk's path and format and one `(line_number, input_size, outcome)` per
    record, where the outcome is a tuple of token arrays (one per key, already in the
    dataset's dtype so that little is pickled back), None for an empty text, or the reason
    the record is bad.
    """
    path, fmt, records = chunk
    tokenizer, keys = _worker["tokenizer"], _worker["keys"]
    eod = [tokenizer.eod] if _worker["append_eod"] else []
    results = []
    for line_number, raw in records:
        if isinstance(raw, (bytes, str)):
            size = len(raw)
        else:
            size = sum(len(value) for value in raw if isinstance(value, str))
        texts = readers.decode_record(fmt, raw, keys)
        if isinstance(texts, str):
            results.append((line_number, size, texts))
            continue
        ids = [tokenizer.tokenize(text) for text in texts]
        if not all(ids):
            results.append((line_number, size, None))
            continue
        arrays = tuple(np.array(i + eod, dtype=_worker["dtype"]) for i in ids)
        results.append((line_number, size, arrays))
    return path, fmt, results


def _iter_chunks(input_files: Sequence[str], keys: Sequence[str], start: int,
                 stop: int | None) -> Iterator[tuple[str, str, list]]:
    """Yields `(path, format, records)` chunks of the records numbered [start, stop) over all
    files (blank JSON lines are not records), at most `_CHUNK_RECORDS` each."""
    index = 0
    for path in input_files:
        fmt = readers.input_format(path)
        records: list = []
        for record in readers.iter_records(path, keys):
            if stop is not None and index >= stop:
                break
            if index >= start:
                records.append(record)
                if len(records) == _CHUNK_RECORDS:
                    yield path, fmt, records
                    records = []
            index += 1
        if records:
            yield path, fmt, records
        if stop is not None and index >= stop:
            return


def _tokenize_range(input_files, keys, tokenizer_type, tokenizer_model, data_prefixes,
                    append_eod, workers, on_bad_line, start, stop, progress) -> PreprocessResult:
    """Writes the records numbered [start, stop) into `data_prefixes` (one per key), under
    temporary names that are renamed into place, the `.idx` files last, only on success: an
    interrupted run never leaves a dataset that loads (`datasets.build_datasets` rejects a
    prefix without its `.idx`)."""
    init_args = (tokenizer_type, tokenizer_model, keys, append_eod)
    vocab_size = build_tokenizer(tokenizer_type, tokenizer_model).vocab_size
    dtype = DType.optimal_dtype(vocab_size)
    result = PreprocessResult(data_prefixes=dict(zip(keys, data_prefixes)))
    suffix = f".tmp{os.getpid()}"
    temporary = [(get_bin_path(p) + suffix, get_idx_path(p) + suffix) for p in data_prefixes]
    builders = []
    pool = None
    try:
        for tmp_bin, _ in temporary:
            builders.append(IndexedDatasetBuilder(tmp_bin, dtype=dtype))
        chunks = _iter_chunks(input_files, keys, start, stop)
        if workers > 1:
            # Forked workers start instantly (no re-import of torch/megatron-core) and, unlike
            # spawned ones, also work when the caller's main module cannot be re-imported.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = context.Pool(workers, initializer=_init_worker, initargs=init_args)
            encoded = pool.imap(_encode_chunk, chunks)
        else:
            _init_worker(*init_args)
            encoded = map(_encode_chunk, chunks)
        for path, fmt, outcomes in encoded:
            for line_number, size, outcome in outcomes:
                result.input_bytes += size
                if isinstance(outcome, str):
                    message = f"{readers.location(path, fmt, line_number)}: {outcome}"
                    if on_bad_line == "error":
                        raise BadRecordError(
                            f"bad record at {message}. Fix the input, or pass "
                            "--on-bad-line skip (on_bad_line='skip') to leave bad records "
                            "out; they are counted and listed in the summary."
                        )
                    result.bad_records += 1
                    if len(result.bad_record_messages) < _LISTED_BAD_RECORDS:
                        result.bad_record_messages.append(message)
                elif outcome is None:
                    result.empty_records += 1
                else:
                    for key, builder, ids in zip(keys, builders, outcome):
                        builder.add_document(ids, [ids.size])
                        result.tokens += ids.size
                        result.max_token_ids[key] = max(int(ids.max()),
                                                        result.max_token_ids.get(key, -1))
                    result.documents += 1
            progress.update(result)
        for builder, (_, tmp_idx) in zip(builders, temporary):
            builder.finalize(tmp_idx)
        for prefix, (tmp_bin, _) in zip(data_prefixes, temporary):
            if os.path.exists(get_idx_path(prefix)):
                os.remove(get_idx_path(prefix))
            os.replace(tmp_bin, get_bin_path(prefix))
        for prefix, (_, tmp_idx) in zip(data_prefixes, temporary):
            os.replace(tmp_idx, get_idx_path(prefix))
        for key, prefix in zip(keys, data_prefixes):
            write_meta(prefix, result.max_token_ids.get(key, -1), vocab_size)
    finally:
        if pool is not None:
            pool.terminate()
        for builder in builders:
            builder.data_file.close()
        for path in (p for pair in temporary for p in pair):
            if os.path.exists(path):
                os.remove(path)
    return result


def _run_partition(connection, *args) -> None:
    """A partition's process: tokenizes its range and sends back its result or its error."""
    try:
        connection.send(("ok", _tokenize_range(*args)))
    except BaseException as err:  # everything goes back to the parent, which re-raises it
        connection.send(("error", err))
    finally:
        connection.close()


def _tokenize_partitions(input_files, keys, tokenizer_type, tokenizer_model, data_prefixes,
                         append_eod, workers, on_bad_line, partitions, progress_interval):
    """Splits the records into `partitions` contiguous ranges, tokenizes each in its own
    process into a temporary directory and merges the parts in order into `data_prefixes`."""
    total = sum(readers.count_records(path, keys) for path in input_files)
    partitions = max(1, min(partitions, total))
    bounds = [total * i // partitions for i in range(partitions + 1)]
    parts_dir = f"{os.path.splitext(data_prefixes[0])[0]}_partitions.tmp{os.getpid()}"
    os.makedirs(parts_dir)
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    part_prefixes = [[os.path.join(parts_dir, f"part{i:05d}_{key}_document") for key in keys]
                     for i in range(partitions)]
    processes = []
    try:
        for i in range(partitions):
            receiver, sender = context.Pipe(duplex=False)
            progress = _Progress(progress_interval, label=f"[part {i + 1}/{partitions}] ")
            args = (input_files, keys, tokenizer_type, tokenizer_model, part_prefixes[i],
                    append_eod, max(1, workers // partitions), on_bad_line, bounds[i],
                    bounds[i + 1], progress)
            process = context.Process(target=_run_partition, args=(sender, *args))
            process.start()
            sender.close()
            processes.append((process, receiver))
        result = PreprocessResult(data_prefixes=dict(zip(keys, data_prefixes)))
        # In partition order, so that the error raised is the first in input order, as in a
        # single run; the later partitions are then stopped (finally) rather than awaited.
        for process, receiver in processes:
            try:
                status, value = receiver.recv()
            except EOFError:
                process.join()
                raise RuntimeError(
                    f"a partition process died (exit code {process.exitcode}); out of memory? "
                    "try fewer --partitions or --workers") from None
            finally:
                receiver.close()
            process.join()
            if status == "error":
                raise value
            result.add(value)
        for k in range(len(keys)):
            merge_datasets([parts[k] for parts in part_prefixes], data_prefixes[k])
        return result
    finally:
        for process, _ in processes:
            if process.is_alive():
                process.terminate()
                process.join()
        shutil.rmtree(parts_dir, ignore_errors=True)


def _merge_meta(input_prefixes: Sequence[str], output_prefix: str) -> None:
    """The merged dataset's side file: the inputs' largest token id, when every input records
    one; otherwise none (training then scans the ``.bin`` or says it could not)."""
    largest = [recorded_max_token_id(p) for p in input_prefixes]
    meta = output_prefix + META_SUFFIX
    if any(m is None for m in largest):
        if os.path.exists(meta):
            os.remove(meta)
        return
    with open(input_prefixes[0] + META_SUFFIX) as f:
        vocab_size = json.load(f).get("vocab_size", -1)
    write_meta(output_prefix, max(largest), vocab_size)


def merge_datasets(input_prefixes: Sequence[str], output_prefix: str) -> str:
    """Concatenates indexed datasets, in the given order, into `output_prefix`.bin/.idx.

    Written under temporary names and renamed, `.idx` last, like a preprocessing output.

    Raises:
        FileNotFoundError: If an input's `.bin` or `.idx` is missing.
        ValueError: If no input is given or their token dtypes differ (they were made with
            tokenizers of different vocabulary sizes).
    """
    if not input_prefixes:
        raise ValueError("no datasets to merge")
    dtypes = {}
    for prefix in input_prefixes:
        for path in (get_bin_path(prefix), get_idx_path(prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"dataset file missing: {path} (data prefix {prefix})")
        dtypes[prefix] = _IndexReader(get_idx_path(prefix), multimodal=False).dtype
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{p}: {np.dtype(d).name}" for p, d in dtypes.items())
        raise ValueError(
            f"cannot merge datasets of different token dtypes ({listing}); preprocess them "
            "with the same tokenizer"
        )
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    suffix = f".tmp{os.getpid()}"
    tmp_bin, tmp_idx = get_bin_path(output_prefix) + suffix, get_idx_path(output_prefix) + suffix
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtypes[input_prefixes[0]])
    try:
        for prefix in input_prefixes:
            builder.add_index(prefix)
        builder.finalize(tmp_idx)
        if os.path.exists(get_idx_path(output_prefix)):
            os.remove(get_idx_path(output_prefix))
        os.replace(tmp_bin, get_bin_path(output_prefix))
        os.replace(tmp_idx, get_idx_path(output_prefix))
        _merge_meta(input_prefixes, output_prefix)
    finally:
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return output_prefix


def preprocess_corpus(
    input_files: Sequence[str],
    tokenizer_model: str,
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    partitions: int = 1,
    on_bad_line: str = "error",
    progress_interval: float | None = None,
    tokenizer_type: str = DEFAULT_TOKENIZER_TYPE,
    merge_file: str | None = None,
) -> PreprocessResult:
    """Tokenizes input files into one indexed dataset per key.

    Args:
        input_files: JSON lines (`.jsonl`/`.json`, optionally `.gz`), Parquet or plain text
            files; see `readers` for the formats.
        tokenizer_model: Path of the tokenizer model file.
        output_prefix: Output path prefix; dataset `{output_prefix}_{key}_document` is
            written for each key.
        json_keys: Keys (Parquet: columns) of the texts; plain text input takes one.
        append_eod: Whether to end every document with the EOD token, so that samples that
            span documents show where one ends.
        workers: Tokenizing processes in all; 1 tokenizes in the reading process.
        partitions: Contiguous parts of the input processed by separate processes (each with
            `workers // partitions` tokenizing processes) and merged in order.
        on_bad_line: "error" raises `BadRecordError` at the first bad record; "skip" leaves
            bad records out and lists them in the result.
        progress_interval: Seconds between progress lines on stderr; None prints none.
        tokenizer_type: Passed to `tokenizer.build_tokenizer`.
        merge_file: GPT2BPETokenizer's merges (`tokenizer_model` is then its vocabulary); the
            pair is read as the Hugging Face tokenizer `tokenizer.gpt2_bpe_folder` makes of it.

    Returns:
        The datasets' prefixes (as accepted by `build_datasets`), counts and timing.

    Raises:
        FileNotFoundError: If an input file or the tokenizer model does not exist.
        ImportError: If Parquet input is given without pyarrow installed.
        BadRecordError: At the first bad record, with `on_bad_line="error"`.
        ValueError: If the arguments are invalid or the inputs hold no document.
    """
    started = time.monotonic()
    input_files, keys = list(input_files), list(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise ValueError(f"json_keys must be distinct and at least one, got {keys}")
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
    if workers < 1 or partitions < 1:
        raise ValueError(f"workers and partitions must be >= 1, got {workers} and {partitions}")
    readers.check_inputs(input_files, keys)
    if tokenizer_type == "GPT2BPETokenizer":  # the workers read the same tokenizer as a folder
        tokenizer_type, tokenizer_model = ("HuggingFaceTokenizer",
                                           gpt2_bpe_folder(tokenizer_model, merge_file))
    build_tokenizer(tokenizer_type, tokenizer_model)

    data_prefixes = [f"{output_prefix}_{key}_document" for key in keys]
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    if partitions > 1:
        result = _tokenize_partitions(input_files, keys, tokenizer_type, tokenizer_model,
                                      data_prefixes, append_eod, workers, on_bad_line,
                                      partitions, progress_interval)
    else:
        result = _tokenize_range(input_files, keys, tokenizer_type, tokenizer_model,
                                 data_prefixes, append_eod, workers, on_bad_line, 0, None,
                                 _Progress(progress_interval))
    result.seconds = time.monotonic() - started
    if result.documents == 0:
        for prefix in data_prefixes:
            for path in (get_bin_path(prefix), get_idx_path(prefix), prefix + META_SUFFIX):
                if os.path.exists(path):
                    os.remove(path)
        raise ValueError(
            f"no documents found in {input_files} (json keys {keys}; "
            f"{result.bad_records} bad and {result.empty_records} empty records)"
        )
    return result


def preprocess(
    input_files: list[str],
    tokenizer_model: str,
    output_prefix: str,
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
    tokenizer_type: str = DEFAULT_TOKENIZER_TYPE,
) -> str:
    """Tokenizes one key of the input files; the single-dataset form of `preprocess_corpus`.

    Returns:
        The data prefix `{output_prefix}_{json_key}_document`, as accepted by `build_datasets`.
    """
    result = preprocess_corpus(input_files, tokenizer_model, output_prefix,
                               json_keys=[json_key], append_eod=append_eod, workers=workers,
                               tokenizer_type=tokenizer_type)
    return result.data_prefixes[json_key]
