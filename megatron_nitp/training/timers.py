"""Where a step's time goes: per-phase timers and the per-rank straggler spread.

The training step times its phases with :data:`TIMERS` (``with TIMERS.phase(name)``): data
loading, forward-backward and the optimizer (disjoint, so they add up to at most the step
time), and inside forward-backward the gradient reduction (megatron-core's
``finalize_model_grads``) and the NITP routing wait (``TargetRouter.recv`` on the last pipeline
stage: the time the loss waits for layer k's states). The clock is always running (two
``perf_counter`` calls per phase); what is reduced and shown depends on the flags:

- ``--timing-log-level`` 1 shows the three disjoint phases, 2 also the two inner ones, each as
  ms per iteration over the logging interval, the **max over ranks** (Megatron-LM's default
  ``--timing-log-option max``; one all-reduce per console line). The max of each phase may come
  from a different rank, so in a pipeline their sum can exceed the step time slightly; on one
  rank it cannot.
- ``--log-straggler`` gathers each rank's compute time per iteration (forward-backward less the
  gradient reduction and the routing wait, where a rank waits for the others) and names the
  fastest and the slowest rank (one all-gather per console line). Where ranks do the same work
  (data parallelism), a slow rank is a slow device or host; pipeline stages differ by design.

On a GPU the host clock would time kernel launches, not kernels: with either flag set, each
phase boundary synchronizes the device (as Megatron-LM's timers do), which costs a little speed.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from megatron_nitp.device import device, has_cuda, synchronize

DATA = "data loading"
FORWARD_BACKWARD = "forward-backward"
OPTIMIZER = "optimizer"
GRAD_REDUCE = "gradient reduction"
ROUTING_WAIT = "nitp routing wait"
#: the phases each --timing-log-level shows (level 1's are disjoint parts of the step)
LEVELS = {1: (DATA, FORWARD_BACKWARD, OPTIMIZER),
          2: (DATA, FORWARD_BACKWARD, GRAD_REDUCE, ROUTING_WAIT, OPTIMIZER)}


def key(phase: str) -> str:
    """The history key of a phase's time: ``time <phase> (ms)``."""
    return f"time {phase} (ms)"


#: history keys -> TensorBoard tags (Megatron-LM's ``<timer>-time``, in ms per iteration)
TENSORBOARD_TAGS = {key(p): p.replace(" ", "-") + "-time" for p in LEVELS[2]}
STRAGGLER_KEYS = ("straggler min rank", "straggler min (ms)", "straggler max rank",
                  "straggler max (ms)", "straggler spread (%)")
TENSORBOARD_TAGS.update({k: k.replace(" (ms)", "-ms").replace(" (%)", "-percent")
                         .replace(" ", "-") for k in STRAGGLER_KEYS})


class Timers:
    """Seconds per phase since the last :meth:`take`, on this rank."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        #: synchronize the device at each phase boundary (set by :class:`IntervalTimes` on GPU)
        self.synchronize = False

    def _sync(self) -> None:
        if self.synchronize:
            synchronize()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start

    def wrap(self, name: str, func):
        """``func`` timed as phase ``name`` at every call (megatron-core's
        ``finalize_model_grads``, called inside the schedule)."""
        def timed(*args, **kwargs):
            with self.phase(name):
                return func(*args, **kwargs)

        timed.__wrapped__ = func
        return timed

    def take(self) -> dict[str, float]:
        """The seconds per phase since the last call, and a fresh start."""
        out = dict(self.totals)
        self.totals.clear()
        return out


#: the process's timers (the step, the schedule's gradient reduction and the NITP router
#: time into it)
TIMERS = Timers()


class IntervalTimes:
    """Sums each iteration's phase times over a logging interval and, at the console line,
    reduces them over ranks into metrics (:func:`key` and :data:`STRAGGLER_KEYS`)."""

    def __init__(self, level: int, straggler: bool):
        self.phases = LEVELS.get(level, ())
        self.straggler = straggler
        self._sums: dict[str, float] = defaultdict(float)
        self._iterations = 0
        TIMERS.synchronize = has_cuda() and bool(self.phases or straggler)
        TIMERS.take()  # set-up's calls (the routing warm-up) are not a step's

    @property
    def enabled(self) -> bool:
        return bool(self.phases) or self.straggler

    def add(self, seconds: dict[str, float]) -> None:
        """One training iteration's phase times (``TIMERS.take()`` right after the step)."""
        for name, value in seconds.items():
            self._sums[name] += value
        self._iterations += 1

    def measure(self) -> dict[str, float]:
        """On every rank at each console line: the interval's ms per iteration, max over ranks
        (one all-reduce), and the straggler spread (one all-gather); empty when neither is
        asked for. Starts the next interval."""
        if not self.enabled or not self._iterations:
            return {}
        per_iteration = {k: 1000 * v / self._iterations for k, v in self._sums.items()}
        self._sums.clear()
        self._iterations = 0
        metrics = {}
        if self.phases:
            local = torch.tensor([per_iteration.get(p, 0.0) for p in self.phases],
                                 dtype=torch.float64, device=device())
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
            metrics.update({key(p): v for p, v in zip(self.phases, local.tolist())})
        if self.straggler:
            compute = max(0.0, per_iteration.get(FORWARD_BACKWARD, 0.0)
                          - per_iteration.get(GRAD_REDUCE, 0.0)
                          - per_iteration.get(ROUTING_WAIT, 0.0))
            world = torch.distributed.get_world_size()
            gathered = [torch.zeros(1, dtype=torch.float64, device=device())
                        for _ in range(world)]
            torch.distributed.all_gather(
                gathered, torch.tensor([compute], dtype=torch.float64, device=device()))
            times = [t.item() for t in gathered]
            slow = max(range(world), key=times.__getitem__)
            fast = min(range(world), key=times.__getitem__)
            metrics.update({
                "straggler min rank": float(fast), "straggler min (ms)": times[fast],
                "straggler max rank": float(slow), "straggler max (ms)": times[slow],
                "straggler spread (%)": (100 * (times[slow] - times[fast]) / times[slow]
                                         if times[slow] > 0 else 0.0),
            })
        return metrics


def console(metrics: dict[str, float]) -> list[str]:
    """The console parts of the timing and straggler metrics present in ``metrics``."""
    parts = []
    shown = [p for p in LEVELS[2] if key(p) in metrics]
    if shown:
        parts.append("time per iteration (ms, max over ranks) "
                     + " | ".join(f"{p}: {metrics[key(p)]:.1f}" for p in shown))
    if "straggler max rank" in metrics:
        parts.append(f"straggler compute (ms): min {metrics['straggler min (ms)']:.1f} (rank "
                     f"{int(metrics['straggler min rank'])}), max "
                     f"{metrics['straggler max (ms)']:.1f} (rank "
                     f"{int(metrics['straggler max rank'])}), spread "
                     f"{metrics['straggler spread (%)']:.1f}%")
    return parts
