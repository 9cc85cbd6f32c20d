"""What a checkpoint holds of the running process: megatron-core's sharded state of the model
and optimizer (in the distributed optimizer's format), the scheduler's state and the RNG
states. Save and load build the same state, so a checkpoint loads at any layout its format
allows."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel

from megatron_nitp import device
from megatron_nitp.training.checkpoint.meta import (DP_RESHARDABLE, FULLY_RESHARDABLE,
                                                    MODEL_SPACE)
from megatron_nitp.training.model import as_chunks, unwrap


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": device.rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    device.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(sub, DistributedOptimizer) for sub in subs)


def optimizer_format(config, optimizer=None) -> str:
    """The optimizer format a save of this run (``config``: its ``RunConfig``) writes:
    Megatron-LM's choice. With the distributed optimizer ``dp_reshardable`` by default (each
    rank holds and writes only its own shard, so host memory and bytes per rank fall as DP
    grows) and ``fully_reshardable`` with ``--dist-ckpt-optim-fully-reshardable`` (each rank
    gathers its data-parallel group's whole state: for a save that another TP/PP/EP will load);
    the plain optimizer's state is always per parameter (``model_space``)."""
    distributed = (_is_distributed_optimizer(optimizer) if optimizer is not None
                   else config.training.use_distributed_optimizer)
    if not distributed:
        return MODEL_SPACE
    if config.checkpoint.dist_ckpt_optim_fully_reshardable:
        return FULLY_RESHARDABLE
    return DP_RESHARDABLE


def model_sharded_state(model) -> dict:
    """The model's sharded state; under the interleaved schedule one entry per chunk. The
    tensors' keys are global (layer numbers, TP offsets), so a checkpoint written with any
    chunking loads into any other: the entries only group them."""
    chunks = as_chunks(model)
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict(prefix="model.")
    return {f"chunk{i}": unwrap(c).sharded_state_dict(prefix="model.")
            for i, c in enumerate(chunks)}


def load_model_state(model, loaded: dict) -> None:
    """Loads :func:`model_sharded_state`'s filled entries into the (unwrapped) chunks."""
    chunks = as_chunks(model)
    parts = [loaded] if len(chunks) == 1 else [loaded[f"chunk{i}"] for i in range(len(chunks))]
    for chunk, part in zip(chunks, parts):
        unwrap(chunk).load_state_dict({k[len("model."):]: v for k, v in part.items()
                                       if k.startswith("model.")}, strict=False)


def sharded_state(model, optimizer, is_loading: bool, fmt: str = FULLY_RESHARDABLE) -> dict:
    """megatron-core's sharded state of the model and optimizer; ``fmt`` is the distributed
    optimizer's format (:func:`optimizer_format` at save, the checkpoint's at load; by default
    the layout-independent per-parameter form, which tests/parallel_harness.py compares across
    layouts). megatron-core's own default (flattened ranges, "fully_sharded_model_space") cannot
    be saved at DP >= 2, so a distributed optimizer always names its format."""
    model_sd = model_sharded_state(model)
    state = {"model": model_sd}
    if optimizer is not None:
        kwargs = {}
        if _is_distributed_optimizer(optimizer):
            kwargs["metadata"] = {"distrib_optim_sharding_type": fmt}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                         **kwargs)
    return state


def _is_torch_adam(optimizer) -> bool:
    """torch's Adam/AdamW: what megatron-core's optimizer falls back to when neither Transformer
    Engine's nor Apex's FusedAdam imports. Those fused ones derive from torch.optim.Optimizer,
    not from Adam, keep no per-parameter "step" and are set up at load by megatron-core itself
    (the optimizer's ``init_state_fn``)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def materialize_adam_state(optimizer) -> None:
    """torch's Adam creates its state at the first step; megatron-core's distributed optimizer
    reads its per-parameter ``state["step"]`` while building the state dict it loads into
    (``DistributedOptimizer.state_dict``, the no-Apex/TE branch). Give a fresh torch Adam that
    empty state. Any other optimizer (TE's or Apex's FusedAdam on GPU) is left untouched: a
    "step" in their per-parameter state makes their own ``state_dict()`` raise KeyError."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None or not _is_torch_adam(inner):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, device="cpu")  # where torch's Adam keeps it
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)


def schedules():
    """training/optimizer.py, imported when a scheduler is saved or loaded (it imports
    megatron-core's optimizer, which export and evaluation never need)."""
    from megatron_nitp.training import optimizer

    return optimizer
