"""What an auxiliary objective is, and what the model hands the step.

An objective is a term added to next-token prediction. It declares everything the framework
needs to run it, so nothing else names it:

- ``taps``: the layers whose (detached) outputs it reads; the model captures them and, under
  pipeline parallelism, routes them to the last stage (``nitp.routing``);
- ``build_module``: its trainable part on the last stage (e.g. a projector), or None;
- ``batch_inputs``: extra ``[b, s]`` inputs it needs, made from whole sequences before the
  context-parallel split (e.g. a document mask over a longer horizon);
- ``per_token_loss``: its ``[b, s]`` loss and mask, computed inside the model's forward on the
  last stage (``LossInputs``);
- ``count``: how many positions carry it in a micro-batch (whole sequences): the step divides
  the term's sum by the global count, so the term is a mean over its own positions;
- ``weight_at``: its weight at an iteration (the only place a weight such as lambda is read);
- ``reports``: values measured outside the model's output (megatron-core's MTP tracker).

The step minimizes ``sum_t CE(t) / N_ntp + sum_o w_o(it) * sum_t loss_o(t) / N_o`` and logs
each term under its ``report_key``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_nitp.device import device
from megatron_nitp.nitp.loss import SequenceShards


@dataclass
class AuxTerm:
    """One objective's per-token loss ``[b, s]`` (already multiplied by its mask) and the mask
    ``[b, s]`` of the positions that carry it (``s`` is ``s/cp`` under context parallelism)."""

    loss: torch.Tensor
    mask: torch.Tensor


@dataclass
class ModelOutput:
    """The training forward's output on the last pipeline stage.

    ``lm_loss``: ``[b, s]`` per-token cross entropy (GPTModel's); ``aux``: each objective's term
    by its report key; ``hidden``: the detached final hidden states ``[s, b, h]`` when asked for
    (representation geometry), else None; ``taps``: the detached tapped layers' states ``[s, b,
    h]`` by layer number, with ``hidden`` (whole sequences over TP)."""

    lm_loss: torch.Tensor
    aux: dict = field(default_factory=dict)
    hidden: Optional[torch.Tensor] = None
    taps: dict = field(default_factory=dict)


@dataclass
class LossInputs:
    """What an objective's ``per_token_loss`` sees on the last stage.

    ``hidden``: the final hidden states ``[L, b, h]`` with their graph (``L = s/cp``, or
    ``s/cp/tp`` under sequence parallelism); ``taps``: layer number -> that layer's ``[L, b,
    h]`` output (detached, unless the run sets ``--nitp-no-stop-gradient``); ``loss_mask``:
    ``[b, s/cp]``; ``inputs``: the batch's extra ``[b, s/cp]`` inputs (``batch_inputs``, document masks);
    ``shards``: where the local rows sit when the sequence is split, else None."""

    hidden: torch.Tensor
    taps: dict
    loss_mask: torch.Tensor
    inputs: dict
    shards: Optional[SequenceShards] = None


class Objective:
    """The base: adds no term, no module, no report (next-token prediction alone)."""

    name = "ntp"
    report_key: Optional[str] = None  # the logged loss, e.g. "nitp loss"
    taps: tuple = ()
    module_name: Optional[str] = None  # where build_module's module lives in the model

    def transformer_config(self) -> dict:
        """TransformerConfig fields this objective needs."""
        return {}

    def model_kwargs(self, config, layer_spec, use_te: bool, vp_stage=None) -> dict:
        """GPTModel keyword arguments this objective needs (e.g. an MTP block spec) for the
        model chunk ``vp_stage`` (the interleaved schedule; None without it)."""
        return {}

    def build_module(self, config) -> Optional[torch.nn.Module]:
        """The objective's trainable part on the last stage, from the TransformerConfig."""
        return None

    def batch_inputs(self, batch: dict) -> dict:
        """Extra ``[b, s]`` inputs computed from whole sequences (before any CP split)."""
        return {}

    def count(self, batch: dict) -> torch.Tensor:
        """Positions of one micro-batch (whole sequences) that carry this term."""
        return torch.zeros((), dtype=torch.float64, device=device())

    def per_token_loss(self, inputs: LossInputs,
                       module: Optional[torch.nn.Module]) -> Optional[AuxTerm]:
        """The term inside the model's forward on the last stage, or None (computed elsewhere)."""
        return None

    def weight_at(self, iteration: int) -> float:
        """The term's weight at a 0-based iteration."""
        return 0.0

    def reports(self, num_microbatches: int) -> dict:
        """``{key: [sum, count]}`` measured outside the model's output, this step."""
        return {}
