"""Training objectives: next-token prediction plus interchangeable auxiliary terms.

Every run optimizes next-token prediction (NTP, the ``lm loss``). On top of it a run config
selects at most one representation term and, independently, megatron-core's multi-token
prediction (MTP)::

    objective   what the step adds to sum_t CE(t) (then / N_ntp, megatron-core's per-token loss)
    ----------  ---------------------------------------------------------------------------------
    ntp         nothing                                                  (--no-nitp)
    nitp        lambda N_ntp / N_nitp  sum_t (1 - cos(P(h_t), z_{t+1}))   (the paper; "nitp loss")
    cosine_reg  lambda N_ntp / N_nitp  sum_t mean_u cos(h_t, h_u)         (--nitp-objective cosine_reg)
    mtp         factor / D  sum_d sum_t CE_d(t)                           (--mtp-num-layers D; "mtp loss")

so each auxiliary term enters the gradient as its weight times the mean over its own positions.
The NITP model computes the representation terms per token and returns them beside the lm loss;
MTP's term is attached by megatron-core itself inside GPTModel (``MTPLossAutoScaler``: the
model keeps GPTModel's return contract), and its value is read from megatron-core's tracker.

The step (``training/step.py``) asks the objectives for their weights and reports; the model
builder (``training/model.py``) asks them what they add to the TransformerConfig and to
GPTModel. Nothing else in the training code names an objective.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_nitp.device import device
from megatron_nitp.nitp.config import NITPConfig


class Objective:
    """NTP alone: adds no term, no model part, no report."""

    name = "ntp"

    def transformer_config(self) -> dict:
        """TransformerConfig fields this objective needs."""
        return {}

    def model_kwargs(self, config, layer_spec, use_te: bool) -> dict:
        """GPTModel keyword arguments this objective needs (e.g. an MTP block spec)."""
        return {}

    def aux_scale(self, iteration: int, n_ntp: float, n_aux: float) -> float:
        """Weight on the per-token sum of the model's auxiliary term (the NITP slot)."""
        return 0.0

    def reports(self, num_microbatches: int) -> dict[str, torch.Tensor]:
        """``{key: [sum, count]}`` measured outside the model's output tuple, this step."""
        return {}


class NextImplicitTokenPrediction(Objective):
    """The paper's term (and the cosine-regularization baseline, which shares its slot, weight
    and normalization): ``lambda`` from ``--nitp-start-iter`` on, mean over the positions that
    have a target."""

    def __init__(self, nitp: NITPConfig):
        self.nitp = nitp
        self.name = nitp.objective

    def aux_scale(self, iteration: int, n_ntp: float, n_aux: float) -> float:
        weight = self.nitp.weight_at(iteration)
        return weight * n_ntp / n_aux if n_aux > 0 else 0.0


class MultiTokenPrediction(Objective):
    """megatron-core's MTP (DeepSeek-V3): ``depth`` extra blocks on the last stage, each
    predicting one token further ahead, their mean cross entropy times ``factor`` added to the
    loss by GPTModel. Megatron-LM's ``--mtp-num-layers`` / ``--mtp-loss-scaling-factor``."""

    name = "mtp"

    def __init__(self, depth: int, factor: float):
        self.depth, self.factor = depth, factor

    def transformer_config(self) -> dict:
        return {"mtp_num_layers": self.depth, "mtp_loss_scaling_factor": self.factor}

    def model_kwargs(self, config, layer_spec, use_te: bool) -> dict:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        # None off the last pipeline stage: megatron-core puts every MTP layer there.
        return {"mtp_block_spec": get_gpt_mtp_block_spec(config, layer_spec,
                                                         use_transformer_engine=use_te)}

    def reports(self, num_microbatches: int) -> dict[str, torch.Tensor]:
        """The mean MTP cross entropy of this step's micro-batches (over depths) from
        megatron-core's tracker, which GPTModel fills on the last stage in training; the
        tracker is cleared. Other stages report nothing (count 0)."""
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        values: Optional[torch.Tensor] = MTPLossLoggingHelper.tracker.get("values")
        if values is None or not bool(values.any()):
            return {"mtp loss": torch.zeros(2, dtype=torch.float64, device=device())}
        total = values.double().sum() / self.depth
        values.zero_()
        count = torch.tensor(float(num_microbatches), dtype=torch.float64, device=total.device)
        return {"mtp loss": torch.stack([total, count])}


def build_objectives(config) -> tuple[Objective, ...]:
    """The objectives of a run config, the representation term first."""
    objectives: list[Objective] = []
    if config.nitp_config.enabled:
        objectives.append(NextImplicitTokenPrediction(config.nitp_config))
    if config.mtp_num_layers:
        objectives.append(MultiTokenPrediction(config.mtp_num_layers,
                                               config.mtp_loss_scaling_factor))
    return tuple(objectives) or (Objective(),)


def describe(config) -> str:
    """One line for the run log: what this run optimizes."""
    nitp = config.nitp_config
    parts = ["NTP"]
    if nitp.enabled and nitp.objective == "nitp":
        parts.append(f"NITP (k={nitp.target_layer}, lambda={nitp.loss_weight:g})")
    elif nitp.enabled:
        parts.append(f"cosine regularization (lambda={nitp.loss_weight:g})")
    if config.mtp_num_layers:
        parts.append(f"MTP (depth {config.mtp_num_layers}, factor "
                     f"{config.mtp_loss_scaling_factor:g})")
    return " + ".join(parts) if len(parts) > 1 else "NTP baseline"
