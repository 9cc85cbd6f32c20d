"""The NITP projection head P, built from megatron-core's tensor-parallel linear layers.

SwiGLU, no bias: ``P(h) = W_down (silu(W_gate h) * (W_up h))`` with ``W_gate, W_up: d -> 4d``
(column-parallel: each TP rank holds 4d/tp output rows) and ``W_down: 4d -> d`` (row-parallel:
the partial products are all-reduced, or reduce-scattered under sequence parallelism).
Parameters: 3 * d * 4d = 12 d^2. Gate and up are two matrices rather than one fused
``d -> 8d`` so that a TP split of the master weight gives every rank matching gate/up halves:
the TP=n projector is then numerically the TP=1 projector.

The head is used in training only; a model built for inference has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SwiGLUProjector(MegatronModule):
    """``[s, b, h] -> [s, b, h]`` (``[s/tp, b, h]`` in and out under sequence parallelism)."""

    def __init__(self, config: TransformerConfig, ffn_ratio: int = 4):
        super().__init__(config=config)
        hidden, width = config.hidden_size, ffn_ratio * config.hidden_size
        column = dict(
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            skip_bias_add=True,
        )
        self.gate = tensor_parallel.ColumnParallelLinear(hidden, width, **column)
        self.up = tensor_parallel.ColumnParallelLinear(hidden, width, **column)
        self.down = tensor_parallel.RowParallelLinear(
            width,
            hidden,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, _ = self.gate(hidden_states)
        up, _ = self.up(hidden_states)
        out, _ = self.down(F.silu(gate) * up)
        return out


class LinearProjector(MegatronModule):
    """A single ``d -> d`` matrix (ablation), column-parallel with its output gathered."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        if config.sequence_parallel:
            raise ValueError(
                "--nitp-projector linear does not support --sequence-parallel; use swiglu."
            )
        self.proj = tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            config.hidden_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=True,
            skip_bias_add=True,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, _ = self.proj(hidden_states)
        return out


def build_projector(config: TransformerConfig, kind: str, ffn_ratio: int = 4) -> torch.nn.Module:
    """The projector named by ``--nitp-projector``; ``none`` is the identity (no parameters)."""
    if kind == "swiglu":
        return SwiGLUProjector(config, ffn_ratio)
    if kind == "linear":
        return LinearProjector(config)
    if kind == "none":
        return torch.nn.Identity()
    raise ValueError(f"unknown NITP projector {kind!r}: choose swiglu, linear or none.")
