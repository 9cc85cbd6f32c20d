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
    build_datasets,
    build_tokenizer,
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
    return build_tokenizer("SentencePieceTokenizer", corpus["model"])


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
    assert tokenizer.vocab[ids[0]] == tokenizer.inv_vocab[ids[0]]


@pytest.fixture(scope="module")
def default_tokenizer():
    """The built-in corpus's tokenizer (vocab 4096, cached under ~/.cache/megatron-nitp)."""
    return build_tokenizer("SentencePieceTokenizer", prepare_default_corpus()[1])


def test_tokenizer_edge_cases(default_tokenizer):
    tok = default_tokenizer
    piece = {p: i for i, p in enumerate(tok.vocab)}  # megatron-core's vocab: pieces by id
    space = piece["\u2581"]  # SentencePiece's word-start marker

    # empty string: no tokens, and no tokens decode to the empty string
    assert tok.tokenize("") == []
    assert tok.detokenize([]) == ""

    # whitespace only: kept exactly (identity normalization, no whitespace collapsing); each
    # space is one marker piece after the dummy prefix, newline and tab are byte pieces
    assert tok.tokenize("   ") == [space] * 4
    for text in ("   ", " \n\t  \n", "\n", "\t"):
        ids = tok.tokenize(text)
        assert ids and tok.unk not in ids
        assert tok.detokenize(ids) == text
    assert tok.tokenize("\n") == [space, piece["<0x0A>"]]

    # a very long string (220,000 characters in one call): encoded whole, compressed, exact
    long = "In the beginning God created the heaven and the earth. " * 4000
    ids = tok.tokenize(long)
    assert len(long) / 8 < len(ids) < len(long) / 3
    assert tok.detokenize(ids) == long

    # characters absent from the KJV training text (emoji, CJK, NUL, U+FFFD) never become
    # <unk>: byte fallback spells out their UTF-8 bytes, and decoding restores them exactly
    for text in ("\U0001F600", "\u6f22\u5b57\u30c6\u30b9\u30c8", "\x00", "\ufffd"):
        ids = tok.tokenize(text)
        assert ids[0] == space
        assert [tok.vocab[i] for i in ids[1:]] == [f"<0x{b:02X}>" for b in text.encode()]
        assert tok.detokenize(ids) == text
    mixed = "And God said \U0001F600 \u5149 1611"
    assert tok.unk not in tok.tokenize(mixed) and tok.detokenize(tok.tokenize(mixed)) == mixed

    # special ids: EOD, pad and bos decode to nothing; <unk> to SentencePiece's " \u2047 "
    assert tok.detokenize([tok.eod, tok.pad, tok.bos]) == ""
    assert tok.detokenize([tok.unk]) == " \u2047 "

    # clear errors: an id outside the vocabulary, a non-string input
    with pytest.raises(IndexError, match="out of range"):
        tok.detokenize([tok.vocab_size])
    with pytest.raises(ValueError, match="str input"):
        tok.tokenize(None)


def test_tokenizer_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        build_tokenizer("SentencePieceTokenizer", str(bad))


def test_indexed_dataset_round_trip(corpus, tokenizer):
    assert os.path.basename(corpus["prefix"]) == "docs_content_document"
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


def test_a_split_without_documents_is_refused_instead_of_hanging(tmp_path, corpus, tokenizer):
    """Eight documents and --split 969,30,1: megatron-core would give validation no document
    and loop forever looking for its samples (round(0.969 * 8) = round(0.999 * 8) = 8); the
    message names a split that works."""
    text = tmp_path / "eight.txt"
    text.write_text("\n\n".join(f"document number {i} of eight" for i in range(8)) + "\n")
    prefix = preprocess([str(text)], corpus["model"], str(tmp_path / "eight"))
    with pytest.raises(ValueError, match=r"--split 969,30,1 gives the validation split none of "
                                         r"the 8 documents.*--split 844,155,0"):
        build_datasets(prefix, tokenizer, 8, 1, "969,30,1", (4, 2, None), str(tmp_path))
    train, valid, _ = build_datasets(prefix, tokenizer, 8, 1, "844,155,0", (4, 2, None),
                                     str(tmp_path))
    assert len(train) >= 4 and len(valid) >= 2
    # not asked for validation samples: still built by megatron-core, so still refused
    with pytest.raises(ValueError, match=r"validation split none.*--split 969,0,0"):
        build_datasets(prefix, tokenizer, 8, 1, "969,30,1", (4, None, None), str(tmp_path))


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
    """A 0.25 / 0.75 blend of two corpora whose tokens do not overlap draws 25% / 75% of its
    samples from each (megatron's BlendedDataset keeps the running shares on target)."""
    def make(name, documents):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        return preprocess([str(path)], corpus["model"], str(tmp_path / name))

    def token_set(prefix):
        dataset = IndexedDataset(prefix)
        return {int(t) for i in range(len(dataset)) for t in dataset[i]} - {tokenizer.eod}

    # digits only (split one per token) vs letters only: distinct pieces, apart from at most
    # the word-start marker that SentencePiece puts before each document
    first = make("digits", [" ".join(["1234567890" * 3] * 4) for _ in range(8)])
    second = make("letters", ["xyz qxz " * 30 for _ in range(8)])
    first_ids, second_ids = token_set(first), token_set(second)
    only_first, only_second = first_ids - second_ids, second_ids - first_ids
    assert only_first and only_second and len(first_ids & second_ids) <= 1

    num_samples = 400
    train, _, _ = build_datasets(
        ["0.25", first, "0.75", second], tokenizer, SEQ_LENGTH, 1, "1,0,0",
        (num_samples, 0, 0), str(tmp_path / "index-cache"),
    )
    assert len(train) == num_samples
    counts = [0, 0]
    for i in range(num_samples):
        sample = train[i]
        ids = {int(t) for t in sample["tokens"]} | {int(sample["labels"][-1])}
        source = [bool(ids & only_first), bool(ids & only_second)]
        assert source in ([True, False], [False, True]), f"sample {i} mixes or lacks its source"
        assert int(sample["dataset_id"]) == source.index(True)
        counts[source.index(True)] += 1
    assert counts[0] / num_samples == pytest.approx(0.25, abs=0.02)
    assert counts[1] / num_samples == pytest.approx(0.75, abs=0.02)
    # every prefix of the sample order keeps the proportions too, as micro-batches see them
    first_hundred = sum(int(train[i]["dataset_id"]) == 0 for i in range(100))
    assert first_hundred == pytest.approx(25, abs=2)
    batch = next(MicroBatchIterator(train, micro_batch_size=8))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (8, SEQ_LENGTH)


def _prepare(cache_dir, vocab_size):
    prepare_default_corpus(cache_dir, vocab_size)


@pytest.mark.distributed
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
    tokenizer = build_tokenizer("SentencePieceTokenizer", model)
    dataset = IndexedDataset(data_prefix)
    assert tokenizer.vocab_size == 512
    assert len(dataset.document_indices) - 1 == 1189
    assert dataset[0][-1] == tokenizer.eod
    assert tokenizer.detokenize(dataset[0][:20]).startswith("In the beginning God")


@pytest.mark.distributed
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
    cli_bin = tmp_path / "cli_content_document.bin"
    with open(corpus["prefix"] + ".bin", "rb") as a, open(cli_bin, "rb") as b:
        assert a.read() == b.read()
    assert f"{len(corpus['documents'])} documents" in out


def test_per_split_paths_and_a_validation_set_independent_of_the_seed(corpus, tokenizer,
                                                                      tmp_path):
    """--train/valid/test-data-path: each split reads its own prefixes (megatron-core's
    blend_per_split); the validation batches are the same whatever --seed is, the training
    order is not."""
    def make(name, documents):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        return preprocess([str(path)], corpus["model"], str(tmp_path / name))

    train_prefix = make("train", corpus["documents"][:30])
    valid_prefix = make("valid", corpus["documents"][30:])
    held_out = IndexedDataset(valid_prefix)  # kept alive: its items are views of its mmap
    valid_tokens = {int(t) for i in range(len(held_out)) for t in held_out[i]}

    def build(seed):
        return build_datasets([], tokenizer, SEQ_LENGTH, seed, None, (16, 8, 0),
                              str(tmp_path / "index-cache"),
                              per_split=[[train_prefix], [valid_prefix], None])

    train_a, valid_a, test_a = build(1)
    train_b, valid_b, _ = build(2)
    assert test_a is None and len(valid_a) == len(valid_b) >= 8
    for i in range(8):
        assert {int(t) for t in valid_a[i]["tokens"]} <= valid_tokens
        assert torch.equal(valid_a[i]["tokens"], valid_b[i]["tokens"])
    assert any(not torch.equal(train_a[i]["tokens"], train_b[i]["tokens"]) for i in range(16))


def test_per_split_paths_are_checked_before_any_work(capsys):
    from megatron_nitp.training.arguments import parse_args

    def error(*flags):
        with pytest.raises(SystemExit):
            parse_args(list(flags) + ["--train-iters", "50"])
        return capsys.readouterr().err

    assert "are exclusive" in error("--data-path", "a", "--train-data-path", "b",
                                    "--tokenizer-model", "t.model")
    assert "--valid-data-path / --test-data-path need --train-data-path" in error(
        "--valid-data-path", "v", "--tokenizer-model", "t.model")
    assert "--train-data-path needs --tokenizer-model" in error("--train-data-path", "b")


def test_data_files_give_the_datasets_of_the_equivalent_flags(corpus, tokenizer, tmp_path):
    """--data-args-path (Megatron-LM's: the --data-path value in a file) and
    --per-split-data-args-path (a JSON of the three splits) are read into the path flags, so
    the same datasets are built and the config records the prefixes themselves."""
    from megatron_nitp.training.arguments import parse_args

    second = preprocess([str(corpus["jsonl"])], corpus["model"], str(tmp_path / "second"),
                        json_key="content")
    common = ["--tokenizer-model", corpus["model"], "--train-iters", "50"]
    blend = ["0.3", corpus["prefix"], "0.7", second]
    (tmp_path / "blend.txt").write_text(f"{blend[0]} {blend[1]}\n  {blend[2]}\t{blend[3]}\n")
    from_file = parse_args(common + ["--data-args-path", str(tmp_path / "blend.txt")])
    from_flags = parse_args(common + ["--data-path", *blend])
    assert from_file.data.data_path == from_flags.data.data_path == tuple(blend)
    assert from_file.source("data_path") == "file --data-args-path"
    (tmp_path / "split.json").write_text(json.dumps(
        {"train": f"0.5 {corpus['prefix']} 0.5 {second}", "valid": [second], "test": None}))
    per_split = parse_args(common + ["--per-split-data-args-path", str(tmp_path / "split.json")])
    per_flags = parse_args(common + ["--train-data-path", "0.5", corpus["prefix"], "0.5", second,
                                     "--valid-data-path", second])
    assert [per_split.data.train_data_path, per_split.data.valid_data_path, per_split.data.test_data_path] == [
        per_flags.data.train_data_path, per_flags.data.valid_data_path, None]

    def build(config):
        per = [config.data.train_data_path, config.data.valid_data_path, config.data.test_data_path]
        return build_datasets(list(config.data.data_path or ()), tokenizer, SEQ_LENGTH, 1,
                              "90,10,0", (16, 4, 0), str(tmp_path / "index-cache"),
                              per_split=([list(p) if p else None for p in per]
                                         if config.data.train_data_path else None))

    for a, b in ((from_file, from_flags), (per_split, per_flags)):
        (train_a, valid_a, _), (train_b, valid_b, _) = build(a), build(b)
        assert len(train_a) == len(train_b) and len(valid_a) == len(valid_b)
        for i in range(8):
            assert torch.equal(train_a[i]["tokens"], train_b[i]["tokens"])
            assert torch.equal(valid_a[i % len(valid_a)]["tokens"],
                               valid_b[i % len(valid_b)]["tokens"])


def test_data_files_errors_name_the_file_and_the_format(tmp_path, capsys):
    from megatron_nitp.training.arguments import parse_args

    def error(*flags):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(list(flags) + ["--tokenizer-model", "t.model", "--train-iters", "50"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    blend, split = tmp_path / "blend.txt", tmp_path / "split.json"
    blend.write_text("a_text_document\n")
    split.write_text('{"train": ["a_text_document"]}')
    assert "--data-path and --data-args-path are exclusive" in error(
        "--data-args-path", str(blend), "--data-path", "b")
    assert "--train-data-path and --per-split-data-args-path are exclusive" in error(
        "--per-split-data-args-path", str(split), "--train-data-path", "b")
    assert "--data-args-path and --per-split-data-args-path are exclusive" in error(
        "--data-args-path", str(blend), "--per-split-data-args-path", str(split))
    missing = error("--data-args-path", str(tmp_path / "none.txt"))
    assert "none.txt cannot be read" in missing and "[w1] p1 [w2] p2" in missing
    (tmp_path / "empty.txt").write_text(" \n")
    assert "empty.txt is empty" in error("--data-args-path", str(tmp_path / "empty.txt"))
    for text, why in (("[1, 2", "is not valid JSON"), ('["a"]', "not an object"),
                      ('{"valid": ["a"]}', 'no "train" split'),
                      ('{"train": ["a"], "validation": ["b"]}', "['validation'] are not splits"),
                      ('{"train": {"a": 1}}', '"train" is dict')):
        split.write_text(text)
        message = error("--per-split-data-args-path", str(split))
        assert why in message and str(split) in message and '{"train": [...]' in message
    # the prefixes a file lists meet the same checks at start as the flags' (missing .bin/.idx)
    blend.write_text(f"1 {tmp_path / 'nothing_text_document'}")
    config = parse_args(["--data-args-path", str(blend), "--tokenizer-model", "t.model",
                         "--train-iters", "50"])
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_nitp.data.datasets import check_data_prefixes

    with pytest.raises(FileNotFoundError, match="nothing_text_document.bin"):
        check_data_prefixes(get_blend_from_list(list(config.data.data_path))[0])
