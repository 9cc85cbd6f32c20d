"""The one place that knows which device this process computes on.

Everything the training loop creates (token counts, flags, reports, RNG states, buffers that
enter a collective) is allocated with ``device()``: the current CUDA device under NCCL, the CPU
under gloo. gloo accepts CPU tensors anywhere; NCCL rejects them, so a tensor made without a
device is a GPU-only crash that the CPU suite cannot see. ``tests/test_device_guard.py`` scans
the package for tensor constructors that name no device (see docs/design.md, "Devices").

No other module of the package branches on ``torch.cuda.is_available()``: they ask this one.
"""

from __future__ import annotations

import torch


def has_cuda() -> bool:
    """Whether this process trains on a CUDA device (NCCL) rather than the CPU (gloo)."""
    return torch.cuda.is_available()


def bind(local_rank: int) -> None:
    """Makes GPU ``local_rank`` this process's current device (no-op on CPU)."""
    if has_cuda():
        torch.cuda.set_device(local_rank)


def device() -> torch.device:
    """The device of this rank: ``cuda:<current>`` with CUDA, else ``cpu``."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict) -> dict:
    """A micro-batch ``{name: tensor}`` moved to ``device()`` (non-blocking from pinned memory)."""
    target = device()
    return {k: v.to(target, non_blocking=True) for k, v in batch.items()}


def synchronize() -> None:
    """Waits for queued device work (timing); a no-op on CPU."""
    if has_cuda():
        torch.cuda.synchronize()


def rng_state() -> torch.Tensor | None:
    """The device generator's state (None on CPU, where torch's own state covers it)."""
    return torch.cuda.get_rng_state() if has_cuda() else None


def set_rng_state(state: torch.Tensor | None) -> None:
    if state is not None and has_cuda():
        torch.cuda.set_rng_state(state)


def memory_stats() -> dict[str, int] | None:
    """This process's CUDA caching-allocator figures in bytes, Megatron-LM's ``report_memory``
    names: ``allocated`` and ``reserved`` now, ``max allocated`` and ``max reserved`` since the
    last :func:`reset_peak_memory_stats`. None on CPU (``training/memory.py`` reads the RSS)."""
    if not has_cuda():
        return None
    return {"allocated": torch.cuda.memory_allocated(),
            "max allocated": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "max reserved": torch.cuda.max_memory_reserved()}


def reset_peak_memory_stats() -> None:
    """Starts a new peak for :func:`memory_stats`'s ``max`` figures (no-op on CPU)."""
    if has_cuda():
        torch.cuda.reset_peak_memory_stats()


def compute_capability() -> tuple[int, int] | None:
    """The current GPU's (major, minor), e.g. (9, 0) for Hopper; None on CPU."""
    return tuple(torch.cuda.get_device_capability()) if has_cuda() else None


def name() -> str:
    """A human-readable device name for logs and benchmark reports."""
    return torch.cuda.get_device_name() if has_cuda() else "cpu"
