"""The L2 norm of a model's weights (``--log-params-norm``), the same under every layout.

Each weight is counted once in the whole job: a TP-sharded weight by every TP rank (its
shard), a weight replicated over the TP ranks (norms, the router) by TP rank 0 only, the last
pipeline stage's copy of a tied embedding (megatron-core marks it ``shared``) not at all, and
the data-parallel and context-parallel replicas by nobody but themselves. The squares are
summed over the model-parallel group (TP x PP); an expert's (``allreduce = False``) over the
expert tensor-model-pipeline group instead, which holds each expert once. As Megatron-LM's
``calc_params_l2_norm``, the model's weights are read (in fp32 when they are bf16/fp16).
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_nitp.device import device
from megatron_nitp.training.model import as_chunks


def params_l2_norm(model) -> float:
    """sqrt of the sum of squares of every weight of ``model`` (a chunk or the list of chunks
    under the interleaved schedule), over every rank; a collective, so every rank calls it."""
    squares = {True: torch.zeros((), device=device()), False: torch.zeros((), device=device())}
    for chunk in as_chunks(model):
        for param in chunk.parameters():
            if not (param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param)):
                continue
            dense = getattr(param, "allreduce", True)
            squares[dense] += torch.linalg.vector_norm(param.detach().float()) ** 2
    torch.distributed.all_reduce(squares[True], group=parallel_state.get_model_parallel_group())
    torch.distributed.all_reduce(
        squares[False], group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return math.sqrt(float(squares[True] + squares[False]))
