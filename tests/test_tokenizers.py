"""Megatron-LM's --tokenizer-type through megatron-core's tokenizer library, and --mock-data.

Every tokenizer is made here from local files (nothing is downloaded): a byte-level BPE
tokenizer.json trained on a few KB (HuggingFaceTokenizer), a tiktoken vocabulary in Megatron's
JSON format (TikTokenizer, when the tiktoken package is installed), a SentencePiece model, and
the NullTokenizer.
"""

import base64
import json
import os
import re

import pytest

from megatron_nitp.data.corpus import kjv_chapters
from megatron_nitp.data.tokenizer import (BPE_EOD, BPE_PAD, build_tokenizer, train_bpe,
                                          train_sentencepiece)
from megatron_nitp.training.arguments import parse_args
from tests.helpers import TINY_MODEL, TINY_RUN, load_tool

TEXT = "And God said,\nLet there be light: \u2603 1611  \U0001F600 and there was light."
TINY = TINY_MODEL + TINY_RUN + ["--seq-length", "32", "--nitp-target-layer", "1",
                                "--log-interval", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A few KB of text (jsonl), its byte-level BPE folder and a SentencePiece model."""
    root = tmp_path_factory.mktemp("tokenizers")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in kjv_chapters()[:8]))
    bpe = train_bpe([str(jsonl)], str(root / "bpe"), vocab_size=400)
    spm = train_sentencepiece([str(jsonl)], str(root / "spm"), vocab_size=400)
    return {"root": root, "jsonl": str(jsonl), "bpe": bpe, "spm": spm}


def test_huggingface_tokenizer_from_a_trained_bpe_folder_or_its_tokenizer_json(files):
    assert sorted(os.listdir(files["bpe"])) == ["tokenizer.json", "tokenizer_config.json"]
    for path in (files["bpe"], os.path.join(files["bpe"], "tokenizer.json")):
        tok = build_tokenizer("HuggingFaceTokenizer", path)
        assert tok.vocab_size == 400
        # EOD and pad are the BPE's own special tokens, distinct
        assert (tok.eod, tok.pad) == (0, 1)
        assert tok.inv_vocab[tok.eod] == BPE_EOD and tok.inv_vocab[tok.pad] == BPE_PAD
        ids = tok.tokenize(TEXT)
        assert tok.eod not in ids and max(ids) < tok.vocab_size  # no BOS/EOS added
        assert tok.detokenize(ids) == TEXT  # byte-level: exact, emoji included
    # transformers reads the same folder, offline, with the same ids
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(files["bpe"])
    assert hf.eos_token == BPE_EOD and hf(TEXT, add_special_tokens=False).input_ids == ids


def test_sentencepiece_tokenizer_is_the_default_kind(files):
    tok = build_tokenizer("SentencePieceTokenizer", files["spm"])
    assert tok.vocab_size == 400 and (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3)
    ids = tok.tokenize(TEXT)
    assert tok.unk not in ids and tok.detokenize(ids) == TEXT
    assert parse_args([]).data.tokenizer_type == "SentencePieceTokenizer"


def test_null_tokenizer_has_vocab_size_ids_the_last_eod_on_every_megatron_core():
    tok = build_tokenizer("NullTokenizer", None, 1000)
    assert (tok.vocab_size, tok.eod) == (1000, 999)
    assert tok.tokenize("5 17 3") == [5, 17, 3] and tok.detokenize([5, 17, 3]) == "5 17 3"


def test_tiktoken_tokenizer_from_a_local_vocabulary(tmp_path, monkeypatch):
    """tiktoken is in the test extras, so this runs in CI. Offline: the vocabulary is the local
    file written here (megatron-core builds ``tiktoken.Encoding`` from it), and any network
    connection (tiktoken's download of a named encoding) fails the test."""
    import socket

    pytest.importorskip("tiktoken")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access during the tiktoken test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    pieces = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the", b"an", b"and", b" and"]
    vocab = [{"rank": i, "token_bytes": base64.b64encode(p).decode(),
              "token_str": p.decode("utf-8", "replace")} for i, p in enumerate(pieces)]
    path = tmp_path / "tiktoken.json"
    path.write_text(json.dumps(vocab))
    tok = build_tokenizer("TikTokenizer", str(path))
    # the library reserves 1000 special ids (EOD "</s>" among them) below the file's tokens
    assert tok.vocab_size == 1000 + len(pieces) and tok.eod < 1000
    # megatron-core's TikTokenTokenizer decodes token by token (errors="replace"), so only
    # text whose characters are whole tokens round-trips: ASCII here (see build_tokenizer)
    ascii_text = TEXT.encode("ascii", "ignore").decode()
    ids = tok.tokenize(ascii_text)
    assert min(ids) >= 1000 and tok.detokenize(ids) == ascii_text
    assert 1000 + pieces.index(b" the") in tok.tokenize("in the beginning")


def test_bad_tokenizer_input_names_the_problem_and_the_fix(files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("HuggingFaceTokenizer", str(tmp_path / "nope")), FileNotFoundError,
         "tokenizer model not found"),
        (("HuggingFaceTokenizer", str(empty)), ValueError,
         "has no tokenizer.json.*save_pretrained.*train_tokenizer.py --type bpe"),
        (("HuggingFaceTokenizer", files["spm"]), ValueError,
         "looks like a SentencePiece model: use --tokenizer-type SentencePieceTokenizer"),
        (("SentencePieceTokenizer", files["bpe"]), ValueError,
         "is a folder: for a Hugging Face tokenizer folder use --tokenizer-type "
         "HuggingFaceTokenizer"),
        (("SentencePieceTokenizer", os.path.join(files["bpe"], "tokenizer.json")), ValueError,
         "not a SentencePiece .model: use --tokenizer-type HuggingFaceTokenizer"),
        (("SentencePieceTokenizer", files["jsonl"]), ValueError, "cannot read .*docs.jsonl"),
        (("TikTokenizer", files["spm"]), ValueError,
         "use --tokenizer-type SentencePieceTokenizer"),
        (("NullTokenizer", None), ValueError, "needs --vocab-size"),
        (("HuggingFaceTokenizer", None), ValueError, "needs --tokenizer-model"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            build_tokenizer(*args)
    # a tokenizer.json without a config naming its eos token: no EOD to end documents with
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text(open(os.path.join(files["bpe"], "tokenizer.json")).read())
    with pytest.raises(ValueError, match="defines no eos token.*eos_token"):
        build_tokenizer("HuggingFaceTokenizer", str(bare))


def test_flag_combinations_are_refused_at_parse_time(capsys):
    for flags, message in (
            (["--mock-data", "--data-path", "x"], "--mock-data generates its tokens"),
            (["--tokenizer-type", "NullTokenizer"], "NullTokenizer needs --vocab-size"),
            (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model"),
            (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "t"],
             "needs --data-path .* or --mock-data")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(flags)
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message


def test_train_tokenizer_tool_trains_a_bpe_folder(files, tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    tool.main(["--type", "bpe", "--input", files["jsonl"], "--output-prefix",
               str(tmp_path / "cli"), "--vocab-size", "300"])
    assert "--tokenizer-type HuggingFaceTokenizer" in capsys.readouterr().out
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "cli")).vocab_size == 300


def test_dry_run_reads_the_huggingface_tokenizers_vocabulary(files, capsys):
    from megatron_nitp.accounting.dry_run import dry_run

    code = dry_run(parse_args(["--tokenizer-type", "HuggingFaceTokenizer",
                               "--tokenizer-model", files["bpe"], "--data-path", "d"]))
    out = capsys.readouterr().out
    assert code == 0 and f"vocab 400 (the tokenizer's, {files['bpe']}), padded 512" in out
    code = dry_run(parse_args(["--mock-data", "--tokenizer-type", "NullTokenizer",
                               "--vocab-size", "1000"]))
    assert code == 0 and "vocab 1000 (--vocab-size), padded 1024" in capsys.readouterr().out


def test_stored_config_round_trips_the_tokenizer_and_defaults_to_sentencepiece(files):
    from megatron_nitp.config import RunConfig

    config = parse_args(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                         files["bpe"], "--data-path", "d"])
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["data"]["tokenizer_type"] == "HuggingFaceTokenizer"
    again = RunConfig.from_dict(stored)
    assert (again.data.tokenizer_type, again.data.tokenizer_model) == ("HuggingFaceTokenizer", files["bpe"])
    # a checkpoint written before --tokenizer-type existed: SentencePiece
    del stored["data"]["tokenizer_type"]
    assert RunConfig.from_dict(stored).data.tokenizer_type == "SentencePieceTokenizer"


@pytest.mark.slow
def test_megatron_lm_sentencepiece_kinds_gpt_and_llama2_through_preprocess_and_export(
        files, tmp_path):
    """GPTSentencePieceTokenizer is SentencePieceTokenizer here (pieces, EOD = eos);
    Llama2Tokenizer puts BOS before every text as Megatron-LM's does (``bos=False``: the pieces
    alone), so each preprocessed document is BOS, pieces, EOD, and the export's tokenizer.json
    adds BOS as training did. A model without BOS is refused, naming the kind that adds none."""
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_nitp.data import preprocess
    from megatron_nitp.export import TOKENIZER_RECORD, export_tokenizer, exported_tokenizer

    plain = build_tokenizer("SentencePieceTokenizer", files["spm"])
    ids = plain.tokenize(TEXT)
    assert build_tokenizer("GPTSentencePieceTokenizer", files["spm"]).tokenize(TEXT) == ids
    llama = build_tokenizer("Llama2Tokenizer", files["spm"])
    assert llama.tokenize(TEXT) == [1] + ids and llama.tokenize(TEXT, bos=False) == ids
    assert (llama.bos, llama.eod, llama.vocab_size) == (1, 2, 400) and llama.bos_first
    assert llama.detokenize(llama.tokenize(TEXT)) == TEXT

    prefix = preprocess([files["jsonl"]], files["spm"], str(tmp_path / "docs"),
                        tokenizer_type="Llama2Tokenizer", workers=2)
    documents = IndexedDataset(prefix)
    chapters = kjv_chapters()[:8]
    assert len(documents) == len(chapters)
    for document, chapter in zip(documents, chapters):
        assert document.tolist() == [1] + plain.tokenize(chapter) + [2]

    transformers = pytest.importorskip("transformers")
    config = parse_args(["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                         files["spm"], "--data-path", prefix])
    out = tmp_path / "export"
    out.mkdir()
    assert {"tokenizer.model", "tokenizer.json", TOKENIZER_RECORD} <= set(
        export_tokenizer(config, str(out)))
    assert transformers.AutoTokenizer.from_pretrained(str(out))(TEXT).input_ids == [1] + ids
    assert exported_tokenizer(str(out)).tokenize(TEXT) == [1] + ids

    sentencepiece.SentencePieceTrainer.train(
        input=str(files["jsonl"]), model_prefix=str(tmp_path / "nobos"), vocab_size=300,
        bos_id=-1, eos_id=1, unk_id=0, minloglevel=2)
    nobos = str(tmp_path / "nobos.model")
    assert build_tokenizer("GPTSentencePieceTokenizer", nobos).eod == 1
    with pytest.raises(ValueError, match="defines no BOS piece.*GPTSentencePieceTokenizer"):
        build_tokenizer("Llama2Tokenizer", nobos)


def test_preprocess_with_a_huggingface_tokenizer_train_export(dist, files, tmp_path):
    """Preprocess with the BPE tokenizer, train a few iterations in-process, and export: the
    checkpoint's stored config names the tokenizer, and the export carries it."""
    from megatron_nitp.config.stored import config_from_meta
    from megatron_nitp.data import preprocess
    from megatron_nitp.export import TOKENIZER_RECORD, export_checkpoint, exported_tokenizer
    from megatron_nitp.training.checkpoint import find_checkpoint, read_meta
    from megatron_nitp.training.loop import pretrain

    prefix = preprocess([files["jsonl"]], files["bpe"], str(tmp_path / "docs"),
                        tokenizer_type="HuggingFaceTokenizer", workers=2)
    run_dir = tmp_path / "run"
    summary = pretrain(parse_args(TINY + [
        "--train-iters", "3", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
        files["bpe"], "--data-path", prefix, "--split", "1,0,0",
        "--data-cache-path", str(tmp_path / "cache"),
        "--run-dir", str(run_dir)]))
    assert summary["lm loss"] is not None and summary["iterations"] == 3
    meta = read_meta(find_checkpoint(str(run_dir / "checkpoints")))
    assert meta["config"]["derived"]["vocab_size"] == 400  # the tokenizer's
    config = config_from_meta(meta)
    assert (config.data.tokenizer_type, config.data.tokenizer_model) == ("HuggingFaceTokenizer", files["bpe"])

    out = tmp_path / "hf"
    written, _ = export_checkpoint(str(run_dir / "checkpoints"), str(out))
    assert {"tokenizer.json", "tokenizer_config.json", TOKENIZER_RECORD} <= set(written)
    tok = exported_tokenizer(str(out))
    assert tok.vocab_size == 400 and tok.detokenize(tok.tokenize(TEXT)) == TEXT


@pytest.mark.slow
def test_mock_data_trains_without_a_corpus_or_cache(dist, tmp_path, monkeypatch):
    from megatron_nitp.training.loop import pretrain

    cache = tmp_path / "cache"
    monkeypatch.setenv("MEGATRON_NITP_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    summary = pretrain(parse_args(TINY + ["--mock-data", "--vocab-size", "500",
                                          "--train-iters", "3", "--no-save",
                                          "--run-dir", str(run_dir)]))
    with open(run_dir / "summary.json") as f:
        history = json.load(f)["history"]
    assert [i for i, _ in history["lm loss"]] == [1, 2, 3]
    assert summary["lm loss"] > 0
    # no corpus prepared, no dataset index cached: only the run folder was written
    assert not cache.exists() and sorted(os.listdir(tmp_path)) == ["run"]
    # the run's config says what it trained on: mock data, a NullTokenizer of --vocab-size
    with open(run_dir / "config.json") as f:
        data = json.load(f)["data"]
    assert data["mock_data"] and data["tokenizer_type"] == "NullTokenizer"
