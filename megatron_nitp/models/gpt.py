"""`NITPGPTModel`: megatron-core's GPTModel with the auxiliary objectives attached at its edges.

The model captures the layers the objectives tap, routes them to the last stage and calls each
objective's ``per_token_loss`` there (``megatron_nitp.objectives``); the paper is one objective,
NITP at layer k, computed by ``nitp.loss.implicit_token_loss``.

Data flow of one forward on the last pipeline stage (shapes in Megatron layout)::

    tokens [b, s] -> embedding [s, b, h] -> layers 1..L (layer k's output captured, detached: z)
      -> final norm: h [s, b, h] -> output layer -> lm loss [b, s]           (GPTModel, unchanged)
                                 -> projector P(h) [s, b, h] -> 1 - cos(P(h_t), z_{t+1}) [b, s]

GPTModel's own forward is not modified: hooks (each tapped layer's output, and the final norm's output
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
from typing import Callable, ContextManager, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nitp.data.datasets import CONTINUES_DOCUMENT
from megatron_nitp.nitp.capture import ActivationCapture, find_target_module, recompute_error
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.nitp.loss import SequenceShards
from megatron_nitp.nitp.routing import TargetRouter, owner_stage
from megatron_nitp.nitp.shift import local_positions
from megatron_nitp.objectives import LossInputs, ModelOutput, Objective, representation_objectives


class NITPGPTModel(GPTModel):
    """GPTModel whose training forward returns a :class:`ModelOutput`: the lm loss, and each
    auxiliary objective's term.

    With ``labels`` on the last pipeline stage, ``forward`` returns ``ModelOutput(lm_loss [b, s],
    aux={report key: AuxTerm(loss [b, s], mask [b, s])}, hidden, taps)``: each objective's
    per-token loss and the mask of the positions that carry it (for NITP: ``loss_mask`` where a
    target exists - not the sequence's last position, nor a position whose ``document_mask`` is
    0), and, with ``return_hidden=True``, the detached ``[s, b, h]`` final hidden states and
    tapped layers' states (for representation-geometry metrics; whole sequences over TP,
    gathered under sequence parallelism). Under context parallelism ``s`` is this rank's
    ``s / cp``. Otherwise it behaves as GPTModel.

    ``objectives``: the terms the model computes (``megatron_nitp.objectives``); by default
    those of ``nitp`` (the paper: one NITP term). Each objective's module lives on the last
    stage: the first NITP term's at ``projector`` (the paper's name, kept in checkpoints), the
    others in ``aux_modules``.

    ``tap_owners`` (the interleaved schedule): tapped layer -> (pipeline rank, model chunk)
    that holds it (``layout.target_chunk``), checked against the built chunk; without it the
    stages find the owner by one all-reduce. ``shared_routers``: the dict of routers that a
    rank's model chunks share (the chunk that holds a tapped layer sends through it, the last
    chunk receives), filled by the first chunk built.

    ``routing_timeout`` and ``routing_wait_timer`` go to the taps' routers
    (``nitp.routing.TargetRouter``): the builder's collective timeout and its timer of the
    routing wait (``training/model.py`` passes the run's).
    """

    def __init__(self, config: TransformerConfig, nitp: NITPConfig, *,
                 objectives: Optional[Sequence[Objective]] = None,
                 tap_owners: Optional[dict] = None,
                 shared_routers: Optional[dict] = None,
                 routing_timeout: Optional[datetime.timedelta] = None,
                 routing_wait_timer: Optional[Callable[[], ContextManager]] = None,
                 **gpt_kwargs):
        _refuse_cuda_graphs(config)
        super().__init__(config=config, **gpt_kwargs)
        self.nitp = nitp
        self.objectives = tuple(representation_objectives(nitp) if objectives is None
                                else objectives)
        self.projector: Optional[torch.nn.Module] = None
        self._modules_of: dict = {}
        if self.post_process:
            for objective in self.objectives:
                module = objective.build_module(config)
                if module is None:
                    continue
                if objective.module_name == "projector":
                    self.projector = module
                else:
                    if not hasattr(self, "aux_modules"):
                        self.aux_modules = torch.nn.ModuleDict()
                    self.aux_modules[objective.module_name] = module
                self._modules_of[objective.module_name] = module
        # Every tapped layer: captured where it lives, routed to the last stage if elsewhere.
        self._taps: dict[int, ActivationCapture] = {}
        self._routers: dict[int, TargetRouter] = {}
        self.tap_owner_stages: dict[int, int] = {}
        pp_size = config.pipeline_model_parallel_size
        for layer in sorted({layer for o in self.objectives for layer in o.taps}):
            target = find_target_module(self, layer)
            self._taps[layer] = ActivationCapture(target, detach=nitp.stop_gradient)
            if tap_owners is not None:  # the interleaved schedule: (rank, chunk) given
                owner, routed = self._check_owner(layer, target is not None, tap_owners[layer])
            else:  # where the layer really is (uneven splits included): one all-reduce over PP
                owner = owner_stage(target is not None) if pp_size > 1 else 0
                routed = owner != pp_size - 1
            self.tap_owner_stages[layer] = owner
            if pp_size > 1 and routed:
                routers = self._routers if shared_routers is None else shared_routers
                if layer not in routers:  # built once per rank, in tap order, on every rank
                    # without SP the TP ranks hold the same z: each routes 1/TP of its rows
                    routers[layer] = TargetRouter(owner,
                                                  split_over_tp=not config.sequence_parallel,
                                                  timeout=routing_timeout,
                                                  wait_timer=routing_wait_timer, tap=layer)
                if target is not None or self.post_process:  # the sending or receiving chunk
                    self._routers[layer] = routers[layer]
        self.target_owner_stage: Optional[int] = self.tap_owner_stages.get(nitp.target_layer)
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
        aux_inputs: Optional[dict] = None,
        microbatch: Optional[int] = None,
        **kwargs,
    ):
        """GPTModel's forward plus the objectives' terms (see the class docstring).

        ``document_mask``: ``[b, s]`` (``s/cp`` under CP, sliced like the labels), 1 where
        position t+1 belongs to the document of position t, 0 where another document starts
        (``--nitp-document-boundary mask``): those positions get no NITP term, since their
        target would be another document's state. The shift itself is unchanged (it moves
        rows across shards and stages); the mask only drops pairs. None: every position with a
        next position has a target. ``aux_inputs``: the objectives' other ``[b, s]`` inputs
        (``Objective.batch_inputs``, sliced like the labels). Read on the last stage only.
        ``microbatch``: the step's index of this micro-batch, the identity under which tapped
        layers are routed between stages (None: their order).

        ``return_hidden``: also return the final hidden states ``[s, b, h]`` and the tapped
        layers' (``ModelOutput.hidden`` / ``taps``). Only the last stage's value matters; the
        step passes it on every stage for the micro-batch whose representation geometry it
        measures, so the TP all-gather under sequence parallelism is paid only there.
        """
        grad_enabled = torch.is_grad_enabled()
        output = super().forward(
            input_ids, position_ids, attention_mask, labels=labels, loss_mask=loss_mask, **kwargs
        )
        states = {layer: capture.pop() if not capture.needs_graph(grad_enabled)
                  else self._recompute_failure(layer) for layer, capture in self._taps.items()}
        if self._final.needs_graph(grad_enabled):  # only without a final norm on this stage
            self._final.pop()
            raise RuntimeError("the NITP hidden state (--nitp-hidden-source "
                               f"{self.nitp.hidden_source}) was computed without autograd "
                               "(activation recomputation covers the last layer): disable "
                               "recomputation of the last layer")
        hidden = self._final.pop()
        if not self.post_process:
            for layer, router in self._routers.items():  # ascending layers: the receive order
                if states[layer] is not None:
                    # the stage's output carries the backward hook that releases the buffer
                    router.send(states[layer], output, microbatch)
        if labels is None or not self.post_process:
            return output
        loss_mask = torch.ones_like(labels) if loss_mask is None else loss_mask
        loss_mask = loss_mask.float()
        for layer in states:
            if states[layer] is None:
                states[layer] = self._routers[layer].recv(like=hidden, microbatch=microbatch)
        inputs = dict(aux_inputs or {})
        if document_mask is not None:
            inputs[CONTINUES_DOCUMENT] = document_mask
        terms = LossInputs(hidden, states, loss_mask, inputs, self._shards(hidden))
        aux = {}
        for objective in self.objectives:
            term = objective.per_token_loss(terms, self._modules_of.get(objective.module_name))
            if term is not None:
                aux[objective.report_key] = term
        if not return_hidden:
            return ModelOutput(output, aux)
        return ModelOutput(output, aux, self._full(hidden),
                           {layer: self._full(state) for layer, state in states.items()})

    def _check_owner(self, layer: int, here: bool, owner: tuple) -> tuple[int, bool]:
        """(owning pipeline rank, whether the layer must be routed) from the given (rank,
        chunk) of a tapped layer, checked against this chunk (which holds it or not)."""
        config = self.config
        chunk = self.vp_stage or 0
        me = (parallel_state.get_pipeline_model_parallel_rank(), chunk)
        if here != (me == tuple(owner)):
            raise RuntimeError(f"tapped layer {layer} is placed on (rank, chunk) {tuple(owner)} "
                               f"but chunk {me} {'holds' if here else 'does not hold'} it")
        chunks = config.virtual_pipeline_model_parallel_size or 1
        last = (config.pipeline_model_parallel_size - 1, chunks - 1)
        return owner[0], tuple(owner) != last

    def _recompute_failure(self, layer: int):
        for capture in (*self._taps.values(), self._final):
            capture.pop()
        raise recompute_error(self, layer)

    def _shards(self, hidden: torch.Tensor) -> Optional[SequenceShards]:
        """Where this rank's ``[L, b, h]`` rows sit in the sequence under sequence and/or
        context parallelism (None otherwise): the shift then reaches other ranks' rows."""
        config = self.config
        tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
        cp = config.context_parallel_size
        if tp == 1 and cp == 1:
            return None
        seq_length = hidden.shape[0] * tp * cp
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
        return SequenceShards(positions, seq_length, group, _gather_over_tp if tp > 1 else None)

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
        """Bytes of tapped layers' states this chunk has sent to the last stage so far."""
        return sum(router.bytes_sent for router in self._sending())

    @property
    def routed_peak_bytes_held(self) -> int:
        """Most bytes of tapped states this chunk's pending sends held during the last finished
        step (``finish_step``), summed over its taps; 0 off the owning stages."""
        return sum(router.peak_bytes_held for router in self._sending())

    def _sending(self) -> list:
        """The routers this chunk sends through (it holds their tapped layer)."""
        return [router for layer, router in self._routers.items()
                if self._taps[layer].owns_target and not self.post_process]

    def finish_step(self) -> None:
        """Completes this step's outstanding tap sends (owning pipeline stages) and closes
        their accounting (``routed_peak_bytes_held``)."""
        for router in self._routers.values():
            router.wait()


def _gather_over_tp(rows: torch.Tensor) -> torch.Tensor:
    """``[L, b]`` per-position values of this rank's sequence shard -> ``[L * tp, b]`` over
    TP; the backward only splits (the values are replicated over TP from here on)."""
    return gather_from_sequence_parallel_region(
        rows.unsqueeze(-1), tensor_parallel_output_grad=False).squeeze(-1)


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
