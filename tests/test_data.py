"""Tests of the data pipeline: tokenizer, preprocessing, datasets, micro-batches and CLIs."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_nitp.data import (
    MicroBatchIterator,
    SentencePieceTokenizer,
    build_datasets,
    prepare_default_corpus,
    preprocess,
    train_sentencepiece,
)
from megatron_nitp.data.corpus import kjv_chapters

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LENGTH = 32


def _normalize(text):
    return " ".join(text.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small KJV-derived jsonl corpus, its tokenizer and its indexed dataset."""
    root = tmp_path_factory.mktemp("corpus")
    documents = kjv_chapters()[:40]
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": d}) + "\n" for d in documents))
    model = train_sentencepiece([str(jsonl)], str(root / "tok"), vocab_size=400, json_key="content")
    prefix = preprocess([str(jsonl)], model, str(root / "docs"), json_key="content")
    return {"root": root, "documents": documents, "jsonl": jsonl, "model": model, "prefix": prefix}


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return SentencePieceTokenizer(corpus["model"])


@pytest.fixture(scope="module")
def train_dataset(corpus, tokenizer):
    train, valid, test = build_datasets(
        corpus["prefix"], tokenizer, SEQ_LENGTH, seed=1234, split="90,10,0",
        num_samples=(64, 8, 0), cache_dir=str(corpus["root"] / "index-cache"),
    )
    assert valid is not None and test is None
    return train


def test_tokenizer_round_trip_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == 400
    assert len({tokenizer.eod, tokenizer.pad, tokenizer.unk}) == 3
    text = "And God said,\nLet there be light: ☃ 1611"
    ids = tokenizer.tokenize(text)
    assert tokenizer.unk not in ids
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.vocab[tokenizer.inv_vocab[ids[0]]] == ids[0]


def test_tokenizer_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceTokenizer(str(bad))


def test_indexed_dataset_round_trip(corpus, tokenizer):
    assert os.path.basename(corpus["prefix"]) == "docs_text_document"
    dataset = IndexedDataset(corpus["prefix"])
    assert len(dataset.document_indices) - 1 == len(corpus["documents"])
    for i, document in enumerate(corpus["documents"]):
        ids = dataset[i]
        assert ids[-1] == tokenizer.eod
        assert tokenizer.eod not in ids[:-1]
        assert _normalize(tokenizer.detokenize(ids[:-1])) == _normalize(document)


def test_preprocess_text_blocks_and_no_eod(tmp_path, corpus, tokenizer):
    text = tmp_path / "plain.txt"
    text.write_text("first document\nstill first\n\n\nsecond document\n")
    prefix = preprocess([str(text)], corpus["model"], str(tmp_path / "plain"), append_eod=False)
    dataset = IndexedDataset(prefix)
    assert [tokenizer.detokenize(dataset[i]) for i in range(len(dataset))] == [
        "first document\nstill first",
        "second document",
    ]


def test_preprocess_failures_leave_no_dataset(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        preprocess([str(tmp_path / "missing.jsonl")], corpus["model"], str(tmp_path / "a"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        preprocess([str(empty)], corpus["model"], str(tmp_path / "b"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        preprocess([str(broken)], corpus["model"], str(tmp_path / "c"))
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith((".jsonl", ".txt"))]
    assert leftovers == []


def test_dataset_samples(train_dataset, tokenizer):
    assert len(train_dataset) >= 64
    batch = next(MicroBatchIterator(train_dataset, micro_batch_size=4))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    for value in batch.values():
        assert value.shape == (4, SEQ_LENGTH)
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"][0], torch.arange(SEQ_LENGTH))
    assert bool((batch["loss_mask"] == 1).all())
    assert int(batch["tokens"].max()) < tokenizer.vocab_size


def test_micro_batches_follow_megatron_data_parallel_order(train_dataset):
    single = MicroBatchIterator(train_dataset, micro_batch_size=4)
    ranks = [
        MicroBatchIterator(train_dataset, 2, data_parallel_rank=r, data_parallel_size=2)
        for r in range(2)
    ]
    for _ in range(3):
        expected = next(single)
        parts = [next(rank) for rank in ranks]
        assert torch.equal(torch.cat([p["tokens"] for p in parts]), expected["tokens"])
    assert single.consumed_samples == ranks[0].consumed_samples == ranks[1].consumed_samples == 12

    resumed = MicroBatchIterator(train_dataset, 4, consumed_samples=8)
    fresh = MicroBatchIterator(train_dataset, 4)
    for _ in range(2):
        next(fresh)
    assert torch.equal(next(resumed)["tokens"], next(fresh)["tokens"])

    near_end = MicroBatchIterator(train_dataset, 4, consumed_samples=len(train_dataset) - 3)
    with pytest.raises(StopIteration, match="exhausted"):
        next(near_end)


def test_missing_data_prefix_names_the_file(corpus, tokenizer, tmp_path):
    missing = str(tmp_path / "nothing_text_document")
    with pytest.raises(FileNotFoundError, match="nothing_text_document.bin.*preprocess_data.py"):
        build_datasets(missing, tokenizer, SEQ_LENGTH, 1, "1,0,0", (8, 0, 0), str(tmp_path))
    blend = ["0.5", corpus["prefix"], "0.5", missing]
    with pytest.raises(FileNotFoundError, match="nothing_text_document"):
        build_datasets(blend, tokenizer, SEQ_LENGTH, 1, "1,0,0", (8, 0, 0), str(tmp_path))


def test_weighted_blend(corpus, tokenizer, tmp_path):
    other = preprocess([str(corpus["jsonl"])], corpus["model"], str(tmp_path / "other"),
                       json_key="content")
    blend = ["0.25", corpus["prefix"], "0.75", other]
    train, _, _ = build_datasets(
        blend, tokenizer, SEQ_LENGTH, 1, "1,0,0", (40, 0, 0), str(tmp_path / "index-cache")
    )
    assert len(train) == 40
    batch = next(MicroBatchIterator(train, micro_batch_size=8))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (8, SEQ_LENGTH)


def _prepare(cache_dir, vocab_size):
    prepare_default_corpus(cache_dir, vocab_size)


def test_default_corpus_concurrent_build_and_reuse(tmp_path, capfd):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_prepare, args=(str(tmp_path), 512)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert capfd.readouterr().out.count("preparing default corpus") == 1

    data_prefix, model = prepare_default_corpus(str(tmp_path), 512)
    assert capfd.readouterr().out == ""
    tokenizer = SentencePieceTokenizer(model)
    dataset = IndexedDataset(data_prefix)
    assert tokenizer.vocab_size == 512
    assert len(dataset.document_indices) - 1 == 1189
    assert dataset[0][-1] == tokenizer.eod
    assert tokenizer.detokenize(dataset[0][:20]).startswith("In the beginning God")


def test_command_line_tools(tmp_path, corpus):
    def run(script, *args):
        return subprocess.Popen(
            [sys.executable, os.path.join("tools", script), *args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    train = run(
        "train_tokenizer.py", "--input", str(corpus["jsonl"]), "--json-key", "content",
        "--output-prefix", str(tmp_path / "cli_tok"), "--vocab-size", "360",
    )
    prep = run(
        "preprocess_data.py", "--input", str(corpus["jsonl"]), "--json-keys", "content",
        "--tokenizer-model", corpus["model"], "--output-prefix", str(tmp_path / "cli"),
        "--workers", "2",
    )
    for process in (train, prep):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    assert (tmp_path / "cli_tok.model").is_file()
    with open(corpus["prefix"] + ".bin", "rb") as a, open(tmp_path / "cli_text_document.bin", "rb") as b:
        assert a.read() == b.read()
    assert f"{len(corpus['documents'])} documents" in out
