"""Megatron-LM's manual garbage collection (``--manual-gc``).

Python's cyclic collector runs when its allocation thresholds trip, at a different moment on
each rank; a rank that pauses for a collection in the middle of a step holds every other rank
at the next collective, and at scale some rank always does. With ``--manual-gc`` the automatic
collector is off and every rank collects at the same points: at the start, every
``--manual-gc-interval`` steps, and before and after each validation (unless
``--no-manual-gc-eval``; after it only the youngest generation, the objects validation made,
as Megatron-LM). Reference counting still frees at once everything that is not in a cycle.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


class ManualGC:
    """The collection points of a run of ``training`` (its ``TrainingConfig``); does nothing
    without ``--manual-gc``. :meth:`stop` gives back the automatic collector as it was."""

    def __init__(self, training):
        self.on = training.manual_gc
        self.interval = training.manual_gc_interval
        self.around_validation = training.manual_gc_eval
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.on:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.on and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextmanager
    def validation(self):
        """Around ``evaluate()``."""
        if self.on and self.around_validation:
            gc.collect()
        yield
        if self.on and self.around_validation:
            gc.collect(generation=0)

    def stop(self) -> None:
        if self.on and self._was_enabled:
            gc.enable()
