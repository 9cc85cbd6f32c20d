"""Planned early exits: a signal, a wall-clock budget, an iteration interval.

A batch job must stop before its time limit with a checkpoint it can resume from, and every rank
must stop at the same iteration: a rank that left alone would leave the others blocked in their
next collective until the distributed timeout. So the exit is decided after each step from one
all-reduce (MAX) of two flags, "a signal arrived here" and "my clock is over the budget"; the
iteration interval needs none, since every rank counts the same iterations. Then every rank
writes its part of one checkpoint and exits with the reason's code, so that a batch script can
tell a stop to requeue (:data:`EXIT_SIGNAL`, :data:`EXIT_DURATION`) from one that was asked for
(:data:`EXIT_INTERVAL`), a failure (1, 2, :data:`EXIT_NON_FINITE`) and the end of training (0).

The checkpoint is written even with ``--no-save``: that flag drops the final checkpoint of a
finished run, while these exits exist to be resumed, and their checkpoint is all that keeps the
work done since the last ``--save-interval``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import torch

from megatron_nitp.config.resolve import signal_number
from megatron_nitp.config.schema import TrainingConfig
from megatron_nitp.device import device

EXIT_SIGNAL = 75  # --exit-signal or SIGTERM: checkpoint written; requeue to resume (EX_TEMPFAIL)
EXIT_DURATION = 76  # --exit-duration-in-mins: checkpoint written; requeue to resume
EXIT_INTERVAL = 77  # --exit-interval: checkpoint written; stopped as asked, not requeued
EXIT_NON_FINITE = 3  # --nan-policy stop: diagnostics written, weights untouched
#: the codes after which a job should be requeued with --load (what the sbatch files do)
REQUEUE_CODES = (EXIT_SIGNAL, EXIT_DURATION)


class ExitConditions:
    """The exit flags of one run and the decision all ranks take together.

    ``start`` is the run's start (``time.perf_counter()``), from which the duration counts, as
    Megatron-LM counts ``--exit-duration-in-mins`` from the start of ``pretrain``. The signal
    handlers are installed by :meth:`install` and the previous ones restored by
    :meth:`restore`, so a run inside a longer-lived process (the tests) leaves them as found.
    """

    def __init__(self, training: TrainingConfig, start: float):
        self.duration_s = (training.exit_duration_in_mins * 60.0
                           if training.exit_duration_in_mins is not None else None)
        self.interval = training.exit_interval
        self.signals = ()
        if training.exit_signal_handler:
            chosen = signal_number(training.exit_signal)
            self.signals = tuple(dict.fromkeys((chosen, signal.SIGTERM)))
        self.start = start
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum)

    @property
    def needs_agreement(self) -> bool:
        """Whether a flag can differ between ranks (a signal, a clock), so that the decision
        takes the all-reduce."""
        return bool(self.signals) or self.duration_s is not None

    def decide(self, iteration: int, last: int) -> tuple[int, str] | None:
        """(exit code, reason) when every rank stops after ``iteration``, else None. The same
        answer on every rank: one all-reduce MAX of the two flags when a signal handler or a
        duration is set, none otherwise. The last iteration never exits early: the run ends
        normally there (with its final checkpoint unless ``--no-save``)."""
        if iteration >= last:
            return None
        if self.needs_agreement:
            elapsed = time.perf_counter() - self.start
            flags = torch.tensor(
                [1.0 if self.received is not None else 0.0,
                 1.0 if self.duration_s is not None and elapsed >= self.duration_s else 0.0],
                device=device())
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            signalled, timed_out = (bool(v) for v in flags.tolist())
            if signalled:
                name = self.received.name if self.received is not None else "a signal"
                return EXIT_SIGNAL, f"{name} (on this or another rank)"
            if timed_out:
                return EXIT_DURATION, (f"--exit-duration-in-mins {self.duration_s / 60:g} "
                                       f"reached ({elapsed / 60:.2f} min on this rank)")
        if self.interval and iteration % self.interval == 0:
            return EXIT_INTERVAL, f"--exit-interval {self.interval}"
        return None


@contextlib.contextmanager
def interrupt_deferred():
    """Holds a Ctrl-C (SIGINT) until the block ends, then raises KeyboardInterrupt there.

    Around a checkpoint save: Ctrl-C in a terminal reaches the whole process group, so the
    writer processes dist_checkpointing forks would die mid-file and the trainer would wait for
    them forever. Held, the interrupt lets the save finish (the forked writers inherit the
    handler, so they finish too), and the run stops with that checkpoint complete. A second
    Ctrl-C raises at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def hold(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
