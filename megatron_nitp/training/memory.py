"""Memory you can see: each logging interval's peak, the max over ranks, beside the plan.

Every console line (and TensorBoard, and the run's history) carries the memory of the interval
since the previous line, in MB (MiB, 1024**2 bytes, as Megatron-LM's ``report_memory``), the
**max over all ranks** (one all-reduce MAX per logging interval, on every rank together):

- GPU: the CUDA caching allocator's ``allocated`` / ``reserved`` at the line and ``max
  allocated`` / ``max reserved`` over the interval (``torch.cuda.max_memory_allocated`` and
  ``max_memory_reserved``; peaks reset with ``torch.cuda.reset_peak_memory_stats`` after each
  line). They leave out the CUDA context and NCCL's buffers, which ``nvidia-smi`` shows.
- CPU: the process's resident set (RSS) at the line and its peak over the interval (Linux
  ``VmRSS`` and ``VmHWM`` of ``/proc/self/status``; the peak reset by writing ``5`` to
  ``/proc/self/clear_refs``). Where that file is not writable the peak is ``getrusage``'s
  ``ru_maxrss``, the peak since the process started, and is labelled "since start". The RSS
  includes the Python interpreter, torch's libraries and the data pipeline, not only tensors.

The first line also prints ``--dry-run``'s estimate for the same config
(``accounting.memory_plan.planned_memory``) beside the measured peak, with the plan's terms, so
a plan made for a cluster can be checked against the first iterations of the job.
"""

from __future__ import annotations

import re
import resource
import sys

import torch

from megatron_nitp import device as devices
from megatron_nitp.device import device

MB = 1024**2
GIB = 1024**3
#: The label of the memory figures on the console line.
LABEL = "memory (MB, max over ranks)"
#: History keys (``memory <name> (MB)``, name as Megatron-LM's ``report_memory``) and their
#: TensorBoard tags: Megatron-LM's ``mem-*`` tags, in MB here as on the console (Megatron-LM's
#: ``--log-memory-to-tensorboard`` writes bytes).
GPU_NAMES = ("allocated", "max allocated", "reserved", "max reserved")
CPU_NAMES = ("rss", "max rss")
RUSAGE_NAMES = ("rss", "max rss since start")
TENSORBOARD_TAGS = {f"memory {name} (MB)": "mem-" + name.replace(" ", "-") + "-MB"
                    for name in GPU_NAMES + CPU_NAMES + RUSAGE_NAMES}
PROC_STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def readable(nbytes: float) -> str:
    """Bytes as GiB with two decimals, or MiB below 1 GiB (tiny CPU models plan a few MiB)."""
    if nbytes >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / MB:.1f} MiB"


def key(name: str) -> str:
    """The history key of a memory figure: ``memory <name> (MB)``."""
    return f"memory {name} (MB)"


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None where there
    is no procfs (macOS)."""
    try:
        with open(PROC_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _clear_refs_writable() -> bool:
    """Whether the peak RSS can be reset (Linux, and not refused by the container)."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    """The process's peak RSS since it started (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMonitor:
    """Measures each logging interval's peak memory of this rank and reduces it over ranks.

    ``source`` is ``"cuda"`` (the caching allocator), ``"proc"`` (``VmRSS``/``VmHWM``, reset per
    interval) or ``"rusage"`` (peak since start); by default the first that this process can
    use. Call :meth:`begin` where the first interval starts and :meth:`measure` on every rank
    at each console line.
    """

    def __init__(self, source: str | None = None):
        if source is None:
            source = "cuda" if devices.has_cuda() else (
                "proc" if _clear_refs_writable() else "rusage")
        if source not in ("cuda", "proc", "rusage"):
            raise ValueError(f"unknown memory source {source!r}")
        self.source = source
        self.names = {"cuda": GPU_NAMES, "proc": CPU_NAMES, "rusage": RUSAGE_NAMES}[source]
        self._start_bytes: float | None = None
        #: MB allocated (GPU) or resident (CPU) when the first step started, max over ranks:
        #: what the planned-vs-measured line says was there before training (known after the
        #: first :meth:`measure`, None before)
        self.start_mb: float | None = None

    @property
    def peak_key(self) -> str:
        """The history key of the interval's peak: ``max allocated`` on GPU, the peak RSS on
        CPU."""
        return key(self.names[1])

    def reset(self) -> None:
        """Starts a new interval: the next :meth:`measure`'s peaks count from here (the
        ``rusage`` peak cannot be reset)."""
        if self.source == "cuda":
            devices.reset_peak_memory_stats()
        elif self.source == "proc":
            _clear_refs_writable()

    def begin(self) -> None:
        """Where the first interval starts: notes this rank's current figure (reduced with the
        first :meth:`measure`, no collective of its own) and resets the peaks, so set-up is
        not in the first line's peak."""
        self._start_bytes = self.local()[self.names[0]]
        self.reset()

    def local(self) -> dict[str, float]:
        """This rank's figures in bytes, ``{name: bytes}`` in :attr:`names` order."""
        if self.source == "cuda":
            stats = devices.memory_stats()
            return {name: float(stats[name]) for name in self.names}
        rss = _proc_status_bytes("VmRSS")
        if self.source == "proc":
            peak = _proc_status_bytes("VmHWM")
        else:
            peak = _ru_maxrss_bytes()
        rss = rss if rss is not None else peak
        return {self.names[0]: float(rss), self.names[1]: float(max(peak, rss))}

    def measure(self) -> dict[str, float]:
        """The interval's figures in MB, max over ranks (``{history key: MB}``), then
        :meth:`reset`. A collective under a process group: every rank calls it at the same
        iteration."""
        values = self.local()
        start = [] if self._start_bytes is None else [self._start_bytes]
        figures = torch.tensor(list(values.values()) + start, dtype=torch.float64,
                               device=device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(figures, op=torch.distributed.ReduceOp.MAX)
        self.reset()
        figures = figures.tolist()
        if start:
            self.start_mb, self._start_bytes = figures.pop() / MB, None
        return {key(name): value / MB for name, value in zip(values, figures)}

    def console(self, metrics: dict[str, float]) -> list[str]:
        """The console line's memory parts (Megatron's ``report_memory`` wording): the label,
        then ``name: MB`` for each figure in ``metrics``; empty when it has none."""
        shown = [f"{name}: {metrics[key(name)]:.1f}" for name in self.names
                 if key(name) in metrics]
        if not shown:
            return []
        return [f"{LABEL} {shown[0]}", *shown[1:]]

    def planned_vs_measured(self, iteration: int, metrics: dict[str, float], planned,
                            stage_count: int = 1) -> str:
        """The one line that puts ``--dry-run``'s estimate (``planned``: a
        ``memory_plan.StageMemory``, the largest stage's) beside the measured peak of the first
        interval (``metrics`` from :meth:`measure`), with what each figure counts."""
        from megatron_nitp.accounting.memory_plan import memory_terms

        stage = f" for pipeline stage {planned.stage}, the largest," if stage_count > 1 else ""
        if self.source == "cuda":
            measured = (f"peak {readable(metrics[key('max allocated')] * MB)} allocated, "
                        f"{readable(metrics[key('max reserved')] * MB)} reserved measured "
                        "(max over ranks; the CUDA context and NCCL buffers not counted"
                        + self._before("; ", "allocated") + ")")
            total = planned.total
            terms = (memory_terms(planned) + ": the plan's allowance for the CUDA context, NCCL, "
                     "workspaces and fragmentation")
        else:
            since = " since start" if self.source == "rusage" else ""
            measured = (f"peak {readable(metrics[self.peak_key] * MB)} RSS{since} measured "
                        "(max over ranks; the RSS includes the Python/torch runtime and the "
                        "data pipeline" + self._before(": ", "were resident") + ")")
            total = planned.total - planned.runtime
            terms = (memory_terms(planned, runtime=False) + f"; the plan's "
                     f"{planned.runtime / GIB:g} GiB GPU runtime allowance left out on CPU")
        return (f"> memory after iteration {iteration}: {measured} vs {readable(total)} "
                f"planned per rank by --dry-run{stage} ({terms})")

    def _before(self, joint: str, what: str) -> str:
        """``<joint>X GiB <what> before the first step`` once :meth:`begin`'s figure is known
        (the part of the peak that set-up left: weights, gradient buffers, and on CPU the
        runtime), else nothing."""
        if self.start_mb is None:
            return ""
        return f"{joint}{readable(self.start_mb * MB)} {what} before the first step"


def resident_tensor_bytes(run) -> int:
    """Bytes of the tensors an arm keeps between steps: parameters, gradient buffers (DDP's
    ``main_grad``), module buffers, the optimizer's main parameters and Adam states. Each
    storage is counted once (gradients are views of one contiguous buffer)."""
    from megatron_nitp.training.model import as_chunks

    def tensors():
        for model in as_chunks(run.model):  # the chunks of the interleaved schedule
            yield from model.parameters()
            yield from torch.nn.Module.buffers(model)  # DDP's own .buffers: its grad buffers
            for buffer in getattr(model, "buffers", []):
                yield from (t for t in (buffer.param_data, buffer.grad_data) if t is not None)
            for p in model.parameters():
                if getattr(p, "main_grad", None) is not None:
                    yield p.main_grad
        for optimizer in getattr(run.optimizer, "chained_optimizers", [run.optimizer]):
            inner = optimizer.optimizer
            for group in inner.param_groups:
                yield from group["params"]
            for state in inner.state.values():
                yield from (v for v in state.values() if torch.is_tensor(v))

    storages = {}
    for t in tensors():
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


#: The profiler range around the optimizer's step in :func:`step_memory` (CPU).
OPTIMIZER_RANGE = "megatron_nitp.step_memory.optimizer_step"


def step_memory(run, iteration: int) -> dict:
    """Memory of one training step of ``run`` (a ``loop.Run``), in MiB, for the benchmarks
    (``tools/flops_overhead.py --measure``, ``tools/memory_benchmark.py``), measured in this
    process (several models may live here, so process-wide figures such as peak RSS cannot
    tell them apart).

    ``resident``: :func:`resident_tensor_bytes`. ``step_peak``: the peak of the tensor bytes
    allocated during the step above those live at its start (activations kept for the
    backward, logits, temporaries, the optimizer's temporaries). ``forward_backward_peak``: the
    same peak before the optimizer's step begins - what recomputation changes; the optimizer's
    own temporaries (torch's Adam without a fused kernel: about two fp32 copies of the
    parameters) can set the step's peak and hide it. CPU: torch's CPU allocations are invisible
    to tracemalloc and torch keeps no CPU peak counter, so the step runs under
    ``torch.profiler`` with ``profile_memory=True``, the allocation/free events are summed in
    time order and the optimizer's step is a profiler range. GPU:
    ``torch.cuda.max_memory_allocated()`` minus the bytes allocated at the step's start, read
    again when the optimizer's step begins. Non-tensor memory (Python, libraries) is the same
    for every arm and is not counted.
    """
    from megatron_nitp.training.step import train_step

    optimizer_step, marks = run.optimizer.step, {}
    own = vars(run.optimizer).get("step")  # an instance attribute, if any, to put back
    cuda = devices.has_cuda()
    start = 0

    def marked_step(*args, **kwargs):
        if cuda:
            devices.synchronize()
            marks["forward_backward"] = devices.memory_stats()["max allocated"] - start
        with torch.profiler.record_function(OPTIMIZER_RANGE):
            return optimizer_step(*args, **kwargs)

    step = lambda: train_step(run.model, run.optimizer, run.scheduler,  # noqa: E731
                              run.train_iter, run.args, iteration, False)
    run.optimizer.step = marked_step
    try:
        if cuda:
            devices.synchronize()
            devices.reset_peak_memory_stats()
            start = devices.memory_stats()["allocated"]
            step()
            devices.synchronize()
            peak = devices.memory_stats()["max allocated"] - start
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
            events = prof.profiler.kineto_results.events()
            begins = [e.start_ns() for e in events if e.name() == OPTIMIZER_RANGE]
            live = peak = 0
            for event in sorted((e for e in events if e.name() == "[memory]"),
                                key=lambda e: e.start_ns()):
                if begins and "forward_backward" not in marks and event.start_ns() >= begins[0]:
                    marks["forward_backward"] = peak
                live += event.nbytes()
                peak = max(peak, live)
            if begins:
                marks.setdefault("forward_backward", peak)
    finally:
        if own is None:
            del run.optimizer.step  # the class's method again
        else:
            run.optimizer.step = own
    resident = resident_tensor_bytes(run)
    forward_backward = marks.get("forward_backward")
    return {"resident_mib": resident / 2**20, "step_peak_mib": peak / 2**20,
            "forward_backward_peak_mib": (None if forward_backward is None
                                          else forward_backward / 2**20),
            "peak_mib": (resident + peak) / 2**20}
