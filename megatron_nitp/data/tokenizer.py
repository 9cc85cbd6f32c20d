"""Tokenizers: megatron-core's library behind one builder, and training our own.

:func:`build_tokenizer` is the one place a tokenizer is made, for training, ``--dry-run``,
preprocessing, export and the tools. It takes Megatron-LM's ``--tokenizer-type`` names and
returns megatron-core's own tokenizer object (``megatron.core.tokenizers``,
``MegatronTokenizer.from_pretrained``): ``tokenize(text) -> list[int]``, ``detokenize(ids)``,
``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` (what ``GPTDataset`` reads). What
the library lacks, and this module adds:

- checks before any expensive work, whose errors name the problem and the fix (the library
  asserts, or fails deep inside ``transformers``);
- the same ``NullTokenizer`` on 0.16 and 0.19: the library's changed from ``vocab_size + 1`` ids
  (EOD = ``vocab_size``) to ``vocab_size`` ids (EOD = ``vocab_size - 1``); here it always has
  ``--vocab-size`` ids, the last one EOD, so the model's vocabulary covers it on both;
- training: :func:`train_sentencepiece` (the built-in corpus's kind of model) and
  :func:`train_bpe` (a byte-level BPE ``tokenizer.json`` for ``HuggingFaceTokenizer``).

Our SentencePiece models are trained with byte fallback and identity normalization so that any
text, including newlines and characters unseen in training, survives an encode/decode round
trip. Special ids are fixed (unk=0, bos=1, eos=2, pad=3) and eos doubles as the end-of-document
(EOD) token that megatron-core's `GPTDataset` expects between documents; pad is kept distinct
from EOD so megatron-core never confuses real EOD tokens with padding. The BPE tokenizers
follow the same rule (``<|endoftext|>`` is EOD, ``<|pad|>`` pad).
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Iterable, Iterator

import sentencepiece

from megatron_nitp.config.schema import TOKENIZER_TYPES  # noqa: F401  (re-exported)
from megatron_nitp.data import readers
from megatron_nitp.data.cache import default_cache_root

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

_MAX_SENTENCE_CHARS = 4096


def iter_documents(input_files: Iterable[str], json_key: str = "text") -> Iterator[str]:
    """Yields the documents of the input files, in file order.

    The formats are those of `readers`: JSON lines (optionally gzipped; the text is under
    `json_key`), Parquet (the `json_key` column) and plain text, where documents are separated
    by one or more blank lines, so a text file with no blank lines is a single document.
    Empty documents are left out.

    Args:
        input_files: Paths of the files to read.
        json_key: Key (Parquet: column) of the document text.

    Yields:
        The text of each non-empty document.

    Raises:
        FileNotFoundError: If an input file does not exist.
        ValueError: If a record is malformed or lacks `json_key`; the message names its file
            and line.
    """
    input_files = list(input_files)
    keys = (json_key,)
    readers.check_inputs(input_files, keys)
    for path in input_files:
        fmt = readers.input_format(path)
        for line_number, raw in readers.iter_records(path, keys):
            texts = readers.decode_record(fmt, raw, keys)
            if isinstance(texts, str):
                raise ValueError(f"{readers.location(path, fmt, line_number)}: {texts}")
            if texts[0]:
                yield texts[0]


def _training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Cuts documents into bounded lines, the unit SentencePiece trains on.

    SentencePiece silently skips lines longer than its `max_sentence_length`, so long
    paragraphs are split at spaces rather than lost.
    """
    for document in documents:
        for line in document.splitlines():
            while len(line) > _MAX_SENTENCE_CHARS:
                cut = line.rfind(" ", 0, _MAX_SENTENCE_CHARS)
                cut = cut if cut > 0 else _MAX_SENTENCE_CHARS
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def train_sentencepiece(
    input_files: list[str],
    output_prefix: str,
    vocab_size: int,
    json_key: str = "text",
    seed: int = 1234,
) -> str:
    """Trains a SentencePiece BPE model on text or JSON-lines files.

    Characters outside the 99.95% most frequent fall back to byte pieces instead of `<unk>`.

    Args:
        input_files: Plain text or `.jsonl` files (see `iter_documents` for the formats).
        output_prefix: Path prefix of the model; `{output_prefix}.model` and `.vocab` are written.
        vocab_size: Total vocabulary size, including the 4 special and 256 byte-fallback
            pieces, so it must exceed 260 plus the number of distinct common characters.
        json_key: Key of the document text in JSON-lines records.
        seed: Seed of SentencePiece's sentence sampling, so retraining gives the same model.

    Returns:
        The path of the trained `.model` file.

    Raises:
        FileNotFoundError: If an input file does not exist.
        ValueError: If the inputs hold no text or training fails, typically because
            `vocab_size` is too small for the characters of the text.
    """
    sentences = _training_sentences(iter_documents(input_files, json_key))
    first = next(sentences, None)
    if first is None:
        raise ValueError(f"no text found in {input_files}")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    sentencepiece.set_random_generator_seed(seed)
    try:
        _train(itertools.chain([first], sentences), output_prefix, vocab_size)
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training failed (vocab_size={vocab_size}, inputs {input_files}): {err}"
        ) from err
    return output_prefix + ".model"


def _train(sentences: Iterator[str], output_prefix: str, vocab_size: int) -> None:
    """Runs the trainer; it streams `sentences`, sampling at most `input_sentence_size`."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=output_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_CHARS * 4,
        num_threads=2,
        minloglevel=2,
    )



DEFAULT_TOKENIZER_TYPE = "SentencePieceTokenizer"
#: The types that read a SentencePiece ``.model``. SentencePieceTokenizer and
#: GPTSentencePieceTokenizer are the same here: a text's pieces, EOD = the model's eos (Megatron-LM's
#: GPTSentencePieceTokenizer). Llama2Tokenizer puts the model's BOS before every text, as
#: Megatron-LM's ``_Llama2Tokenizer.tokenize(s, bos=True)`` does (:func:`bos_first`).
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")

#: Special tokens of :func:`train_bpe`'s tokenizers: EOD first, then pad.
BPE_EOD, BPE_PAD = "<|endoftext|>", "<|pad|>"
#: The library's TikTokenizer reserves this many ids below the vocabulary file's tokens
#: (Megatron-LM's ``--tiktoken-num-special-tokens`` default).
TIKTOKEN_NUM_SPECIAL_TOKENS = 1000

_SENTENCEPIECE_FILE = "a SentencePiece .model file (train one with tools/train_tokenizer.py)"
_HOW_TO_GET = {
    "SentencePieceTokenizer": _SENTENCEPIECE_FILE,
    "GPTSentencePieceTokenizer": _SENTENCEPIECE_FILE,
    "Llama2Tokenizer": _SENTENCEPIECE_FILE + " that defines a BOS piece",
    "HuggingFaceTokenizer": "a Hugging Face tokenizer folder holding tokenizer.json, or that "
                            "tokenizer.json (save one with tokenizer.save_pretrained(DIR), or "
                            "train one with tools/train_tokenizer.py --type bpe)",
    "TikTokenizer": "a tiktoken vocabulary in Megatron's JSON format (a list of {rank, "
                    "token_bytes, token_str})",
    "GPT2BPETokenizer": "GPT-2's vocab.json (--vocab-file) and merges.txt (--merge-file)",
}


def gpt2_bpe_folder(vocab_file: str, merge_file: str | None) -> str:
    """Megatron-LM's ``GPT2BPETokenizer`` (``--vocab-file`` + ``--merge-file``) as a Hugging
    Face tokenizer folder that megatron-core's ``HuggingFaceTokenizer`` reads, made once per
    pair of files (cached by their content under ``$MEGATRON_NITP_CACHE/tokenizers``).

    megatron-core's own GPT-2 path (``MegatronHFTokenizer``) resolves the model by name, downloads
    when a file is missing and, in 0.16, passes the vocabulary as the merges; GPT-2's byte-level
    BPE is exactly transformers' ``GPT2TokenizerFast`` of the two files, with Megatron-LM's
    vocabulary (the file's entries) and EOD (``<|endoftext|>``). Raises FileNotFoundError /
    ValueError naming the flag."""
    import hashlib

    for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
        if not path:
            raise ValueError(f"--tokenizer-type GPT2BPETokenizer needs {flag} "
                             f"({_HOW_TO_GET['GPT2BPETokenizer']}).")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path} not found (--tokenizer-type "
                                    f"GPT2BPETokenizer reads {_HOW_TO_GET['GPT2BPETokenizer']})")
    digest = hashlib.sha256()
    for path in (vocab_file, merge_file):
        with open(path, "rb") as f:
            digest.update(f.read())
    folder = os.path.join(default_cache_root(), "tokenizers", "gpt2bpe-" + digest.hexdigest()[:16])
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    with open(vocab_file, encoding="utf-8") as f:
        try:
            vocab = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"--vocab-file {vocab_file} is not GPT-2's vocab.json (a JSON "
                             f"object token -> id): {err}") from None
    if BPE_EOD not in vocab:
        raise ValueError(f"--vocab-file {vocab_file} has no {BPE_EOD} token, which "
                         "GPT2BPETokenizer ends every document with (EOD).")
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bpe = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split
    bpe.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=BPE_EOD)
    staging = f"{folder}.tmp{os.getpid()}"
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, folder)
    except OSError:  # another process made it first: theirs is the same
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _kind_hint(path: str) -> str:
    """Which --tokenizer-type a file looks like, for an error message."""
    if os.path.isdir(path) or os.path.basename(path) == "tokenizer.json":
        return "HuggingFaceTokenizer"
    if path.endswith(".model"):
        return "SentencePieceTokenizer"
    return ""


def check_tokenizer(tokenizer_type: str, tokenizer_model: str | None,
                    vocab_size: int | None = None) -> None:
    """Cheap checks of a tokenizer setting (no file is parsed), before any expensive work.

    Raises:
        FileNotFoundError: If ``tokenizer_model`` does not exist (``--dry-run`` may still plan
            with ``--vocab-size``: the job's machine may have it).
        ValueError: For an unknown type, a missing ``--tokenizer-model`` or ``--vocab-size``, a
            file of the wrong kind for the type, or a Hugging Face folder without
            ``tokenizer.json``; the message names the fix.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}: choose one of "
                         f"{', '.join(TOKENIZER_TYPES)}.")
    if tokenizer_type == "NullTokenizer":
        if not vocab_size or vocab_size < 2:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size (ids "
                             "0..vocab-size-1, the last one EOD).")
        return
    if tokenizer_model is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model: "
                         f"{_HOW_TO_GET[tokenizer_type]}.")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model} (--tokenizer-type "
                                f"{tokenizer_type} reads {_HOW_TO_GET[tokenizer_type]})")
    hint = _kind_hint(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        folder = tokenizer_model
        if os.path.isfile(tokenizer_model):
            if os.path.basename(tokenizer_model) != "tokenizer.json":
                other = (f" It looks like a SentencePiece model: use --tokenizer-type "
                         f"SentencePieceTokenizer." if hint == "SentencePieceTokenizer" else
                         " Put it in a folder of its own as tokenizer.json (with its "
                         "tokenizer_config.json, which names the eos token).")
                raise ValueError(f"--tokenizer-type HuggingFaceTokenizer reads a tokenizer folder "
                                 f"or its tokenizer.json, not {tokenizer_model}.{other}")
            folder = os.path.dirname(os.path.abspath(tokenizer_model))
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise ValueError(f"Hugging Face tokenizer folder {tokenizer_model} has no "
                             "tokenizer.json (only fast tokenizers are read, no download is "
                             "made): save one with AutoTokenizer.from_pretrained(...)"
                             ".save_pretrained(DIR), or train one with tools/train_tokenizer.py "
                             "--type bpe.")
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs the transformers "
                             "package: pip install transformers") from None
        return
    if os.path.isdir(tokenizer_model):
        raise ValueError(f"--tokenizer-type {tokenizer_type} reads a file, and "
                         f"{tokenizer_model} is a folder"
                         + (": for a Hugging Face tokenizer folder use --tokenizer-type "
                            "HuggingFaceTokenizer." if hint else "."))
    if tokenizer_type in SENTENCEPIECE_TYPES and tokenizer_model.endswith(".json"):
        raise ValueError(f"{tokenizer_model} is JSON, not a SentencePiece .model: use "
                         "--tokenizer-type HuggingFaceTokenizer for a tokenizer.json, "
                         "TikTokenizer for a tiktoken vocabulary.")
    if tokenizer_type == "TikTokenizer":
        if not tokenizer_model.endswith(".json"):
            raise ValueError(f"--tokenizer-type TikTokenizer reads {_HOW_TO_GET['TikTokenizer']}"
                             f" ending in .json, not {tokenizer_model}"
                             + (f": use --tokenizer-type {hint}." if hint else "."))
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            raise ValueError("--tokenizer-type TikTokenizer needs the tiktoken package: pip "
                             "install tiktoken") from None


def _null_library() -> str:
    """The library name of megatron-core's NullTokenizer: ``null`` (0.16), ``null-text`` (0.19)."""
    from megatron.core.tokenizers.text.text_tokenizer import TOKENIZER_MAPPING_LIBRARIES

    return "null-text" if "null-text" in TOKENIZER_MAPPING_LIBRARIES else "null"


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None,
                    vocab_size: int | None = None, merge_file: str | None = None):
    """megatron-core's tokenizer of a Megatron-LM ``--tokenizer-type``, checked first.

    Args:
        tokenizer_type: One of :data:`TOKENIZER_TYPES`.
        tokenizer_model: SentencePiece: the ``.model``; HuggingFaceTokenizer: a local folder
            holding ``tokenizer.json`` (and ``tokenizer_config.json``), or that file;
            TikTokenizer: Megatron's tiktoken vocabulary ``.json``; GPT2BPETokenizer: the
            ``--vocab-file``; NullTokenizer: unused.
        vocab_size: ``--vocab-size``. NullTokenizer: its ids (required; the last is EOD).
            TikTokenizer: cuts the vocabulary as in Megatron-LM (default: the whole file plus
            the 1000 special ids). Ignored by the others, whose vocabulary is their file's.
        merge_file: GPT2BPETokenizer: the ``--merge-file`` (:func:`gpt2_bpe_folder`).

    Returns:
        A ``megatron.core.tokenizers`` text tokenizer: ``tokenize(text) -> list[int]`` (no BOS
        or other special token added), ``detokenize(ids) -> str``, ``vocab_size``, ``eod``,
        ``pad``, ``unique_identifiers``.

    Raises:
        FileNotFoundError, ValueError: See :func:`check_tokenizer`; ValueError also for a file
            the library cannot read, or a tokenizer without an eos token to use as EOD.

    A known limit of the library's TikTokenizer (0.16 and 0.19): ``detokenize`` decodes each id
    on its own, so a character split over several byte tokens comes back as U+FFFD; encoding,
    and so training, is exact.
    """
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type == "GPT2BPETokenizer":
        return build_tokenizer("HuggingFaceTokenizer", gpt2_bpe_folder(tokenizer_model, merge_file))
    check_tokenizer(tokenizer_type, tokenizer_model, vocab_size)
    if tokenizer_type == "NullTokenizer":
        metadata = {"library": _null_library()}
        tokenizer = MegatronTokenizer.from_pretrained(metadata_path=dict(metadata),
                                                      vocab_size=vocab_size)
        if tokenizer.vocab_size != vocab_size:  # 0.16: vocab_size + 1 ids
            tokenizer = MegatronTokenizer.from_pretrained(
                metadata_path=dict(metadata),
                vocab_size=2 * vocab_size - tokenizer.vocab_size)
        return tokenizer
    path = os.path.abspath(tokenizer_model)
    if tokenizer_type in SENTENCEPIECE_TYPES:
        library, kwargs = "sentencepiece", {}
    elif tokenizer_type == "HuggingFaceTokenizer":
        # the fast tokenizer of tokenizer.json, text only (the defaults changed in 0.19): a
        # document is its tokens then EOD, as with our SentencePiece models
        library = "huggingface"
        kwargs = {"use_fast": True, "include_special_tokens": False}
        path = path if os.path.isdir(path) else os.path.dirname(path)
    else:
        library = "tiktoken"
        with open(path, encoding="utf-8") as f:
            file_vocab = len(json.load(f)) + TIKTOKEN_NUM_SPECIAL_TOKENS
        kwargs = {"vocab_size": min(vocab_size or file_vocab, file_vocab),
                  "num_special_tokens": TIKTOKEN_NUM_SPECIAL_TOKENS}
    try:
        tokenizer = MegatronTokenizer.from_pretrained(
            tokenizer_path=path, metadata_path={"library": library}, **kwargs)
    except (OSError, RuntimeError, ValueError, AssertionError, KeyError) as err:
        raise ValueError(f"cannot read {tokenizer_model} as a {tokenizer_type} "
                         f"({_HOW_TO_GET[tokenizer_type]}): {err}") from err
    if tokenizer.eod is None or tokenizer.eod < 0:
        raise ValueError(f"{tokenizer_type} {tokenizer_model} defines no eos token to end "
                         "documents with (EOD): give its tokenizer_config.json an "
                         '"eos_token".')
    if tokenizer_type == "Llama2Tokenizer":
        return bos_first(tokenizer, tokenizer_model)
    return tokenizer


def bos_first(tokenizer, tokenizer_model: str = "the model"):
    """Megatron-LM's ``Llama2Tokenizer`` on megatron-core's SentencePiece tokenizer:
    ``tokenize(text)`` returns ``[bos] + pieces``, so that every document preprocessed or
    evaluated starts with BOS as in Llama 2's training (``tokenize(text, bos=False)``: the pieces
    alone, for a continuation scored after its context). ``tokenizer.bos_first`` is True; EOD is
    still the model's eos. Raises ValueError for a model without a BOS piece."""
    bos_id = tokenizer.bos
    if bos_id is None or bos_id < 0:
        raise ValueError(f"Llama2Tokenizer {tokenizer_model} defines no BOS piece (sentencepiece "
                         "bos_id is -1): use --tokenizer-type GPTSentencePieceTokenizer, which "
                         "adds none.")
    pieces = tokenizer.tokenize

    def tokenize(text: str, bos: bool = True) -> list[int]:
        ids = pieces(text)
        return [bos_id] + ids if bos else ids

    tokenizer.tokenize = tokenize
    tokenizer.bos_first = True
    return tokenizer


def train_bpe(input_files: list[str], output_dir: str, vocab_size: int,
              json_key: str = "text") -> str:
    """Trains a byte-level BPE tokenizer (Hugging Face ``tokenizers``) for
    ``--tokenizer-type HuggingFaceTokenizer``.

    Byte-level: every text round-trips exactly and no id is unknown. Writes
    ``output_dir/tokenizer.json`` and a ``tokenizer_config.json`` naming ``<|endoftext|>`` the
    eos token (EOD) and ``<|pad|>`` the pad token, so ``transformers.AutoTokenizer`` and
    :func:`build_tokenizer` load the folder as it is, offline.

    Args:
        input_files: Plain text or `.jsonl` files (see `iter_documents` for the formats).
        output_dir: The tokenizer folder (created).
        vocab_size: Total vocabulary, including the 256 byte tokens and the 2 special ones.
        json_key: Key of the document text in JSON-lines records.

    Returns:
        ``output_dir``, the value of ``--tokenizer-model``.

    Raises:
        FileNotFoundError: If an input file does not exist.
        ValueError: If the inputs hold no text or ``vocab_size`` leaves no room for merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256 + 2:
        raise ValueError(f"vocab_size {vocab_size} must exceed 258 (256 byte tokens and "
                         f"{BPE_EOD}, {BPE_PAD}).")
    documents = iter_documents(input_files, json_key)
    first = next(documents, None)
    if first is None:
        raise ValueError(f"no text found in {input_files}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOD, BPE_PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(itertools.chain([first], documents), trainer)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BPE_EOD,
              "pad_token": BPE_PAD, "model_max_length": 1 << 30}
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return output_dir
