"""`NITPGPTModel`: megatron-core's GPTModel with the NITP objective attached at its edges.

Data flow of one forward on the last pipeline stage (shapes in Megatron layout)::

    tokens [b, s] -> embedding [s, b, h] -> layers 1..L (layer k's output captured, detached: z)
      -> final norm: h [s, b, h] -> output layer -> lm loss [b, s]           (GPTModel, unchanged)
                                 -> projector P(h) [s, b, h] -> 1 - cos(P(h_t), z_{t+1}) [b, s]

GPTModel's own forward is not modified: two hooks (layer k's output, and the final norm's output
- or its input, the last layer's output, for ``--nitp-hidden-source last_layer``) hand the NITP
loss what it needs; they are correct under activation recomputation and CUDA graphs are refused
(`nitp.capture`). A model built with NITP disabled - the NTP baseline, or the model for
inference - has no projector and exactly GPTModel's parameters.

Parallelism: when layer k is on an earlier pipeline stage (the stage whose built model holds it,
found by one all-reduce at construction), that stage sends z to the last stage
(`nitp.routing`: without sequence parallelism each TP rank sends 1/TP of the rows and the last
stage all-gathers them over TP). Under sequence and/or context parallelism the local rows are
a shard of the sequence, and the shift fetches the next shard's first row (`nitp.shift`); the
per-position distances are then gathered over TP so the returned losses are ``[b, s/cp]`` like
the lm loss.

The final hidden states are returned only when the caller asks (``return_hidden=True``: the
step's representation-geometry micro-batch): under sequence parallelism returning them costs an
all-gather of ``[s/cp, b, h]`` over TP, and Float16Module's fp32 copy of it, per micro-batch.
"""

from __future__ import annotations

import datetime
from typing import Callable, ContextManager, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nitp.nitp.capture import ActivationCapture, find_target_module, recompute_error
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.nitp.loss import cosine_regularization, token_distance
from megatron_nitp.nitp.projector import build_projector
from megatron_nitp.nitp.routing import TargetRouter, owner_stage
from megatron_nitp.nitp.shift import local_positions, shift_targets, shift_targets_sharded


class NITPGPTModel(GPTModel):
    """GPTModel whose training forward returns ``(lm_loss, nitp_loss, nitp_mask, hidden)``.

    With ``labels`` on the last pipeline stage, ``forward`` returns the ``[b, s]`` NTP per-token
    loss, the ``[b, s]`` NITP per-token loss (zeros when NITP is off), the ``[b, s]`` mask of
    positions that carry an NITP loss (``loss_mask`` and a target exists: not the sequence's
    last position, nor a position whose ``document_mask`` is 0) and, with
    ``return_hidden=True``, the detached ``[s, b, h]`` final hidden states (for
    representation-geometry metrics; whole sequences over TP, gathered under sequence
    parallelism), else None. Under context parallelism ``s`` is this rank's
    ``s / cp``. Otherwise it behaves as GPTModel.

    ``routing_timeout`` and ``routing_wait_timer`` go to the target's router
    (``nitp.routing.TargetRouter``): the builder's collective timeout and its timer of the
    routing wait (``training/model.py`` passes the run's).
    """

    def __init__(self, config: TransformerConfig, nitp: NITPConfig, *,
                 routing_timeout: Optional[datetime.timedelta] = None,
                 routing_wait_timer: Optional[Callable[[], ContextManager]] = None,
                 **gpt_kwargs):
        _refuse_cuda_graphs(config)
        super().__init__(config=config, **gpt_kwargs)
        self.nitp = nitp
        self.projector: Optional[torch.nn.Module] = None
        self._shallow: Optional[ActivationCapture] = None
        self._router: Optional[TargetRouter] = None
        self.target_owner_stage: Optional[int] = None
        if nitp.enabled and nitp.objective == "nitp":
            target = find_target_module(self, nitp.target_layer)
            self._shallow = ActivationCapture(target, detach=nitp.stop_gradient)
            if self.post_process:
                self.projector = build_projector(config, nitp.projector, nitp.projector_ffn_ratio)
            # Where layer k really is (uneven splits included): one all-reduce over PP.
            pp_size = config.pipeline_model_parallel_size
            self.target_owner_stage = owner_stage(target is not None) if pp_size > 1 else 0
            if pp_size > 1 and self.target_owner_stage != pp_size - 1:
                # without SP the TP ranks hold the same z: each routes 1/TP of its rows
                self._router = TargetRouter(self.target_owner_stage,
                                            split_over_tp=not config.sequence_parallel,
                                            timeout=routing_timeout,
                                            wait_timer=routing_wait_timer)
        self._final = ActivationCapture(None, detach=False)
        if self.post_process:
            # The final norm runs outside any activation-recomputation checkpoint: its input
            # (the last layer's output) and its output always carry their autograd graph.
            norm = getattr(self.decoder, "final_layernorm", None)
            last_layer = nitp.enabled and nitp.hidden_source == "last_layer"
            if norm is not None:
                self._final = ActivationCapture(norm, detach=False, pre=last_layer)
            else:  # no final norm on this stage: the decoder's output / the last layer's
                source = self.decoder.layers[-1] if last_layer else self.decoder
                self._final = ActivationCapture(source, detach=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
        document_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        """GPTModel's forward plus the NITP terms (see the class docstring).

        ``document_mask``: ``[b, s]`` (``s/cp`` under CP, sliced like the labels), 1 where
        position t+1 belongs to the document of position t, 0 where another document starts
        (``--nitp-document-boundary mask``): those positions get no NITP term, since their
        target would be another document's state. The shift itself is unchanged (it moves
        rows across shards and stages); the mask only drops pairs. None: every position with a
        next position has a target. Read on the last stage only.

        ``return_hidden``: also return the final hidden states ``[s, b, h]`` as the 4th output
        (None otherwise). Only the last stage's value matters; the step passes it on every stage
        for the micro-batch whose representation geometry it measures, so the TP all-gather
        under sequence parallelism (and Float16Module's fp32 copy) is paid only there.
        """
        grad_enabled = torch.is_grad_enabled()
        output = super().forward(
            input_ids, position_ids, attention_mask, labels=labels, loss_mask=loss_mask, **kwargs
        )
        if self._shallow is not None and self._shallow.needs_graph(grad_enabled):
            self._shallow.pop()
            self._final.pop()
            raise recompute_error(self, self.nitp.target_layer)
        if self._final.needs_graph(grad_enabled):  # only without a final norm on this stage
            self._final.pop()
            raise RuntimeError("the NITP hidden state (--nitp-hidden-source "
                               f"{self.nitp.hidden_source}) was computed without autograd "
                               "(activation recomputation covers the last layer): disable "
                               "recomputation of the last layer")
        hidden = self._final.pop()
        shallow = self._shallow.pop() if self._shallow is not None else None
        if shallow is not None and self._router is not None and not self.post_process:
            # the stage's output carries the backward hook that releases this send's buffer
            self._router.send(shallow, output)
        if labels is None or not self.post_process:
            return output
        loss_mask = torch.ones_like(labels) if loss_mask is None else loss_mask
        loss_mask = loss_mask.float()
        full = self._full(hidden) if return_hidden else None
        if self.nitp.enabled and self.nitp.objective == "cosine_reg":
            return output, cosine_regularization(hidden, loss_mask), loss_mask, full
        if self.projector is None:
            return output, torch.zeros_like(loss_mask), loss_mask, full
        if shallow is None:
            shallow = self._router.recv(like=hidden)
        distance, valid = self._distance(self.projector(hidden), shallow)  # [s/cp, b], [s/cp]
        nitp_mask = loss_mask * valid.unsqueeze(0)
        if document_mask is not None:
            nitp_mask = nitp_mask * document_mask.float()
        return output, distance.transpose(0, 1) * nitp_mask, nitp_mask, full

    def _distance(self, predictions: torch.Tensor, shallow: torch.Tensor):
        """Per-position NITP distance ``[s/cp, b]`` over this rank's whole (CP-local) sequence,
        and which positions have a target ``[s/cp]``."""
        config = self.config
        nitp = self.nitp
        tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
        cp = config.context_parallel_size
        if tp == 1 and cp == 1:
            targets, valid = shift_targets(shallow, nitp.shift)
        else:
            seq_length = predictions.shape[0] * tp * cp
            positions = local_positions(
                seq_length,
                parallel_state.get_context_parallel_rank(), cp,
                parallel_state.get_tensor_model_parallel_rank(), tp,
            )
            if tp > 1 and cp > 1:
                group = parallel_state.get_tensor_and_context_parallel_group()
            elif tp > 1:
                group = parallel_state.get_tensor_model_parallel_group()
            else:
                group = parallel_state.get_context_parallel_group()
            targets, valid = shift_targets_sharded(shallow, positions, seq_length, nitp.shift, group)
        distance = token_distance(predictions.float(), targets.float(), nitp.loss_kind)
        distance = distance * valid.unsqueeze(1)
        if tp > 1:
            # Replicated over TP from here on, like the lm loss: the backward only splits.
            distance = gather_from_sequence_parallel_region(
                distance.unsqueeze(-1), tensor_parallel_output_grad=False
            ).squeeze(-1)
            valid = gather_from_sequence_parallel_region(
                valid.float().unsqueeze(-1), tensor_parallel_output_grad=False
            ).squeeze(-1)
        return distance, valid.float()

    def _full(self, hidden: torch.Tensor) -> torch.Tensor:
        """Detached final hidden states ``[s/cp, b, h]`` from this rank's ``[s/cp/tp, b, h]``
        shard under sequence parallelism (an all-gather over TP), as they are otherwise."""
        hidden = hidden.detach()
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """GPTModel's, with ``metadata['dp_cp_group']`` filled as Megatron-LM's checkpointing
        passes it: megatron-core 0.16 reads that entry for an MTP stage that is not the first
        pipeline stage (its tied embedding copy) and fails on the default ``metadata=None``
        that layout-invariant initialization, checkpoints and export use."""
        metadata = dict(metadata or {})
        metadata.setdefault("dp_cp_group",
                            parallel_state.get_data_parallel_group(with_context_parallel=True))
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    @property
    def routed_bytes(self) -> int:
        """Bytes of layer-k targets this rank has sent to the last stage so far."""
        return self._router.bytes_sent if self._router is not None else 0

    @property
    def routed_peak_bytes_held(self) -> int:
        """Most bytes of layer-k targets this rank's pending sends held at once during the last
        finished step (``finish_step``); 0 off the owning stage."""
        return self._router.peak_bytes_held if self._router is not None else 0

    def finish_step(self) -> None:
        """Completes this step's outstanding target sends (owning pipeline stage) and closes
        its accounting (``routed_peak_bytes_held``)."""
        if self._router is not None:
            self._router.wait()


def _refuse_cuda_graphs(config: TransformerConfig) -> None:
    """NITP reads layer k and the final hidden state through forward hooks, which a CUDA graph
    replay does not run (the last stage would then wait for a target that never comes)."""
    impl = getattr(config, "cuda_graph_impl", "none")  # 0.16+: set from enable_cuda_graph too
    if (getattr(config, "enable_cuda_graph", False) or getattr(config, "external_cuda_graph", False)
            or impl not in (None, "none")):
        raise ValueError(
            f"CUDA graphs (cuda_graph_impl={impl!r}, enable_cuda_graph="
            f"{getattr(config, 'enable_cuda_graph', False)}) are not supported with "
            "NITPGPTModel: a graph replay skips the forward hooks that capture layer k and the "
            "final hidden state. Turn CUDA graphs off (cuda_graph_impl='none')."
        )
