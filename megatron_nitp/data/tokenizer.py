"""SentencePiece BPE tokenizer: training and a megatron-core compatible wrapper.

The tokenizer is trained with byte fallback and identity normalization so that any text,
including newlines and characters unseen in training, survives an encode/decode round trip.
Special ids are fixed (unk=0, bos=1, eos=2, pad=3) and eos doubles as the end-of-document
(EOD) token that megatron-core's `GPTDataset` expects between documents; pad is kept distinct
from EOD so megatron-core never confuses real EOD tokens with padding.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterable, Iterator

import sentencepiece

from megatron_nitp.data import readers

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


class SentencePieceTokenizer:
    """A SentencePiece model behind the tokenizer interface that megatron-core datasets use.

    A plain class rather than a subclass of megatron-core's tokenizer base: the base moved
    between releases (``datasets.megatron_tokenizer.MegatronLegacyTokenizer`` in 0.16,
    ``tokenizers.MegatronTokenizerBase`` in 0.19) and ``GPTDataset`` only reads ``eod``, ``eos``,
    ``pad`` and ``vocab_size``.

    Args:
        model_path: Path of a `.model` file written by `train_sentencepiece` (or any
            SentencePiece model that defines an eos id, used as EOD).

    Raises:
        FileNotFoundError: If `model_path` does not exist.
        ValueError: If `model_path` is not a readable SentencePiece model or has no eos id.
    """

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model not found: {model_path} "
                "(train one with tools/train_tokenizer.py)"
            )
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"cannot read SentencePiece model {model_path}: {err}") from err
        if processor.eos_id() < 0:
            raise ValueError(f"SentencePiece model {model_path} defines no eos id to use as EOD")
        self.unique_identifiers = {"class": type(self).__name__,
                                   "tokenizer_path": [os.path.abspath(model_path)]}
        self.model_path = model_path
        self._processor = processor
        self._vocab: dict[str, int] | None = None
        self._inv_vocab: dict[int, str] | None = None

    def tokenize(self, text: str) -> list[int]:
        """Encodes text into token ids, without any special tokens."""
        return self._processor.EncodeAsIds(text)

    def detokenize(self, ids) -> str:
        """Decodes token ids into text; special ids (EOD, pad) decode to nothing."""
        return self._processor.DecodeIds([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {self._processor.IdToPiece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        if self._inv_vocab is None:
            self._inv_vocab = {i: piece for piece, i in self.vocab.items()}
        return self._inv_vocab

    @property
    def eod(self) -> int:
        return self._processor.eos_id()

    @property
    def eos(self) -> int:
        return self._processor.eos_id()

    @property
    def bos(self) -> int:
        return self._processor.bos_id()

    @property
    def pad(self) -> int:
        return self._processor.pad_id()

    @property
    def unk(self) -> int:
        return self._processor.unk_id()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_processor"] = self._processor.serialized_model_proto()
        return state

    def __setstate__(self, state: dict) -> None:
        processor = sentencepiece.SentencePieceProcessor()
        processor.LoadFromSerializedProto(state["_processor"])
        state["_processor"] = processor
        self.__dict__.update(state)


TOKENIZER_TYPES = ("SentencePieceTokenizer",)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str, vocab_size: int | None = None):
    """The one place a tokenizer is constructed from its type and model file.

    Preprocessing workers and training both go through here, so a new tokenizer type is
    added once and every tool accepts it.

    Args:
        tokenizer_type: One of `TOKENIZER_TYPES`.
        tokenizer_model: Path of the tokenizer's model file.
        vocab_size: The vocabulary size of tokenizers that have no model file; a SentencePiece
            model carries its own, so it is not used.

    Raises:
        ValueError: If `tokenizer_type` is not supported.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    raise ValueError(
        f"unsupported tokenizer type {tokenizer_type!r}; supported: {', '.join(TOKENIZER_TYPES)}"
    )
