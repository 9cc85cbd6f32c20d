"""Fault injection for the fault-tolerance tests, behind one test hook.

A test sets ``MEGATRON_NITP_INJECT_FAULT=KIND@ITER`` in a training job's environment; KIND is
one of :data:`KINDS` and ITER the 1-based iteration it strikes:

- ``nan-loss`` / ``nan-grad``: a NaN in the NITP loss scale / the first gradient buffer, seen by
  the non-finite check before the optimizer step (``--nan-policy``);
- ``sigterm`` / ``sigkill``: the signal to this process at the start of the iteration;
- ``crash-in-save``: the process exits (code :data:`EXIT_CRASH_IN_SAVE`) after the checkpoint
  of that iteration is written and before its manifest and tracker are;
- ``disk-full-in-save``: the last rank's write of that iteration's checkpoint fails as on a
  full disk (part of its first file written, then OSError ENOSPC), so every rank must learn of
  it and stop with the same line, the previous checkpoint left latest;
- ``stall-async-write``: with ``--async-save``, the background writer of that iteration's
  checkpoint writes part of its first file and then stalls (for :data:`STALL_SECONDS`), so a
  ``sigkill`` a few iterations later strikes while the write is in flight.

Several faults combine with commas: ``stall-async-write@4,sigkill@6``.

No flag or function signature of the training code carries it; with the variable unset each
check is one dictionary lookup.
"""

from __future__ import annotations

import os

ENV = "MEGATRON_NITP_INJECT_FAULT"
KINDS = ("nan-loss", "nan-grad", "sigterm", "sigkill", "crash-in-save", "stall-async-write",
         "disk-full-in-save")
EXIT_CRASH_IN_SAVE = 17
STALL_SECONDS = 300


def planned() -> list[tuple[str, int]]:
    """The (kind, iteration) pairs from the environment, [] when unset; ValueError on a bad
    one."""
    spec = os.environ.get(ENV, "")
    faults = []
    for part in filter(None, spec.split(",")):
        kind, _, when = part.partition("@")
        if kind not in KINDS or not when.isdigit():
            raise ValueError(f"${ENV}={spec!r}: use KIND@ITER[,KIND@ITER...] with KIND in "
                             f"{', '.join(KINDS)}")
        faults.append((kind, int(when)))
    return faults


def due(kind: str, iteration: int) -> bool:
    """Whether fault ``kind`` strikes at (1-based) ``iteration``."""
    if ENV not in os.environ:
        return False
    return (kind, iteration) in planned()
