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


def stage_layer_counts(
    num_layers: int, pipeline_size: int, first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> list[int]:
    """Transformer layers on each pipeline stage, as megatron-core builds them.

    Even split by default; ``first_stage_layers`` / ``last_stage_layers`` are megatron-core's
    ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` (flags
    ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``), the
    other stages sharing the rest evenly. The counts come from megatron-core's own
    ``get_num_layers_to_build`` (the function TransformerBlock calls); the checks that
    TransformerConfig would make are made here first, as ValueErrors naming the numbers.
    """
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if pipeline_size < 1 or num_layers < 1:
        raise ValueError(f"{num_layers} layers over {pipeline_size} pipeline stages")
    if uneven and pipeline_size == 1:
        raise ValueError("first/last pipeline stage layer counts need pipeline parallelism "
                         "(--pipeline-model-parallel-size > 1)")
    middle_layers, middle_stages = num_layers, pipeline_size
    for name, count in (("first", first_stage_layers), ("last", last_stage_layers)):
        if count is not None:
            if count <= 0:
                raise ValueError(f"the {name} pipeline stage must hold at least one layer "
                                 f"(got {count})")
            middle_layers -= count
            middle_stages -= 1
    if middle_layers < 0 or bool(middle_layers) != bool(middle_stages) or (
            middle_stages and middle_layers % middle_stages):
        what = ("the other stages" if uneven else "the stages")
        raise ValueError(f"{num_layers} layers do not split over {pipeline_size} pipeline stages "
                         f"(first stage {first_stage_layers}, last stage {last_stage_layers}): "
                         f"{middle_layers} layers left for {middle_stages} of {what}, which must "
                         "divide them evenly")
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    config = SimpleNamespace(  # the fields get_num_layers_to_build reads (0.16 and 0.19)
        num_layers=num_layers, pipeline_model_parallel_size=pipeline_size,
        num_layers_in_first_pipeline_stage=first_stage_layers,
        num_layers_in_last_pipeline_stage=last_stage_layers,
        pipeline_model_parallel_layout=None, virtual_pipeline_model_parallel_size=None,
        account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False,
    )
    return [get_num_layers_to_build(config, pp_rank=rank) for rank in range(pipeline_size)]


def target_stage(
    target_layer: int, num_layers: int, pipeline_size: int, first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> int:
    """Pipeline stage that owns layer k (k = 0 is the embedding, on the first stage), for the
    per-stage layer counts of ``stage_layer_counts``. The model itself decides from what it
    built (``owner_stage``); this pure version serves plans, validation and tools."""
    if target_layer == 0:
        return 0
    if not 1 <= target_layer <= num_layers:
        raise ValueError(f"target layer {target_layer} is not one of the {num_layers} layers")
    last = 0
    for stage, count in enumerate(
            stage_layer_counts(num_layers, pipeline_size, first_stage_layers, last_stage_layers)):
        last += count
        if target_layer <= last:
            return stage
    raise AssertionError("unreachable: the stage counts sum to num_layers")


def owner_stage(holds_target: bool) -> int:
    """The pipeline stage whose built model holds layer k: every stage says whether
    ``find_target_module`` found it there, combined by one all-reduce of a ``[PP]`` tensor over
    the pipeline group. Called collectively by every rank while the model is built."""
    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pipeline_size == 1:
        return 0
    found = torch.zeros(pipeline_size, dtype=torch.int32, device=device())
    found[parallel_state.get_pipeline_model_parallel_rank()] = int(holds_target)
    dist.all_reduce(found, group=parallel_state.get_pipeline_model_parallel_group())
    stages = found.nonzero().flatten().tolist()
    if len(stages) != 1:
        raise RuntimeError(f"the NITP target layer was found on pipeline stages {stages}; exactly "
                           "one stage must hold it")
    return stages[0]


def routed_bytes_per_step(
    *, seq_length: int, micro_batch_size: int, hidden_size: int, num_microbatches: int,
    target_layer: int, num_layers: int, tensor_parallel: int = 1, pipeline_parallel: int = 1,
    data_parallel: int = 1, context_parallel: int = 1, sequence_parallel: bool = False,
    dtype_bytes: int = 2, first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> dict:
    """Bytes NITP adds to pipeline communication, per micro-batch and per optimizer step.

    One ``[s/cp (/tp with SP), b, h]`` target per micro-batch goes from every rank of the owning
    stage (each TP rank holds its own copy, or its shard under SP; each CP rank its chunk) to its
    counterpart on the last stage. Nothing is sent backward. Zero when layer k is on the last
    stage. Returned: per sending rank and micro-batch, per sending rank and step, and the whole
    job's total per step (all DP replicas). ``first_stage_layers`` / ``last_stage_layers``:
    an uneven pipeline split (``stage_layer_counts``).
    """
    owner = target_stage(target_layer, num_layers, pipeline_parallel, first_stage_layers,
                         last_stage_layers)
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
