"""Corpus-scale preprocessing: workers, partitions and merging give the same bytes; input
formats (.jsonl, .jsonl.gz, Parquet) give the same dataset; several keys; EOD; bad records
reported with file:line, skipped or fatal; progress lines."""

import gzip
import importlib
import json
import os
import sys

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_nitp.data.corpus import kjv_chapters
from megatron_nitp.data.preprocess import BadRecordError, merge_datasets, preprocess_corpus
from megatron_nitp.data.tokenizer import build_tokenizer, train_sentencepiece
from tests.helpers import load_tool


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 short documents (with a title each) as .jsonl, and a small tokenizer trained on them."""
    root = tmp_path_factory.mktemp("preprocess")
    records = [{"text": chapter[:400], "title": f"Chapter {i}"}
               for i, chapter in enumerate(kjv_chapters()[:60])]
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    model = train_sentencepiece([str(jsonl)], str(root / "tok"), vocab_size=400)
    return {"root": root, "records": records, "jsonl": str(jsonl), "model": model}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 records, so that 60 records make several tasks per worker and partition
    (forked processes inherit the patched value)."""
    module = importlib.import_module("megatron_nitp.data.preprocess")
    monkeypatch.setattr(module, "_CHUNK_RECORDS", 7)


def _bytes(prefix):
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


def _run(data, out, inputs=None, **kwargs):
    return preprocess_corpus(inputs or [data["jsonl"]], data["model"], str(data["root"] / out),
                             **kwargs)


def test_build_tokenizer(data):
    tokenizer = build_tokenizer("SentencePieceTokenizer", data["model"])
    assert tokenizer.vocab_size == 400
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'BertWordPieceLowerCase'.*"
                                         "SentencePieceTokenizer"):
        build_tokenizer("BertWordPieceLowerCase", data["model"])


def test_workers_and_partitions_write_the_same_bytes(data, small_chunks):
    single = _run(data, "w1", json_keys=["text", "title"])
    assert single.documents == 60
    expected = {key: _bytes(prefix) for key, prefix in single.data_prefixes.items()}
    for name, workers, partitions in (("w2", 2, 1), ("p3", 1, 3), ("w2p2", 2, 2)):
        result = _run(data, name, json_keys=["text", "title"], workers=workers,
                      partitions=partitions)
        assert (result.documents, result.tokens) == (single.documents, single.tokens)
        for key, prefix in result.data_prefixes.items():
            assert _bytes(prefix) == expected[key], (name, key)
    leftovers = [p for p in os.listdir(data["root"]) if "tmp" in p]
    assert leftovers == []


def test_several_keys_make_aligned_datasets(data):
    result = _run(data, "keys", json_keys=["text", "title"])
    assert result.data_prefixes == {key: str(data["root"] / f"keys_{key}_document")
                                    for key in ("text", "title")}
    tokenizer = build_tokenizer("SentencePieceTokenizer", data["model"])
    texts, titles = (IndexedDataset(result.data_prefixes[k]) for k in ("text", "title"))
    assert len(texts) == len(titles) == len(data["records"])
    for i in (0, 17, 59):
        assert tokenizer.detokenize(texts[i][:-1]) == data["records"][i]["text"]
        assert tokenizer.detokenize(titles[i][:-1]) == f"Chapter {i}"
    assert result.tokens == int(texts.sequence_lengths.sum() + titles.sequence_lengths.sum())


def _same_as_plain(data, name, inputs):
    plain = _run(data, "plain", json_keys=["text", "title"])
    result = _run(data, name, inputs=inputs, json_keys=["text", "title"], workers=2)
    for key in ("text", "title"):
        assert _bytes(result.data_prefixes[key]) == _bytes(plain.data_prefixes[key]), key


def test_gzip_jsonl_gives_the_dataset_of_plain_jsonl(data):
    gz = data["root"] / "docs.jsonl.gz"
    with open(data["jsonl"], "rb") as f:
        gz.write_bytes(gzip.compress(f.read()))
    _same_as_plain(data, "gz", [str(gz)])


def test_parquet_gives_the_dataset_of_plain_jsonl(data):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    # two files with several row groups each, and a column that is not read
    for half, rows in (("a", data["records"][:25]), ("b", data["records"][25:])):
        table = pyarrow.table({"title": [r["title"] for r in rows],
                               "text": [r["text"] for r in rows], "id": list(range(len(rows)))})
        pyarrow.parquet.write_table(table, data["root"] / f"docs_{half}.parquet",
                                    row_group_size=10)
    _same_as_plain(data, "parquet", [str(data["root"] / f"docs_{h}.parquet") for h in "ab"])
    bad = data["root"] / "nulls.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["fine", None, "fine too"]}), bad)
    with pytest.raises(BadRecordError, match="nulls.parquet:row 2: the value of 'text' is null"):
        _run(data, "nulls", inputs=[str(bad)])


def test_parquet_without_pyarrow_or_column_is_a_clear_error(data, monkeypatch):
    path = data["root"] / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs pyarrow.*pip install pyarrow"):
        _run(data, "nopyarrow", inputs=[str(path)])
    monkeypatch.undo()
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"body": ["a b c"]}), path)
    with pytest.raises(ValueError, match="x.parquet has no column 'text' \\(columns: body\\)"):
        _run(data, "nocolumn", inputs=[str(path)])


def test_append_eod(data):
    tokenizer = build_tokenizer("SentencePieceTokenizer", data["model"])
    with_eod = IndexedDataset(_run(data, "eod").data_prefixes["text"])
    without = IndexedDataset(_run(data, "noeod", append_eod=False).data_prefixes["text"])
    assert len(with_eod) == len(without) == 60
    assert (with_eod.sequence_lengths == without.sequence_lengths + 1).all()
    for i in range(60):
        assert with_eod[i][-1] == tokenizer.eod and tokenizer.eod not in without[i]
        assert (with_eod[i][:-1] == without[i]).all()


BAD_LINES = [
    '{"text": "In the beginning"}',
    '{"text": "unfinished',
    '',
    '{"title": "no text"}',
    '{"text": 1611}',
    '["text"]',
    '{"text": null}',
    '{"text": "and the earth"}',
]


def test_bad_records_are_skipped_and_listed(data):
    path = data["root"] / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    for workers, partitions in ((1, 1), (2, 1), (1, 2)):
        result = _run(data, f"bad{workers}{partitions}", inputs=[str(path)], on_bad_line="skip",
                      workers=workers, partitions=partitions)
        assert (result.documents, result.bad_records) == (2, 5)
        invalid_json, *others = result.bad_record_messages
        assert invalid_json.startswith(f"{path}:2: invalid JSON (")
        assert others == [
            f"{path}:4: no key 'text' (keys: title)",
            f"{path}:5: the value of 'text' is int, expected a string",
            f"{path}:6: expected a JSON object, got list",
            f"{path}:7: the value of 'text' is null, expected a string",
        ]
    summary = result.summary()
    assert "skipped 5 bad records:" in summary and f"  {path}:4: no key 'text'" in summary


def test_bad_record_is_fatal_by_default(data, capsys):
    path = data["root"] / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    with pytest.raises(BadRecordError, match=f"{path}:2: invalid JSON.*--on-bad-line skip"):
        _run(data, "fatal", inputs=[str(path)], workers=2, partitions=2)
    tool = load_tool("preprocess_data")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--input", str(path), "--tokenizer-model", data["model"],
                   "--output-prefix", str(data["root"] / "fatal")])
    assert exit_info.value.code == 2
    assert f"error: bad record at {path}:2: invalid JSON" in capsys.readouterr().err
    assert not [p for p in os.listdir(data["root"]) if p.startswith("fatal")]


def test_progress_lines_and_summary(data, capsys):
    tool = load_tool("preprocess_data")
    tool.main(["--input", data["jsonl"], "--tokenizer-model", data["model"],
               "--output-prefix", str(data["root"] / "cli"), "--log-interval", "0"])
    out, err = capsys.readouterr()
    assert "docs/s" in err and "tokens/s" in err
    assert f"wrote {data['root'] / 'cli_text_document'}.bin/.idx" in out
    assert "60 documents" in out and "docs/s" in out and "tokens/s" in out


def test_merge_tool_equals_the_single_run(data, capsys):
    lines = open(data["jsonl"]).readlines()
    halves = []
    for name, part in (("first", lines[:31]), ("second", lines[31:])):
        halves.append(data["root"] / f"{name}.jsonl")
        halves[-1].write_text("".join(part))
    parts = data["root"] / "parts"
    for i, half in enumerate(halves):
        _run(data, f"parts/part{i:05d}", inputs=[str(half)])
    single = _run(data, "whole", inputs=[str(h) for h in halves])
    tool = load_tool("merge_datasets")
    tool.main(["--input", str(parts), "--output-prefix", str(data["root"] / "merged")])
    assert "merged 2 datasets" in capsys.readouterr().out
    assert _bytes(str(data["root"] / "merged")) == _bytes(single.data_prefixes["text"])

    (parts / "orphan.bin").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--input", str(parts), "--output-prefix", str(data["root"] / "merged2")])
    assert exit_info.value.code == 2
    assert "orphan.bin has no .idx" in capsys.readouterr().err


def test_merge_refuses_different_dtypes(data, tmp_path):
    small = _run(data, "dtype_small").data_prefixes["text"]
    wide = str(tmp_path / "wide")
    builder = IndexedDatasetBuilder(wide + ".bin", dtype=numpy.int32)
    builder.add_document(numpy.array([5, 70000], dtype=numpy.int32), [2])
    builder.finalize(wide + ".idx")
    with pytest.raises(ValueError, match="different token dtypes.*uint16.*int32"):
        merge_datasets([small, wide], str(tmp_path / "merged"))
    assert sorted(os.listdir(tmp_path)) == ["wide.bin", "wide.idx"]


def test_plain_text_takes_one_key(data):
    text = data["root"] / "plain.txt"
    text.write_text("first document\n\nsecond document\n")
    with pytest.raises(ValueError, match="plain text.*single --json-keys value"):
        _run(data, "plaintext", inputs=[str(text)], json_keys=["text", "title"])
    result = _run(data, "plaintext", inputs=[str(text)])
    assert result.documents == 2


def test_tokenizer_training_reads_the_same_formats(data):
    """train_tokenizer.py shares the readers: a .jsonl.gz is JSON lines, not plain text."""
    from megatron_nitp.data.tokenizer import iter_documents

    gz = data["root"] / "train.jsonl.gz"
    with open(data["jsonl"], "rb") as f:
        gz.write_bytes(gzip.compress(f.read()))
    assert list(iter_documents([str(gz)], "title")) == [r["title"] for r in data["records"]]
    bad = data["root"] / "bad_train.jsonl"
    bad.write_text("\n".join(BAD_LINES) + "\n")
    with pytest.raises(ValueError, match="bad_train.jsonl:2: invalid JSON"):
        list(iter_documents([str(bad)]))
