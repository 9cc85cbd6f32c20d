"""`NITPGPTModel`: megatron-core's GPTModel with the NITP objective attached at its edges.

Data flow of one forward on the last pipeline stage (shapes in Megatron layout)::

    tokens [b, s] -> embedding [s, b, h] -> layers 1..L (layer k's output captured, detached: z)
      -> final norm: h [s, b, h] -> output layer -> lm loss [b, s]           (GPTModel, unchanged)
                                 -> projector P(h) [s, b, h] -> 1 - cos(P(h_t), z_{t+1}) [b, s]

GPTModel's own forward is not modified: two forward hooks (layer k, and the decoder whose output
is the final-norm hidden state) hand the NITP loss what it needs. A model built with NITP
disabled - the NTP baseline, or the model for inference - has no projector and exactly
GPTModel's parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nitp.nitp.capture import ActivationCapture, find_target_module
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.nitp.loss import implicit_token_loss
from megatron_nitp.nitp.projector import build_projector


class NITPGPTModel(GPTModel):
    """GPTModel whose training forward returns ``(lm_loss, nitp_loss, hidden)``.

    With ``labels`` on the last pipeline stage, ``forward`` returns ``[b, s]`` NTP per-token loss,
    ``[b, s]`` NITP per-token loss (zeros when NITP is off) and the detached ``[s, b, h]`` final
    hidden states (for representation-geometry metrics). Otherwise it behaves as GPTModel.
    """

    def __init__(self, config: TransformerConfig, nitp: NITPConfig, **gpt_kwargs):
        super().__init__(config=config, **gpt_kwargs)
        self.nitp = nitp
        self.projector: Optional[torch.nn.Module] = None
        self._shallow: Optional[ActivationCapture] = None
        if nitp.enabled:
            target = find_target_module(self, nitp.target_layer)
            self._shallow = ActivationCapture(target, detach=nitp.stop_gradient)
            if self.post_process:
                self.projector = build_projector(config, nitp.projector, nitp.projector_ffn_ratio)
        self._final = ActivationCapture(self.decoder if self.post_process else None, detach=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        output = super().forward(
            input_ids, position_ids, attention_mask, labels=labels, loss_mask=loss_mask, **kwargs
        )
        hidden = self._final.pop()
        shallow = self._shallow.pop() if self._shallow is not None else None
        if labels is None or not self.post_process:
            return output
        if loss_mask is None:
            loss_mask = torch.ones_like(labels)
        if self.projector is None:
            return output, torch.zeros_like(output, dtype=torch.float32), hidden.detach()
        if shallow is None:
            raise RuntimeError(
                f"NITP target layer {self.nitp.target_layer} produced no state on this stage"
            )
        nitp_loss = implicit_token_loss(
            self.projector(hidden),
            shallow,
            loss_mask,
            shift=self.nitp.shift,
            kind=self.nitp.loss_kind,
            stop_gradient=self.nitp.stop_gradient,
        )
        return output, nitp_loss, hidden.detach()
