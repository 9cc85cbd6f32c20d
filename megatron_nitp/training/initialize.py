"""Process groups, megatron-core's parallel state and seeds.

The compatibility layer is applied first (only the patches whose cause is present: no CUDA, no
TE, no Apex); the backend is gloo without CUDA and NCCL with it.
"""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch

from megatron_nitp import compat
from megatron_nitp.device import bind, device, has_cuda


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: --distributed-timeout-minutes of this process's groups (set by initialize_distributed)
_TIMEOUT_MINUTES = 10


def distributed_timeout() -> datetime.timedelta:
    """The collective timeout of the groups created after initialization (the NITP routing
    group), the same as the default group's and megatron-core's."""
    return datetime.timedelta(minutes=_TIMEOUT_MINUTES)


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    backend: str | None = None,
    expert_model_parallel_size: int = 1,
    timeout_minutes: int = 10,
    expert_tensor_parallel_size: int | None = None,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> None:
    """Start torch.distributed (torchrun's env:// or a single local process) and megatron's
    parallel state. Idempotent.

    Under NCCL the process group is bound to this rank's GPU (``device_id``), which makes torch
    create the communicators eagerly, at ``init_process_group`` and ``new_group``, instead of at
    their first collective inside the pipeline schedule (where two ranks that reach different
    first collectives can deadlock); ``timeout_minutes`` turns a hang into an error.
    """
    global _TIMEOUT_MINUTES
    compat.apply()  # each patch only where what it works around is missing (CUDA, TE, Apex)
    if not has_cuda():
        # Denormal floats (tiny gradients and Adam moments after some steps) make x86 CPU
        # arithmetic 10-50x slower; a training run loses nothing by flushing them to zero.
        torch.set_flush_denormal(True)
    if not torch.distributed.is_initialized():
        _TIMEOUT_MINUTES = timeout_minutes
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = backend or ("nccl" if has_cuda() else "gloo")
        kwargs = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        bind(int(os.environ.get("LOCAL_RANK", 0)))
        if has_cuda() and backend == "nccl":
            kwargs["device_id"] = device()
        torch.distributed.init_process_group(backend=backend, **kwargs)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    # the interleaved schedule's chunks per rank (megatron-core's schedules read it from the
    # parallel state); set apart so that a process initialized before keeps it current
    parallel_state.set_virtual_pipeline_model_parallel_world_size(
        virtual_pipeline_model_parallel_size)


def set_seed(seed: int) -> None:
    """Seed the runtime RNGs (Python, NumPy, torch, megatron's model-parallel RNG tracker) of
    this rank, after Megatron-LM's convention: ``seed + 100 * pipeline_rank``, so pipeline
    stages draw different dropout masks; the tracker adds its TP/EP offsets on top
    (``model_parallel_cuda_manual_seed``).

    Initial weights do not depend on this: ``models.initialization.initialize_weights`` draws
    every parameter from the base seed and the parameter's global identity, whatever the layout.
    """
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and (where present) CUDA generators
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.default_generator.manual_seed(seed)


def destroy_distributed() -> None:
    """Tears down megatron-core's groups and the default process group, where a run set them up
    (NCCL warns at exit about a process group left alive)."""
    if not torch.distributed.is_initialized():
        return
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
