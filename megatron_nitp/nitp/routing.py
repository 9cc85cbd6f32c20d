"""Routing tapped layers' states (the layer-k target) to the last pipeline stage.

The target comes from layer k (about 20% of depth, so usually on an early pipeline stage) but
the loss is computed on the last stage. The owning stage (under the interleaved schedule, the
model chunk that holds the layer) sends each micro-batch's detached layer-k state straight to
the last stage with a point-to-point send on a process group of its own; the last stage receives
it when it computes that micro-batch's loss. Each message carries its micro-batch's identity,
and the receiver asks for the micro-batch it computes (``TargetRouter``), so the pairing holds
under any schedule megatron-core runs. One router per tapped layer. Nothing travels backward:
the target needs no gradient.

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

import contextlib
import datetime
from functools import partial
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nitp.device import device
from megatron_nitp.layout import routed_rows

_GROUP = None


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


def routing_group(timeout: Optional[datetime.timedelta] = None):
    """A copy of this rank's pipeline group, created collectively once (every rank joins every
    group's creation, in the same order, as ``new_group`` requires). ``timeout``: the caller's
    ``--distributed-timeout-minutes``, that of the other groups, so that a stage that never
    sends fails the receiving stage with an error instead of hanging it (None: the backend's
    default). The caller passes it: this layer knows no run settings."""
    global _GROUP
    if _GROUP is None:
        pipeline_ranks = dist.get_process_group_ranks(
            parallel_state.get_pipeline_model_parallel_group()
        )
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, tuple(pipeline_ranks))
        for ranks in sorted(set(every)):
            group = dist.new_group(list(ranks), timeout=timeout)
            if dist.get_rank() in ranks:
                _GROUP = group
    return _GROUP


def reset_routing_group() -> None:
    global _GROUP
    _GROUP = None
    _INBOX.clear()


#: Targets received but not yet asked for, by sending rank: ``{(tap, micro-batch): rows}``. The
#: routers of one rank's taps share it: one sender's messages for several taps arrive in one
#: FIFO stream (per pair of ranks on the routing group), in the sender's order, which under the
#: interleaved schedule interleaves the taps' micro-batches differently from the receiver's.
_INBOX: dict = {}


class _Pending:
    """One outstanding send: its requests (the micro-batch header and the rows), the tensors
    they read from (kept alive until the send completes) and its index in send order."""

    __slots__ = ("index", "works", "tensors", "nbytes")

    def __init__(self, index: int, works: list, tensors: list):
        self.index, self.works, self.tensors = index, works, tensors
        self.nbytes = tensors[-1].numel() * tensors[-1].element_size()

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)

    def wait(self) -> None:
        for work in self.works:
            work.wait()


#: Received targets a receiver may keep for micro-batches it has not reached yet, before it
#: calls the pairing broken (a schedule never runs that far ahead of its own order).
MAX_STASHED = 64


class TargetRouter:
    """Sends one tapped layer's states from the owning stage; receives them on the last stage,
    each matched to its micro-batch by identity.

    ``owner_stage``: the pipeline rank that holds the layer (under the interleaved schedule,
    one of its model chunks); the receiver is the last rank (its last chunk). When both are the
    same rank - the layer on an earlier chunk of the last rank - the state is handed over in
    memory, no message. ``split_over_tp``: the TP ranks hold identical copies of z (no sequence
    parallelism), so each sends ``ceil(L / tp)`` of its ``L`` rows and the last stage
    all-gathers them over TP.

    Identity. Every send carries its tap and micro-batch (a two-element header before the
    rows: ``tap``, the layer, and ``microbatch``, the step's index of the micro-batch, or the
    send count when the caller gives none), and ``recv(microbatch=m)`` returns the rows sent
    for this tap and m: a target that arrives for another tap or a later micro-batch is kept
    (in the sending rank's inbox, which the rank's routers share) until asked for. Under the plain and the
    interleaved 1F1B schedules and the forward-only one, each model chunk runs its micro-batches
    in order, so targets arrive in the order they are asked for; the identity makes that a
    checked fact rather than an assumption, and the pairing does not depend on the schedule.

    Releasing the send buffers. A send's tensor must stay alive until the send completes, but
    the owning stage must never wait for the last stage in the middle of the schedule unless
    the last stage is known to have received it already (under 1F1B the last stage may itself
    be waiting for the owner's next activation). Two facts make a send releasable:

    - the backend reports it complete (``Work.is_completed()``; NCCL does once its kernel has
      run, gloo never before ``wait()``);
    - the backward pass of its micro-batch has reached the owning stage (chunk). That gradient
      was sent by the next stage after its own backward, ..., after the last stage's backward of
      the micro-batch, which follows its forward, in which the target was received (blocking
      ``recv``). So waiting on that send, or on any earlier one, cannot block on the peer. A
      gradient hook on the stage's output of the micro-batch records it.

    Pending sends are checked at each new send and all completed at the end of the step
    (``wait``). Under 1F1B stage p runs ``W = min(PP - p - 1, M)`` warm-up forwards, then the
    forward of micro-batch ``W + i`` after the backward of ``i - 1``: at most ``min(PP - p, M)``
    sends are held, the micro-batches whose activations the stage holds anyway (the forward-only
    schedule of evaluation holds all M until the end; the interleaved schedule its warm-up
    count of chunk forwards). ``bytes_held`` / ``peak_bytes_held`` account for it.

    ``timeout``: the routing group's collective timeout (``routing_group``). ``wait_timer``:
    a context manager factory around each blocking receive, through which the caller times the
    routing wait (the training step's timers); none by default.
    """

    def __init__(self, owner_stage: int, split_over_tp: bool = False,
                 timeout: Optional[datetime.timedelta] = None,
                 wait_timer: Optional[Callable[[], ContextManager]] = None, tap: int = 0):
        self.tap = tap
        group = parallel_state.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        self.source, self.destination = ranks[owner_stage], ranks[-1]
        self.local = self.source == self.destination
        self.group = routing_group(timeout)
        self._wait_timer = wait_timer or contextlib.nullcontext
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_split = tp if split_over_tp and not self.local else 1
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank() if split_over_tp else 0
        self._pending: list[_Pending] = []
        # (tap, micro-batch) -> rows not yet asked for: in memory for a local handoff, else
        # the inbox of the sending rank that this rank's routers share
        self._stash: dict = {} if self.local else _INBOX.setdefault(self.source, {})
        self._sent = 0  # sends so far (the next send's index)
        self._received = 0  # receives so far
        self._delivered = -1  # highest send index known to be received by the last stage
        self._active = False  # sent or received since the last wait()
        self.bytes_sent = 0
        self.bytes_held = 0  # bytes the pending sends' tensors hold now
        self._step_peak = 0
        self.peak_bytes_held = 0  # most bytes held at once during the last finished step
        if not self.local:
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

    def send(self, state: torch.Tensor, output: torch.Tensor | None = None,
             microbatch: Optional[int] = None) -> None:
        """Non-blocking send of one micro-batch's target (owning stage).

        ``state``: this rank's ``[L, b, h]`` layer output (``L = s/cp``, ``s/cp/tp`` under
        SP); this rank's ``[ceil(L/tp), b, h]`` share of it goes without SP (``routed_rows``).
        ``output``: the stage's output of the same micro-batch; when it records a graph, a
        gradient hook on it marks this send delivered once the backward pass reaches it.
        ``microbatch``: the micro-batch's identity (default: the send count).
        """
        self._active = True
        identity = self._sent if microbatch is None else microbatch
        if self.local:
            self._stash[self.tap, identity] = state.detach()
            self._sent += 1
            return
        self._release()
        tensor = self._share(state.detach())
        header = torch.tensor([self.tap, identity], dtype=torch.int64, device=device())
        works = [dist.isend(header, self.destination, group=self.group),
                 dist.isend(tensor, self.destination, group=self.group)]
        pending = _Pending(self._sent, works, [header, tensor])
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
            if pending.index <= self._delivered or pending.is_completed():
                pending.wait()
                self.bytes_held -= pending.nbytes
            else:
                keep.append(pending)
        self._pending = keep

    def recv(self, like: torch.Tensor, microbatch: Optional[int] = None) -> torch.Tensor:
        """The ``[L, b, h]`` target of micro-batch ``microbatch`` (default: the receive count),
        shaped like ``like`` (last stage): received whole, or, split over TP, this rank's
        ``[ceil(L/tp), b, h]`` share followed by an all-gather of the shares over the TP group
        (trimmed to L rows). A target received for another micro-batch is kept for when it is
        asked for. The receives run inside ``wait_timer`` (training times them as the NITP
        routing wait, ``--timing-log-level 2``)."""
        self._active = True
        key = (self.tap, self._received if microbatch is None else microbatch)
        self._received += 1
        if self.local:
            if key not in self._stash:
                raise RuntimeError(f"no routed target for (tap, micro-batch) {key}: the layer's "
                                   f"model chunk has sent {sorted(self._stash)}")
            return self._stash.pop(key)
        rows, rest = like.shape[0], tuple(like.shape[1:])
        chunk = routed_rows(rows, self.tp_split, False) if self.tp_split > 1 else rows
        while key not in self._stash:
            if len(self._stash) >= MAX_STASHED:
                raise RuntimeError(f"waiting for the routed target of (tap, micro-batch) {key}, "
                                   f"received those of {sorted(self._stash)}: the sending "
                                   "stage's micro-batches do not match this stage's")
            header = torch.empty(2, dtype=torch.int64, device=device())
            share = torch.empty((chunk, *rest), dtype=like.dtype, device=device())
            with self._wait_timer():
                dist.recv(header, self.source, group=self.group)
                dist.recv(share, self.source, group=self.group)
            self._stash[tuple(header.tolist())] = share
        share = self._stash.pop(key)
        if self.tp_split == 1:
            return share
        full = torch.empty((chunk * self.tp_split, *rest), dtype=like.dtype, device=device())
        # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(full, share, group=self.tp_group)
        return full[:rows]

    def wait(self) -> None:
        """Completes every outstanding send (called once per step, after the schedule, by
        each model chunk that shares the router: only the first call after a send or receive
        acts) and closes the step's accounting (``peak_bytes_held``)."""
        if not self._active:
            return
        self._active = False
        for pending in self._pending:
            pending.wait()
        self._pending.clear()
        stale = sorted(key for key in self._stash if key[0] == self.tap)
        if stale:
            for key in stale:
                del self._stash[key]
            raise RuntimeError(f"routed targets of micro-batches {stale} were never used: the "
                               "sending and receiving stages ran different micro-batches")
        self.bytes_held = 0
        self.peak_bytes_held, self._step_peak = self._step_peak, 0
