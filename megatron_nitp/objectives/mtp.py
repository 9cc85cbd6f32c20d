"""megatron-core's multi-token prediction (DeepSeek-V3) as an objective.

``depth`` extra blocks on the last stage each predict one token further ahead; GPTModel adds
their mean cross entropy times ``factor`` to the loss itself (``MTPLossAutoScaler``: the model
keeps GPTModel's return contract), so this objective computes nothing in the forward: it asks
for the blocks and reads the value from megatron-core's tracker. Megatron-LM's
``--mtp-num-layers`` / ``--mtp-loss-scaling-factor``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_nitp.device import device
from megatron_nitp.objectives.base import Objective


class MultiTokenPrediction(Objective):
    name = "mtp"
    report_key = "mtp loss"

    def __init__(self, depth: int, factor: float):
        self.depth, self.factor = depth, factor

    def transformer_config(self) -> dict:
        return {"mtp_num_layers": self.depth, "mtp_loss_scaling_factor": self.factor}

    def model_kwargs(self, config, layer_spec, use_te: bool, vp_stage=None) -> dict:
        """The MTP block spec of this model chunk: None except on the last pipeline rank's last
        chunk, where megatron-core puts every MTP layer (``mtp_on_this_rank``). Under the
        interleaved schedule megatron-core needs the chunk's ``vp_stage`` to tell (without it
        ``is_pipeline_last_stage`` asserts), and GPTModel gets the same ``vp_stage``."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        chunk = {} if vp_stage is None else {"vp_stage": vp_stage}
        return {"mtp_block_spec": get_gpt_mtp_block_spec(config, layer_spec,
                                                         use_transformer_engine=use_te, **chunk)}

    def weight_at(self, iteration: int) -> float:
        return self.factor

    def reports(self, num_microbatches: int) -> dict:
        """The mean MTP cross entropy of this step's micro-batches (over depths) from
        megatron-core's tracker, which GPTModel fills on the last stage in training; the
        tracker is cleared. Other stages report nothing (count 0)."""
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        tracker = MTPLossLoggingHelper.tracker
        # the per-depth losses: "values" in megatron-core 0.16 to 0.18, "loss_values" in 0.19
        # (beside "correct_values" and "total_values", its acceptance counts)
        values: Optional[torch.Tensor] = tracker.get("loss_values", tracker.get("values"))
        if values is None or not bool(values.any()):
            return {self.report_key: torch.zeros(2, dtype=torch.float64, device=device())}
        total = values.double().sum() / self.depth
        for entry in tracker.values():
            if isinstance(entry, torch.Tensor):
                entry.zero_()
        count = torch.tensor(float(num_microbatches), dtype=torch.float64, device=total.device)
        return {self.report_key: torch.stack([total, count])}
