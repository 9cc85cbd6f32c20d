"""The paper's term as an objective: predict layer k's state of the token ``d`` positions
ahead from the final hidden state, through a projector of its own.

One term per (target layer, horizon): the paper is one term, k at about 20% of depth and
``d = 1``. ``--nitp-extra-target-layers`` and ``--nitp-horizon H`` add terms (each with its own
projector and logged loss) and lambda then weighs their mean, so one term is the paper exactly.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_nitp.data.datasets import CONTINUES_DOCUMENT
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.nitp.loss import (continues_document, implicit_token_loss,
                                     num_contributing_positions)
from megatron_nitp.nitp.projector import build_projector
from megatron_nitp.objectives.base import AuxTerm, LossInputs, Objective


class ImplicitTokenPrediction(Objective):
    """``1 - cos(P(h_t), z^k_{t+d})``, masked, mean over the positions that have a target.

    ``layer``: k; ``horizon``: d; ``terms``: how many NITP terms the run has (lambda / terms
    each). The first term (k, 1) keeps the paper's names: its projector is the model's
    ``projector`` and its loss is logged as ``nitp loss``; with several terms each is logged as
    ``nitp loss k=<k> t+<d>`` and ``nitp loss`` is their mean (``combine``)."""

    name = "nitp"

    def __init__(self, nitp: NITPConfig, layer: int, horizon: int = 1, terms: int = 1):
        self.nitp, self.layer, self.horizon, self.terms = nitp, layer, horizon, terms
        self.taps = (layer,)
        self.shift = nitp.shift if horizon == 1 else horizon
        first = layer == nitp.target_layer and horizon == 1
        self.module_name = "projector" if first else f"k{layer}_t{horizon}"
        self.report_key = "nitp loss" if terms == 1 else f"nitp loss k={layer} t+{horizon}"
        # the batch's document mask for this horizon (d = 1: the data pipeline's own)
        self.document_key = (CONTINUES_DOCUMENT if horizon == 1
                             else f"{CONTINUES_DOCUMENT}_{horizon}")

    def build_module(self, config) -> Optional[torch.nn.Module]:
        return build_projector(config, self.nitp.projector, self.nitp.projector_ffn_ratio)

    def batch_inputs(self, batch: dict) -> dict:
        if self.horizon > 1 and CONTINUES_DOCUMENT in batch:
            return {self.document_key: continues_document(batch[CONTINUES_DOCUMENT],
                                                          self.horizon)}
        return {}

    def count(self, batch: dict) -> torch.Tensor:
        mask = batch["loss_mask"].double()
        if self.document_key in batch:
            mask = mask * batch[self.document_key].double()
        return num_contributing_positions(mask, self.shift)

    def per_token_loss(self, inputs: LossInputs, module) -> AuxTerm:
        loss, mask = implicit_token_loss(
            module(inputs.hidden), inputs.taps[self.layer], inputs.loss_mask,
            # the tap is already detached where it was captured (--nitp-no-stop-gradient keeps
            # its graph): one place decides, so a capture that forgot it would show
            shift=self.shift, kind=self.nitp.loss_kind, stop_gradient=False,
            document_mask=inputs.inputs.get(self.document_key), shards=inputs.shards)
        return AuxTerm(loss, mask)

    def weight_at(self, iteration: int) -> float:
        return self.nitp.weight_at(iteration) / self.terms
