"""Routing the layer-k target to the last pipeline stage.

The target comes from layer k (about 20% of depth, so usually on an early pipeline stage) but
the loss is computed on the last stage. The owning stage sends each micro-batch's detached
layer-k state straight to the last stage with a point-to-point send on a process group of its
own; the last stage receives it when it computes that micro-batch's loss. Both stages run their
forwards in micro-batch order under megatron-core's schedules, so the n-th receive is the n-th
send. Nothing travels backward: the target needs no gradient.

Cost: one ``[s/cp (/tp under SP), b, h]`` tensor in the pipeline dtype per micro-batch and
per (tensor-parallel, data-parallel) rank of the owning stage; zero when layer k is on the last
stage. The dedicated group keeps these messages from ever pairing with megatron-core's own
pipeline sends (NCCL ignores tags, and with PP=2 both go from stage 0 to stage 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nitp.device import device

_GROUP = None


def target_stage(target_layer: int, num_layers: int, pipeline_size: int) -> int:
    """Pipeline stage that owns layer k (layers split evenly; k = 0 is the embedding)."""
    if target_layer == 0:
        return 0
    return (target_layer - 1) // (num_layers // pipeline_size)


def routed_bytes_per_step(
    *, seq_length: int, micro_batch_size: int, hidden_size: int, num_microbatches: int,
    target_layer: int, num_layers: int, tensor_parallel: int = 1, pipeline_parallel: int = 1,
    data_parallel: int = 1, context_parallel: int = 1, sequence_parallel: bool = False,
    dtype_bytes: int = 2,
) -> dict:
    """Bytes NITP adds to pipeline communication, per micro-batch and per optimizer step.

    One ``[s/cp (/tp with SP), b, h]`` target per micro-batch goes from every rank of the owning
    stage (each TP rank holds its own copy, or its shard under SP; each CP rank its chunk) to its
    counterpart on the last stage. Nothing is sent backward. Zero when layer k is on the last
    stage. Returned: per sending rank and micro-batch, per sending rank and step, and the whole
    job's total per step (all DP replicas).
    """
    owner = target_stage(target_layer, num_layers, pipeline_parallel)
    routed = pipeline_parallel > 1 and owner != pipeline_parallel - 1
    rows = seq_length // context_parallel // (tensor_parallel if sequence_parallel else 1)
    per_micro = rows * micro_batch_size * hidden_size * dtype_bytes if routed else 0
    senders = tensor_parallel * context_parallel * data_parallel
    pipeline_activation = rows * micro_batch_size * hidden_size * dtype_bytes
    return {
        "owner_stage": owner,
        "routed": routed,
        "bytes_per_microbatch_per_rank": per_micro,
        "bytes_per_step_per_rank": per_micro * num_microbatches,
        "bytes_per_step_total": per_micro * num_microbatches * senders,
        "backward_bytes": 0,
        # megatron-core's own traffic, for scale: forward activation + backward gradient at each
        # of the PP-1 stage boundaries, per micro-batch, per rank.
        "pipeline_bytes_per_step_per_rank": 2 * (pipeline_parallel - 1) * pipeline_activation
        * num_microbatches,
    }


def routing_group():
    """A copy of this rank's pipeline group, created collectively once (every rank joins every
    group's creation, in the same order, as ``new_group`` requires)."""
    global _GROUP
    if _GROUP is None:
        pipeline_ranks = dist.get_process_group_ranks(
            parallel_state.get_pipeline_model_parallel_group()
        )
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, tuple(pipeline_ranks))
        for ranks in sorted(set(every)):
            group = dist.new_group(list(ranks))
            if dist.get_rank() in ranks:
                _GROUP = group
    return _GROUP


def reset_routing_group() -> None:
    global _GROUP
    _GROUP = None


class TargetRouter:
    """Sends layer-k states from the owning stage; receives them on the last stage."""

    def __init__(self, owner_stage: int):
        group = parallel_state.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        self.source, self.destination = ranks[owner_stage], ranks[-1]
        self.group = routing_group()
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.bytes_sent = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """One blocking 1-element exchange, owner -> last stage, while the model is built.

        NCCL creates the 2-rank communicator of a point-to-point pair lazily, at its first send,
        and that creation blocks until the peer joins. Left to the first micro-batch, the owner
        would block in its first ``isend`` while the last stage blocks in megatron-core's own
        ``recv_forward`` waiting for the owner's activation: a first-step deadlock under PP. Both
        ranks build the model at the same time, so the exchange here always meets its peer.
        """
        rank = dist.get_rank()
        if rank == self.source:
            dist.send(torch.zeros(1, device=device()), self.destination, group=self.group)
        elif rank == self.destination:
            dist.recv(torch.empty(1, device=device()), self.source, group=self.group)

    def send(self, state: torch.Tensor) -> None:
        """Non-blocking send of one micro-batch's ``[L, b, h]`` target (owning stage)."""
        tensor = state.detach().contiguous()
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self._pending.append((dist.isend(tensor, self.destination, group=self.group), tensor))

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        """Blocking receive of the next micro-batch's target, shaped like ``like`` (last stage)."""
        buffer = torch.empty_like(like)
        dist.recv(buffer, self.source, group=self.group)
        return buffer

    def wait(self) -> None:
        """Completes every outstanding send (called once per step, after the schedule)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
