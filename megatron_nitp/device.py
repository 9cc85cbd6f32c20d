"""The one place that knows which device this process computes on.

Everything the training loop creates (token counts, flags, reports, RNG states, buffers that
enter a collective) is allocated with ``device()``: the current CUDA device under NCCL, the CPU
under gloo. gloo accepts CPU tensors anywhere; NCCL rejects them, so a tensor made without a
device is a GPU-only crash that the CPU suite cannot see. ``tests/test_device_guard.py`` scans
the package for tensor constructors that name no device (see docs/design.md, "Devices").

No other module of the package branches on ``torch.cuda.is_available()``: they ask this one.
"""

from __future__ import annotations

import os

import torch


def has_cuda() -> bool:
    """Whether this process trains on a CUDA device (NCCL) rather than the CPU (gloo)."""
    return torch.cuda.is_available()


#: ``1``: several ranks of a node share its GPUs (``local_rank % GPUs``), e.g. two NCCL ranks on
#: the one GPU of a test machine (``scripts/gpu_check.sh`` sets it there). Not for training runs.
SHARED_GPU_ENV = "MEGATRON_NITP_SHARED_GPU"


def shared_gpu() -> bool:
    return os.environ.get(SHARED_GPU_ENV) == "1"


def gpu_index(local_rank: int, device_count: int, shared: bool = False) -> int:
    """The GPU of local rank ``local_rank``: its own, or under ``shared`` the ranks in turn."""
    if shared:
        return local_rank % device_count
    if local_rank >= device_count:
        raise RuntimeError(f"local rank {local_rank} has no GPU: this node has {device_count} "
                           f"(launch at most {device_count} processes per node, or set "
                           f"{SHARED_GPU_ENV}=1 to share them in a test)")
    return local_rank


def nccl_version() -> tuple[int, ...]:
    """The NCCL version torch was built with, e.g. ``(2, 27, 3)``; ``()`` without CUDA."""
    return tuple(torch.cuda.nccl.version()) if has_cuda() else ()


def shared_gpu_nccl_env(rank: int, nccl_version: tuple) -> dict[str, str]:
    """The NCCL settings that let ranks share one GPU. NCCL <= 2.29 refuses two ranks on one
    GPU ("Duplicate GPU detected": same host hash and bus id); a host id of its own per rank
    makes each rank a host of its own, connected over sockets on loopback. NCCL >= 2.30 allows
    it with ``NCCL_MULTI_RANK_GPU_ENABLE``."""
    if tuple(nccl_version) >= (2, 30, 0):
        return {"NCCL_MULTI_RANK_GPU_ENABLE": "1"}
    return {"NCCL_HOSTID": f"nitp-shared-gpu-rank{rank}", "NCCL_SOCKET_IFNAME": "lo",
            "NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1", "NCCL_NVLS_ENABLE": "0"}


def bind(local_rank: int) -> None:
    """Makes this rank's GPU (:func:`gpu_index`) the current device, and under
    ``$MEGATRON_NITP_SHARED_GPU`` sets NCCL up for ranks sharing a GPU (values already in the
    environment are kept); a no-op on CPU. Called before ``init_process_group``."""
    if not has_cuda():
        return
    if shared_gpu():
        rank = int(os.environ.get("RANK", local_rank))
        for name, value in shared_gpu_nccl_env(rank, nccl_version()).items():
            os.environ.setdefault(name, value)
    torch.cuda.set_device(gpu_index(local_rank, torch.cuda.device_count(), shared_gpu()))


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
