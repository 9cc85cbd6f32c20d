"""What the runs trained on: documents, tokens and the split of the indexed dataset(s) they
read, and, for the built-in corpus, the chapter each document is."""

from __future__ import annotations

import numpy as np


def chapter_names(dataset, config, documents):
    """Book and chapter of each document ("Genesis 1", ...) when ``dataset`` is the built-in
    corpus (checked on ``documents``, with the runs' tokenizer); else None. A dataset that
    cannot be checked (no tokenizer file, no KJV package) is not named."""
    from megatron_nitp.data.corpus import holds_kjv_chapters, kjv_chapter_titles
    from megatron_nitp.data.tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
        if holds_kjv_chapters(dataset, tokenizer, documents):
            return kjv_chapter_titles()
    except (ImportError, OSError, KeyError, ValueError):
        pass
    return None


def corpus_facts(config):
    """What the runs trained on, from the indexed dataset(s) at ``config.data.data_path`` and
    megatron-core's split of them by ``config.data.split``: documents, tokens, the training split's
    documents and tokens, the held-out documents (validation, test) and, for the built-in
    corpus, their chapter names. None without a data path."""
    if not config.data.data_path:
        return None
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_nitp.data.documents import document_split

    prefixes, weights = get_blend_from_list(list(config.data.data_path))
    facts = {"prefixes": prefixes, "weighted": weights is not None, "documents": 0,
             "tokens": 0, "train_documents": 0, "train_tokens": 0, "valid_documents": 0,
             "test_documents": 0, "names": None}
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        train, valid, test = document_split(prefix, config.data.split)
        facts["documents"] += len(dataset)
        facts["tokens"] += int(lengths.sum())
        if train is not None:
            facts["train_documents"] += len(train)
            facts["train_tokens"] += int(lengths[train].sum())
        facts["valid_documents"] += 0 if valid is None else len(valid)
        facts["test_documents"] += 0 if test is None else len(test)
        if len(prefixes) == 1:
            unseen = np.setdiff1d(np.arange(len(dataset)), [] if train is None else train)
            facts["unseen"] = unseen
            facts["unseen_is_tail"] = bool(len(unseen)) and \
                bool((unseen == np.arange(len(dataset) - len(unseen), len(dataset))).all())
            check = [0, len(dataset) - 1] + ([int(unseen[0])] if len(unseen) else [])
            if config.data.tokenizer_model:
                facts["names"] = chapter_names(dataset, config, check)
    return facts
