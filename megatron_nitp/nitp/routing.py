"""Routing the layer-k target to the last pipeline stage.

The target comes from layer k (about 20% of depth, so usually on an early pipeline stage) but
the loss is computed on the last stage. The owning stage sends each micro-batch's detached
layer-k state straight to the last stage with a point-to-point send on a process group of its
own; the last stage receives it when it computes that micro-batch's loss. Both stages run their
forwards in micro-batch order under megatron-core's schedules, so the n-th receive is the n-th
send. Nothing travels backward: the target needs no gradient.

Cost: one ``[ceil(s/cp/tp), b, h]`` tensor in the pipeline dtype per micro-batch and per
(tensor-parallel, context-parallel, data-parallel) rank of the owning stage; zero when layer k is
on the last stage. Without sequence parallelism the TP ranks hold identical copies of z, so each
sends only its 1/TP share of the rows and the last stage all-gathers them over TP; under SP each
already holds its own ``[s/cp/tp, b, h]`` shard and sends that. The dedicated group keeps these
messages from ever pairing with megatron-core's own pipeline sends (NCCL ignores tags, and with
PP=2 both go from stage 0 to stage 1).

Send buffers are released as soon as the send is known to be delivered, not at the end of the
step (``TargetRouter``), so the owning stage holds at most ``min(PP - owner, M)`` micro-batches'
targets under 1F1B (M micro-batches), the micro-batches whose activations it holds anyway.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nitp.device import device
from megatron_nitp.training.initialize import distributed_timeout
from megatron_nitp.training.timers import ROUTING_WAIT, TIMERS

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


def routed_rows(rows: int, tensor_parallel: int, sequence_parallel: bool) -> int:
    """Rows of the ``[rows, b, h]`` target one owning-stage rank sends per micro-batch.

    ``rows``: the rank's layer-k rows (``s/cp``, or ``s/cp/tp`` under sequence parallelism).
    Without SP the TP ranks hold the same rows and each sends ``ceil(rows / tp)`` of them (the
    last share zero-padded when TP does not divide them, so the last stage's all-gather gets
    equal parts); under SP each sends its whole shard.
    """
    if sequence_parallel or tensor_parallel == 1:
        return rows
    return -(-rows // tensor_parallel)


def routed_bytes_per_step(
    *, seq_length: int, micro_batch_size: int, hidden_size: int, num_microbatches: int,
    target_layer: int, num_layers: int, tensor_parallel: int = 1, pipeline_parallel: int = 1,
    data_parallel: int = 1, context_parallel: int = 1, sequence_parallel: bool = False,
    dtype_bytes: int = 2, first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> dict:
    """Bytes NITP adds to pipeline communication, per micro-batch and per optimizer step, and
    the send buffers the owning stage holds at once.

    One ``[ceil(s/cp/tp), b, h]`` target share per micro-batch goes from every rank of the
    owning stage (each TP rank its 1/TP of the rows, or its own shard under SP; each CP rank
    its chunk) to its counterpart on the last stage (``routed_rows``). Nothing is sent
    backward. Zero when layer k is on the last stage. Returned: per sending rank and
    micro-batch, per sending rank and step, the whole job's total per step (all DP replicas),
    and ``peak_bytes_held_per_rank``: the most bytes a sending rank's pending sends hold at
    once under 1F1B, ``min(PP - owner, M)`` micro-batches (a send is released once the
    backward of its micro-batch reaches the owner; ``TargetRouter``). ``first_stage_layers`` /
    ``last_stage_layers``: an uneven pipeline split (``stage_layer_counts``).
    """
    owner = target_stage(target_layer, num_layers, pipeline_parallel, first_stage_layers,
                         last_stage_layers)
    routed = pipeline_parallel > 1 and owner != pipeline_parallel - 1
    rows = seq_length // context_parallel // (tensor_parallel if sequence_parallel else 1)
    share = routed_rows(rows, tensor_parallel, sequence_parallel)
    per_micro = share * micro_batch_size * hidden_size * dtype_bytes if routed else 0
    senders = tensor_parallel * context_parallel * data_parallel
    pipeline_activation = rows * micro_batch_size * hidden_size * dtype_bytes
    return {
        "owner_stage": owner,
        "routed": routed,
        "bytes_per_microbatch_per_rank": per_micro,
        "bytes_per_step_per_rank": per_micro * num_microbatches,
        "bytes_per_step_total": per_micro * num_microbatches * senders,
        "peak_bytes_held_per_rank": per_micro * min(pipeline_parallel - owner, num_microbatches),
        "backward_bytes": 0,
        # megatron-core's own traffic, for scale: forward activation + backward gradient at each
        # of the PP-1 stage boundaries, per micro-batch, per rank.
        "pipeline_bytes_per_step_per_rank": 2 * (pipeline_parallel - 1) * pipeline_activation
        * num_microbatches,
    }


def routing_group():
    """A copy of this rank's pipeline group, created collectively once (every rank joins every
    group's creation, in the same order, as ``new_group`` requires), with the
    ``--distributed-timeout-minutes`` of the other groups: a stage that never sends fails the
    receiving stage with an error instead of hanging it for the backend's default."""
    global _GROUP
    if _GROUP is None:
        pipeline_ranks = dist.get_process_group_ranks(
            parallel_state.get_pipeline_model_parallel_group()
        )
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, tuple(pipeline_ranks))
        timeout = distributed_timeout()  # --distributed-timeout-minutes, as every group
        for ranks in sorted(set(every)):
            group = dist.new_group(list(ranks), timeout=timeout)
            if dist.get_rank() in ranks:
                _GROUP = group
    return _GROUP


def reset_routing_group() -> None:
    global _GROUP
    _GROUP = None


class _Pending:
    """One outstanding send: its request, the ``[rows, b, h]`` tensor it reads from (kept alive
    until the send completes) and its micro-batch's index in send order."""

    __slots__ = ("index", "work", "tensor", "nbytes")

    def __init__(self, index: int, work, tensor: torch.Tensor):
        self.index, self.work, self.tensor = index, work, tensor
        self.nbytes = tensor.numel() * tensor.element_size()


class TargetRouter:
    """Sends layer-k states from the owning stage; receives them on the last stage.

    ``split_over_tp``: the TP ranks hold identical copies of z (no sequence parallelism), so
    each sends ``ceil(L / tp)`` of its ``L`` rows and the last stage all-gathers them over TP.

    Releasing the send buffers. A send's tensor must stay alive until the send completes, but
    the owning stage must never wait for the last stage in the middle of the schedule unless
    the last stage is known to have received it already (under 1F1B the last stage may itself
    be waiting for the owner's next activation). Two facts make a send releasable:

    - the backend reports it complete (``Work.is_completed()``; NCCL does once its kernel has
      run, gloo never before ``wait()``);
    - the backward pass of its micro-batch has reached the owning stage. That gradient was sent
      by the next stage after its own backward, ..., after the last stage's backward of the
      micro-batch, which follows its forward, in which the target was received (blocking
      ``recv``, in send order). So waiting on that send, or on any earlier one, cannot block
      on the peer. A gradient hook on the stage's output of the micro-batch records it.

    Pending sends are checked at each new send and all completed at the end of the step
    (``wait``). Under 1F1B stage p runs ``W = min(PP - p - 1, M)`` warm-up forwards, then the
    forward of micro-batch ``W + i`` after the backward of ``i - 1``: at most ``min(PP - p, M)``
    sends are held, the micro-batches whose activations the stage holds anyway (the forward-only
    schedule of evaluation holds all M until the end). ``bytes_held`` / ``peak_bytes_held``
    account for it.
    """

    def __init__(self, owner_stage: int, split_over_tp: bool = False):
        group = parallel_state.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        self.source, self.destination = ranks[owner_stage], ranks[-1]
        self.group = routing_group()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_split = tp if split_over_tp else 1
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank() if split_over_tp else 0
        self._pending: list[_Pending] = []
        self._sent = 0  # sends so far (the next send's index)
        self._delivered = -1  # highest send index known to be received by the last stage
        self.bytes_sent = 0
        self.bytes_held = 0  # bytes the pending sends' tensors hold now
        self._step_peak = 0
        self.peak_bytes_held = 0  # most bytes held at once during the last finished step
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

    def send(self, state: torch.Tensor, output: torch.Tensor | None = None) -> None:
        """Non-blocking send of one micro-batch's target (owning stage).

        ``state``: this rank's ``[L, b, h]`` layer-k output (``L = s/cp``, ``s/cp/tp`` under
        SP); this rank's ``[ceil(L/tp), b, h]`` share of it goes without SP (``routed_rows``).
        ``output``: the stage's output of the same micro-batch; when it records a graph, a
        gradient hook on it marks this send delivered once the backward pass reaches it.
        """
        self._release()
        tensor = self._share(state.detach())
        pending = _Pending(self._sent, dist.isend(tensor, self.destination, group=self.group),
                           tensor)
        self._sent += 1
        self._pending.append(pending)
        self.bytes_sent += pending.nbytes
        self.bytes_held += pending.nbytes
        self._step_peak = max(self._step_peak, self.bytes_held)
        if output is not None and output.requires_grad:
            output.register_hook(partial(self._backward_reached, pending.index))

    def _share(self, state: torch.Tensor) -> torch.Tensor:
        """This TP rank's ``[ceil(L/tp), b, h]`` rows of ``state`` ``[L, b, h]`` (the last
        shares zero-padded when TP does not divide L), or all of it (no split).

        A share is a copy, not a view: a pending send then keeps exactly the bytes it sends
        alive, never the whole ``[L, b, h]`` layer-k output behind it (which megatron-core
        frees early when it is the stage's output)."""
        if self.tp_split == 1:
            return state.contiguous()
        chunk = routed_rows(state.shape[0], self.tp_split, False)
        part = state[self.tp_rank * chunk: (self.tp_rank + 1) * chunk]
        share = torch.empty((chunk, *state.shape[1:]), dtype=state.dtype, device=device())
        share[: part.shape[0]] = part
        share[part.shape[0]:] = 0
        return share

    def _backward_reached(self, index: int, grad: torch.Tensor) -> None:
        """Gradient hook on the owner's output of micro-batch ``index``: the last stage has
        received that micro-batch's target (and every earlier one); see the class docstring."""
        self._delivered = max(self._delivered, index)

    def _release(self) -> None:
        """Drops the pending sends known to be delivered or reported complete. ``wait()`` on
        them returns at once (NCCL: a stream dependency that lets the caching allocator reuse
        the buffer safely; gloo: the peer has the data) and lets the backend drop its own
        reference to the tensor."""
        keep = []
        for pending in self._pending:
            if pending.index <= self._delivered or pending.work.is_completed():
                pending.work.wait()
                self.bytes_held -= pending.nbytes
            else:
                keep.append(pending)
        self._pending = keep

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        """Blocking receive of the next micro-batch's ``[L, b, h]`` target, shaped like ``like``
        (last stage): the whole of it, or, split over TP, this rank's ``[ceil(L/tp), b, h]``
        share followed by an all-gather of the shares over the TP group (trimmed to L rows).
        The receive is timed as the NITP routing wait (``--timing-log-level 2``)."""
        if self.tp_split == 1:
            buffer = torch.empty(like.shape, dtype=like.dtype, device=device())
            with TIMERS.phase(ROUTING_WAIT):
                dist.recv(buffer, self.source, group=self.group)
            return buffer
        rows, rest = like.shape[0], tuple(like.shape[1:])
        chunk = routed_rows(rows, self.tp_split, False)
        share = torch.empty((chunk, *rest), dtype=like.dtype, device=device())
        with TIMERS.phase(ROUTING_WAIT):
            dist.recv(share, self.source, group=self.group)
        full = torch.empty((chunk * self.tp_split, *rest), dtype=like.dtype, device=device())
        # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(full, share, group=self.tp_group)
        return full[:rows]

    def wait(self) -> None:
        """Completes every outstanding send (called once per step, after the schedule) and
        closes the step's accounting (``peak_bytes_held``)."""
        for pending in self._pending:
            pending.work.wait()
        self._pending.clear()
        self.bytes_held = 0
        self.peak_bytes_held, self._step_peak = self._step_peak, 0
