"""Fault injection for the fault-tolerance tests, behind one test hook.

A test sets ``MEGATRON_NITP_INJECT_FAULT=KIND@ITER`` in a training job's environment; KIND is
one of :data:`KINDS` and ITER the 1-based iteration it strikes:

- ``nan-loss`` / ``nan-grad``: a NaN in the NITP loss scale / the first gradient buffer, seen by
  the non-finite check before the optimizer step (``--nan-policy``);
- ``sigterm`` / ``sigkill``: the signal to this process at the start of the iteration;
- ``crash-in-save``: the process exits (code :data:`EXIT_CRASH_IN_SAVE`) after the checkpoint
  of that iteration is written and before its manifest and tracker are.

No flag or function signature of the training code carries it; with the variable unset each
check is one dictionary lookup.
"""

from __future__ import annotations

import os

ENV = "MEGATRON_NITP_INJECT_FAULT"
KINDS = ("nan-loss", "nan-grad", "sigterm", "sigkill", "crash-in-save")
EXIT_CRASH_IN_SAVE = 17


def planned() -> tuple[str | None, int]:
    """(kind, iteration) from the environment, (None, -1) when unset; ValueError on a bad one."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return None, -1
    kind, _, when = spec.partition("@")
    if kind not in KINDS or not when.isdigit():
        raise ValueError(f"${ENV}={spec!r}: use KIND@ITER with KIND in {', '.join(KINDS)}")
    return kind, int(when)


def due(kind: str, iteration: int) -> bool:
    """Whether fault ``kind`` strikes at (1-based) ``iteration``."""
    if ENV not in os.environ:
        return False
    return planned() == (kind, iteration)
