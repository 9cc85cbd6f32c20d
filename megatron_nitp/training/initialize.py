"""Process groups, megatron-core's parallel state and seeds.

On a machine without CUDA the CPU compatibility layer is applied first and the backend is gloo;
with CUDA it is NCCL and nothing is patched.
"""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import torch

from megatron_nitp import compat


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    backend: str | None = None,
    expert_model_parallel_size: int = 1,
) -> None:
    """Start torch.distributed (torchrun's env:// or a single local process) and megatron's
    parallel state. Idempotent."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        compat.apply()
        # Denormal floats (tiny gradients and Adam moments after some steps) make x86 CPU
        # arithmetic 10-50x slower; a training run loses nothing by flushing them to zero.
        torch.set_flush_denormal(True)
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = backend or ("gloo" if on_cpu else "nccl")
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend=backend)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
        )


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's RNG tracker (model-parallel states).

    Every rank uses the same base seed: weights are initialized on CPU from the full master
    weight and then split (``use_cpu_initialization``), so a TP=n model starts from exactly the
    TP=1 weights.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed) if torch.cuda.is_available() else torch.default_generator.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.default_generator.manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
