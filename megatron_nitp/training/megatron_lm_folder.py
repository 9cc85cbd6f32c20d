"""Megatron-LM's checkpoint folder: its tracker, its iteration folders, and how to tell one
from ours.

Its own module, below the conversion (``megatron_lm.py``, which imports and exports these
folders): ``training/checkpoint/`` recognises a Megatron-LM folder given to ``--load``
and refuses it with the conversion command, without depending on the converter.
"""

from __future__ import annotations

import os

#: Megatron-LM's tracker file (the same name as ours: ``checkpoint.TRACKER``)
TRACKER = "latest_checkpointed_iteration.txt"


class MegatronFormatError(ValueError):
    """A Megatron-LM checkpoint (or one of our models) the other side cannot hold; the message
    names the feature and the fix."""


def iteration_dir(root: str) -> tuple[str, int]:
    """(checkpoint folder, iteration) the Megatron-LM tracker names; ``release`` is
    iteration 0 in a ``release`` folder."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise MegatronFormatError(f"{root} is not a Megatron-LM checkpoint folder: {TRACKER} "
                                  "is missing (give the --save folder of pretrain_gpt.py)")
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return os.path.join(root, "release"), 0
    try:
        iteration = int(text)
    except ValueError:
        raise MegatronFormatError(f"{tracker} holds {text!r}, not an iteration") from None
    return os.path.join(root, f"iter_{iteration:07d}"), iteration


def is_megatron_lm_checkpoint(root: str) -> bool:
    """Whether ``root`` is a Megatron-LM torch_dist folder (tracker, an iteration folder with
    ``common.pt`` or ``metadata.json``, and neither our ``nitp.json`` nor our
    ``manifest.json``: a damaged checkpoint of ours keeps its own error)."""
    try:
        path, _ = iteration_dir(root)
    except (MegatronFormatError, OSError):
        return False
    theirs = any(os.path.exists(os.path.join(path, n)) for n in ("common.pt", "metadata.json"))
    ours = any(os.path.exists(os.path.join(path, n)) for n in ("nitp.json", "manifest.json"))
    return theirs and not ours
