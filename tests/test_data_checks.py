"""The data is checked before any work: every split that will be built has documents, every
``.bin`` is the size its ``.idx`` says, and the token ids fit the tokenizer; each refusal is one
line naming the file and the fix (a small corpus used to hang, a truncated ``.bin`` to fail at
the first step naming no file or to train on, a larger tokenizer's ids to end in an
IndexError)."""

import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_nitp.data import build_datasets, build_tokenizer, preprocess
from megatron_nitp.data import datasets as data
from megatron_nitp.data.meta import write_meta
from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.loop import UsageError, pretrain

VOCAB = 64  # NullTokenizer: ids 0..63, 63 = EOD


def _write(prefix, documents: int, tokens_per_document: int = 20, largest: int = VOCAB - 2):
    """An indexed dataset of ``documents`` documents (uint16 ids below ``largest``, one id
    equal to it, EOD last), without the side file preprocessing writes."""
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for i in range(documents):
        ids = rng.integers(0, largest, tokens_per_document - 1).astype(np.uint16)
        if i == documents // 2:
            ids[0] = largest
        ids = np.append(ids, VOCAB - 1).astype(np.uint16)
        builder.add_document(ids, [ids.size])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _tokenizer(vocab=VOCAB):
    return build_tokenizer("NullTokenizer", None, vocab)


def _pretrain_error(tmp_path, prefix, *flags):
    """The one-line UsageError a tiny run on ``prefix`` stops with, before the run folder."""
    args = parse_args([
        "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "4", "--lr-warmup-iters", "0",
        "--nitp-target-layer", "1",
        "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
        "--data-cache-path", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
        "--no-progress-bar", *flags])
    with pytest.raises(UsageError) as exc:
        pretrain(args)
    assert not (tmp_path / "run").exists(), "nothing may be written before the checks pass"
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_small_corpus_with_the_default_split_is_refused_with_a_split_that_works(dist, tmp_path):
    """148 documents, --split 969,30,1: the test split gets none (round(0.999 * 148) = 148), is
    asked for 0 samples, and megatron-core's GPTDataset would loop forever building it."""
    prefix = _write(tmp_path / "small", 148)
    message = _pretrain_error(tmp_path, prefix)
    assert message.startswith("--split 969,30,1 gives the test split none of the 148 documents "
                              f"of {prefix} (the run asks it for 0 samples")
    assert "use --split 969,30,0," in message
    assert data.working_split([969, 30, 1], {prefix: 148}, (16, 40, 0)) == [969, 30, 0]
    train, valid, test = build_datasets(prefix, _tokenizer(), 16, 1, "969,30,0", (16, 40, 0),
                                        str(tmp_path / "cache"))
    assert test is None and len(train) >= 16 and len(valid) >= 40


def test_the_suggested_split_gives_every_asked_split_documents(tmp_path):
    """Eight documents: validation (asked for samples) takes documents from training, the test
    split (asked for none) is dropped; the suggestion is built without error."""
    prefix = _write(tmp_path / "eight", 8)
    with pytest.raises(ValueError) as exc:
        data.check_split([prefix], "969,30,1", (4, 2, 0))
    assert "gives the validation split none of the 8 documents" in str(exc.value)
    assert "use --split 844,155,0," in str(exc.value)
    train, valid, test = build_datasets(prefix, _tokenizer(), 8, 1, "844,155,0", (4, 2, 0),
                                        str(tmp_path))
    assert test is None and len(train) >= 4 and len(valid) >= 2
    # one document cannot be split between training and validation
    one = _write(tmp_path / "one", 1)
    with pytest.raises(ValueError, match="none of the 1 document of .*: use more documents, or "
                                         "give the splits their own data"):
        data.check_split([one], "90,10,0", (4, 2, 0))


@pytest.mark.parametrize("change", [-764, -1, 10])
def test_a_bin_of_the_wrong_size_is_refused_naming_both_sizes(dist, tmp_path, change):
    prefix = _write(tmp_path / "cut", 300)
    expected = os.path.getsize(prefix + ".bin")
    assert expected == 300 * 20 * 2
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(expected + change)
    message = _pretrain_error(tmp_path, prefix, "--split", "90,10,0")
    what = "truncated" if change < 0 else "longer than its index"
    assert message == (
        f"{prefix}.bin is {expected + change:,} bytes but {prefix}.idx describes {expected:,} "
        f"bytes: the file is {what} (an interrupted copy?); copy it again or re-run "
        "tools/preprocess_data.py to remake it.")


def test_token_ids_beyond_the_vocabulary_are_refused(dist, tmp_path, monkeypatch):
    """Without a side file the .bin is scanned; with one its record is used (a side file of
    another .bin, another size, is ignored); a .bin too large to scan is named in a note."""
    prefix = _write(tmp_path / "big", 300, largest=100)
    message = _pretrain_error(tmp_path, prefix, "--split", "90,10,0")
    assert message == (
        f"{prefix}.bin holds token id 100 (from {prefix}.bin) but the tokenizer has 64 tokens "
        "(ids 0-63): the data was made with another tokenizer. Pass that tokenizer's "
        "--tokenizer-type/--tokenizer-model, or re-run tools/preprocess_data.py to remake it "
        "with this tokenizer.")
    write_meta(prefix, 70, 128)
    with pytest.raises(ValueError, match=rf"token id 70 \(from {prefix}.meta.json\)"):
        data.check_token_ids([prefix], VOCAB)
    assert data.check_token_ids([prefix], 71) == []
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    assert data.recorded_max_token_id(prefix) is None  # stale: describes the old size
    fits = _write(tmp_path / "fits", 30)
    assert data.max_token_id(fits) == (VOCAB - 1, fits + ".bin")
    monkeypatch.setattr(data, "SCAN_LIMIT_BYTES", 1000)
    (note,) = data.check_token_ids([prefix], VOCAB)
    assert note.startswith(f"{prefix}.bin has no .meta.json side file and is over 0 MiB")


def test_preprocessing_records_the_largest_token_id(tmp_path):
    from megatron_nitp.data import merge_datasets, train_sentencepiece

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"document {i}: the quick brown fox {i * 7}" for i in range(30)))
    model = train_sentencepiece([str(text)], str(tmp_path / "tok"), vocab_size=320)
    prefix = preprocess([str(text)], model, str(tmp_path / "docs"))
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16)
    with open(prefix + ".meta.json") as f:
        meta = json.load(f)
    assert meta == {"max_token_id": int(tokens.max()), "vocab_size": 320,
                    "bin_bytes": tokens.size * 2}
    merged = merge_datasets([prefix, prefix], str(tmp_path / "merged"))
    assert data.recorded_max_token_id(merged) == int(tokens.max())
    os.remove(prefix + ".meta.json")
    merge_datasets([prefix, prefix], merged)
    assert not os.path.exists(merged + ".meta.json")


def test_dry_run_checks_the_data_it_can_read(tmp_path, capsys):
    from megatron_nitp.accounting.dry_run import dry_run

    prefix = _write(tmp_path / "small", 148)
    flags = ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size",
             str(VOCAB), "--train-iters", "10", "--lr-warmup-iters", "0"]
    assert dry_run(parse_args(flags)) == 2
    captured = capsys.readouterr()
    assert "fits" not in captured.out
    assert captured.err.startswith("error: --split 969,30,1 gives the test split none of the "
                                   "148 documents")
    assert dry_run(parse_args(flags + ["--split", "969,30,0"])) == 0
    assert "data            1 dataset(s): file sizes, split, token ids checked" in (
        capsys.readouterr().out)
    missing = str(tmp_path / "elsewhere_text_document")
    assert dry_run(parse_args(flags[2:] + ["--data-path", missing])) == 0
    assert (f"data            not checked here (dataset file missing or unreadable: {missing}.bin)"
            in capsys.readouterr().out)


def test_a_cut_index_and_a_dataset_without_documents_are_refused(tmp_path):
    prefix = _write(tmp_path / "cut", 50)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError) as exc:
        data.check_data([prefix], "90,10,0", (4, 2, 0), VOCAB)
    assert str(exc.value).startswith(f"{prefix}.idx is not a complete megatron-core index (")
    assert str(exc.value).endswith("); copy it again or re-run tools/preprocess_data.py to "
                                   "remake it.")
    empty = _write(tmp_path / "empty", 0)
    with pytest.raises(ValueError, match=f"^{empty} holds no document: re-run "):
        data.check_data([empty], None, (4, 2, 0), VOCAB)  # per-split data: no --split
