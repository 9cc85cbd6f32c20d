"""Where the package keeps what it builds once and reuses: the tokenized built-in corpus,
converted tokenizers and dataset indices, all under one root that a cluster can point at a
shared or node-local disk (``$MEGATRON_NITP_CACHE``)."""

from __future__ import annotations

import os


def default_cache_root() -> str:
    """Returns `$MEGATRON_NITP_CACHE`, or `~/.cache/megatron-nitp` when it is unset."""
    return os.environ.get("MEGATRON_NITP_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron-nitp"
    )
