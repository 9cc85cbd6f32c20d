"""The generic baseline as an objective: penalize the mean cosine similarity between the last
hidden states of different tokens of a sequence (no target, no projector)."""

from __future__ import annotations

from typing import Callable

import torch

from megatron_nitp.nitp.loss import cosine_regularization
from megatron_nitp.objectives.base import AuxTerm, LossInputs, Objective


class CosineRegularization(Objective):
    """``mean_u cos(h_t, h_u)`` per counted token t, mean over the counted tokens.

    ``weight``: its weight schedule (``--nitp-objective cosine_reg``: lambda from
    ``--nitp-start-iter``; ``--nitp-cosine-reg-weight w``: w beside the NITP term). Needs whole
    sequences on a rank (sequence and context parallelism are refused by the config)."""

    name = "cosine_reg"
    report_key = "cosine reg loss"

    def __init__(self, weight: Callable[[int], float]):
        self._weight = weight

    def count(self, batch: dict) -> torch.Tensor:
        return batch["loss_mask"].double().sum()

    def per_token_loss(self, inputs: LossInputs, module) -> AuxTerm:
        mask = inputs.loss_mask.float()
        return AuxTerm(cosine_regularization(inputs.hidden, mask), mask)

    def weight_at(self, iteration: int) -> float:
        return self._weight(iteration)
