"""The side file ``<prefix>.meta.json`` that preprocessing writes beside a dataset's
``.bin``/``.idx``: facts training checks at start without reading the ``.bin`` (the largest
token id against the tokenizer's vocabulary)."""

from __future__ import annotations

import json
import os

#: Name of the side file preprocessing writes beside ``<prefix>.bin``: ``<prefix>.meta.json``.
META_SUFFIX = ".meta.json"


def write_meta(prefix: str, max_token_id: int, vocab_size: int) -> str:
    """Writes ``<prefix>.meta.json``: the data's largest token id and the tokenizer's
    vocabulary, so training can check the ids against its tokenizer without reading the
    ``.bin``. The ``.bin``'s size is kept too: a side file that no longer matches its ``.bin``
    is ignored. Returns the path."""
    path = prefix + META_SUFFIX
    with open(path + ".tmp", "w") as f:
        json.dump({"max_token_id": int(max_token_id), "vocab_size": int(vocab_size),
                   "bin_bytes": os.path.getsize(prefix + ".bin")}, f)
    os.replace(path + ".tmp", path)
    return path


def recorded_max_token_id(prefix: str) -> int | None:
    """The largest token id ``<prefix>.meta.json`` records, None without a side file or when
    it describes another ``.bin`` (a different size)."""
    try:
        with open(prefix + META_SUFFIX) as f:
            meta = json.load(f)
        if meta["bin_bytes"] != os.path.getsize(prefix + ".bin"):
            return None
        return int(meta["max_token_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
