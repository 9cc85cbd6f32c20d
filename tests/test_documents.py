"""megatron_nitp/data/documents.py and the default corpus's chapter names (data/corpus.py):
which documents each split holds, and what the documents of the built-in corpus are called."""

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_nitp.data.corpus import holds_kjv_chapters, kjv_chapter_titles, kjv_chapters
from megatron_nitp.data.documents import document_split


def _dataset(tmp_path, n):
    """An indexed dataset of ``n`` documents, document i being the i + 1 tokens 0..i."""
    prefix = str(tmp_path / f"docs{n}")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for i in range(n):
        builder.add_document(np.arange(i + 1, dtype=np.int32), [i + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def test_ten_documents_split_six_two_two(tmp_path):
    train, valid, test = document_split(_dataset(tmp_path, 10), "6,2,2")
    assert train.tolist() == [0, 1, 2, 3, 4, 5]
    assert valid.tolist() == [6, 7] and test.tolist() == [8, 9]


def test_a_split_of_no_share_is_none(tmp_path):
    train, valid, test = document_split(_dataset(tmp_path, 10), "1,0,0")
    assert train.tolist() == list(range(10)) and valid is None and test is None


def test_the_default_split_of_the_kjv_chapter_count(tmp_path):
    """969,30,1 of 1,189 documents: round(0.969 * 1189) = 1152 train, then
    round(0.999 * 1189) = 1188 ends the validation split."""
    train, valid, test = document_split(_dataset(tmp_path, 1189), "969,30,1")
    assert (len(train), len(valid), len(test)) == (1152, 36, 1)
    assert train[-1] == 1151 and valid[0] == 1152 and test.tolist() == [1188]


def test_chapter_titles_follow_the_corpus_documents():
    titles = kjv_chapter_titles()
    assert len(titles) == len(kjv_chapters()) == 1189
    assert titles[:2] == ["Genesis 1", "Genesis 2"] and titles[49] == "Genesis 50"
    assert titles[50] == "Exodus 1"
    assert titles[1152] == "1 Peter 2" and titles[-1] == "Revelation 22"
    assert kjv_chapters()[50].startswith("Now these are the names of the children of Israel")


class _Tokenizer:
    """Stand-in: a chapter's tokens are its length and its first character."""
    eod = 0

    @staticmethod
    def tokenize(text):
        return [len(text), ord(text[0])]


@pytest.fixture(scope="module")
def built():
    """The corpus as :func:`prepare_default_corpus` writes it, with :class:`_Tokenizer`."""
    return [np.array(_Tokenizer.tokenize(c) + [_Tokenizer.eod]) for c in kjv_chapters()]


def test_holds_kjv_chapters_checks_the_named_documents(built):
    assert holds_kjv_chapters(built, _Tokenizer, [0, 1152, 1188])
    changed = list(built)
    changed[1152] = changed[1152][:-1]  # no EOD: not as the corpus is built
    assert not holds_kjv_chapters(changed, _Tokenizer, [0, 1152])
    assert holds_kjv_chapters(changed, _Tokenizer, [0, 1188])  # only the named are read
    assert not holds_kjv_chapters(built[:-1], _Tokenizer, [0])  # one chapter short
