"""The input formats of tokenizer training and preprocessing, read record by record.

Reading is split in two steps so that preprocessing can run the expensive one in worker
processes: `iter_records` only cuts a file into raw records (cheap, in the reading process),
`decode_record` parses one and extracts its texts (JSON parsing, in a worker). A record that
cannot be decoded comes back as a reason string, never as an exception, so the caller decides
whether a bad record is fatal or skipped, and always knows its file and line.

Formats, chosen by the file name (a trailing `.gz` is decompressed first):

- `.jsonl` / `.json`: one JSON object per line; blank lines are not records.
- `.parquet`: one record per row; the keys are column names (needs pyarrow).
- anything else: plain text, one record per block of lines separated by blank lines. It has
  no keys, so it takes exactly one.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterator, Sequence

JSON_LINES, PARQUET, TEXT = "jsonl", "parquet", "text"

_PARQUET_BATCH_ROWS = 1024


def input_format(path: str) -> str:
    """Returns `JSON_LINES`, `PARQUET` or `TEXT` for a file name."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".json")):
        return JSON_LINES
    if name.endswith(".parquet"):
        return PARQUET
    return TEXT


def check_inputs(paths: Sequence[str], keys: Sequence[str]) -> None:
    """Fails before any work if an input cannot be read with `keys`.

    Raises:
        FileNotFoundError: If a file does not exist.
        ImportError: If a Parquet file is given and pyarrow is missing.
        ValueError: If a Parquet file lacks a key column, is gzipped, or a plain text file is
            given more than one key.
    """
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
        fmt = input_format(path)
        if fmt == TEXT and len(keys) > 1:
            raise ValueError(
                f"{path} is plain text (one document per blank-line-separated block), which has "
                f"no keys to split into {list(keys)}; give a single --json-keys value or "
                "convert it to .jsonl"
            )
        if fmt == PARQUET:
            if path.endswith(".gz"):
                raise ValueError(f"{path}: Parquet compresses its own columns; pass it un-gzipped")
            _parquet_columns(path, keys)


def _import_parquet():
    try:
        import pyarrow.parquet
    except ImportError as err:
        raise ImportError(
            "reading .parquet input needs pyarrow, a dependency of megatron-nitp that is not "
            "installed here: `pip install pyarrow` (or convert the input to .jsonl)"
        ) from err
    return pyarrow.parquet


def _parquet_columns(path: str, keys: Sequence[str]):
    parquet = _import_parquet()
    try:
        file = parquet.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid for a corrupt file
        raise ValueError(f"cannot read Parquet file {path}: {err}") from err
    names = file.schema_arrow.names
    missing = [key for key in keys if key not in names]
    if missing:
        raise ValueError(
            f"{path} has no column {missing[0]!r} (columns: {', '.join(names)}); pass the "
            "names of the text columns as --json-keys"
        )
    return file


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_records(path: str, keys: Sequence[str]) -> Iterator[tuple[int, object]]:
    """Yields `(line_number, raw_record)` for every record of a file, in order.

    The raw record is the line's bytes (JSON lines), the tuple of the key columns' values
    (Parquet; the number is the 1-based row) or the block's text (plain text; the number is
    its first line). Nothing is parsed here: see `decode_record`.

    Raises:
        ValueError: If a plain text file is not valid UTF-8 (its blocks cannot be found
            without decoding it, so this is fatal).
    """
    fmt = input_format(path)
    if fmt == JSON_LINES:
        with _open_binary(path) as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield line_number, line
    elif fmt == PARQUET:
        file = _parquet_columns(path, keys)
        row = 0
        for batch in file.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=list(keys)):
            columns = [batch.column(key).to_pylist() for key in keys]
            for values in zip(*columns):
                row += 1
                yield row, values
    else:
        yield from _iter_text_blocks(path)


def _iter_text_blocks(path: str) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.endswith(".gz") else open
    block: list[str] = []
    start = line_number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    if not block:
                        start = line_number
                    block.append(line)
                elif block:
                    yield start, "".join(block).rstrip("\n")
                    block = []
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{line_number + 1}: not valid UTF-8 ({err})") from err
    if block:
        yield start, "".join(block).rstrip("\n")


def count_records(path: str, keys: Sequence[str]) -> int:
    """Counts the records of a file without decoding them (Parquet: from its metadata)."""
    fmt = input_format(path)
    if fmt == PARQUET:
        return _parquet_columns(path, keys).metadata.num_rows
    if fmt == JSON_LINES:
        with _open_binary(path) as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in _iter_text_blocks(path))


def decode_record(fmt: str, raw: object, keys: Sequence[str]) -> tuple[str, ...] | str:
    """Returns the texts of `keys` in a raw record, or the reason why it has none."""
    if fmt == TEXT:
        return (raw,)
    if fmt == PARQUET:
        values = raw
    else:
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            return f"not valid UTF-8 ({err})"
        except json.JSONDecodeError as err:
            return f"invalid JSON ({err})"
        if not isinstance(record, dict):
            return f"expected a JSON object, got {type(record).__name__}"
        missing = [key for key in keys if key not in record]
        if missing:
            return f"no key {missing[0]!r} (keys: {', '.join(map(str, record))})"
        values = tuple(record[key] for key in keys)
    for key, value in zip(keys, values):
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            return f"the value of {key!r} is {kind}, expected a string"
    return values


def location(path: str, fmt: str, line_number: int) -> str:
    """Where a record is, as `path:line` (Parquet: `path:row N`)."""
    return f"{path}:row {line_number}" if fmt == PARQUET else f"{path}:{line_number}"
