"""Capture of the layer-k output inside the forward pass: no second forward.

A forward hook on the module that produces the target keeps its output for the loss computed
at the end of the same forward. k = 0 hooks the embedding; k >= 1 hooks the transformer layer
whose global 1-based ``layer_number`` is k (a ``TransformerLayer`` returns ``(hidden, context)``;
the hidden state ``[s, b, h]`` is kept). On a pipeline stage that does not own layer k the
capture holds nothing (the target is routed from the owning stage).
"""

from __future__ import annotations

from typing import Optional

import torch


class ActivationCapture:
    """Keeps the ``[s, b, h]`` output of one module for the current forward pass."""

    def __init__(self, module: Optional[torch.nn.Module], detach: bool = True):
        self.detach = detach
        self.state: Optional[torch.Tensor] = None
        self.handle = module.register_forward_hook(self._hook) if module is not None else None

    @property
    def owns_target(self) -> bool:
        """Whether the hooked module lives on this pipeline stage."""
        return self.handle is not None

    def _hook(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.state = hidden.detach() if self.detach else hidden

    def pop(self) -> Optional[torch.Tensor]:
        """Returns the captured state and forgets it (so no stale target survives a step)."""
        state, self.state = self.state, None
        return state


def find_target_module(model: torch.nn.Module, target_layer: int) -> Optional[torch.nn.Module]:
    """The module whose output is the layer-k state, if it is on this pipeline stage.

    Args:
        model: a megatron-core ``GPTModel`` (one pipeline stage of it).
        target_layer: k; 0 = embeddings.
    """
    if target_layer == 0:
        return getattr(model, "embedding", None) if model.pre_process else None
    for layer in model.decoder.layers:
        if layer.layer_number == target_layer:
            return layer
    return None
