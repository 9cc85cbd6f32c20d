"""Capture of the layer-k output (and of the final hidden state) inside the forward pass: no
second forward.

A forward hook on the module that produces the target keeps its output for the loss computed
at the end of the same forward. k = 0 hooks the embedding; k >= 1 hooks the transformer layer
whose global 1-based ``layer_number`` is k (a ``TransformerLayer`` returns ``(hidden, context)``;
the hidden state ``[s, b, h]`` is kept). On a pipeline stage that does not own layer k the
capture holds nothing (the target is routed from the owning stage).

Activation recomputation (megatron-core's ``recompute_granularity='full'``) runs the
checkpointed layers under ``no_grad`` in the forward and runs them again inside the backward
pass. Hence:

* a hook that fires during the backward pass is a recomputation and is ignored (the state of
  the forward stays, and nothing is left behind after the backward);
* a layer's output captured inside a checkpointed chunk has no autograd graph. That is right
  for the detached target (the paper's stop-gradient) but not for a capture that must carry a
  gradient: the final hidden state is therefore taken at ``decoder.final_layernorm``, which runs
  outside any checkpoint (its input is the last layer's output, its output the final-norm
  state), and a layer-k target without stop-gradient that comes out without a graph is an
  error (``ActivationCapture.needs_graph``), never a silent loss of its gradient.

CUDA graphs replay kernels without running Python hooks: NITP refuses them (models/gpt.py).
"""

from __future__ import annotations

from typing import Optional

import torch


def in_backward_pass() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (a module's
    forward running now is activation recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class ActivationCapture:
    """Keeps the ``[s, b, h]`` output (``pre=True``: input) of one module for the current
    forward pass."""

    def __init__(self, module: Optional[torch.nn.Module], detach: bool = True, pre: bool = False):
        self.detach = detach
        self.state: Optional[torch.Tensor] = None
        self.grad_enabled = True  # autograd mode when ``state`` was captured
        self.fires_in_backward = 0  # recomputation re-fires seen (and ignored)
        if module is None:
            self.handle = None
        elif pre:
            self.handle = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            self.handle = module.register_forward_hook(self._hook)

    @property
    def owns_target(self) -> bool:
        """Whether the hooked module lives on this pipeline stage."""
        return self.handle is not None

    def _hook(self, module, args, output):
        self._keep(output[0] if isinstance(output, tuple) else output)

    def _pre_hook(self, module, args, kwargs):
        self._keep(args[0] if args else next(iter(kwargs.values())))

    def _keep(self, hidden: torch.Tensor) -> None:
        if in_backward_pass():
            self.fires_in_backward += 1
            return
        self.state = hidden.detach() if self.detach else hidden
        self.grad_enabled = torch.is_grad_enabled()

    def needs_graph(self, forward_grad_enabled: bool) -> bool:
        """True when the state should carry a gradient but was computed without autograd: the
        capture is not detached, the forward records a graph, and the hooked module ran under
        ``no_grad`` (inside an activation-recomputation checkpoint)."""
        return (self.state is not None and not self.detach and forward_grad_enabled
                and not self.grad_enabled)

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


def recompute_error(model: torch.nn.Module, target_layer: int) -> RuntimeError:
    """The error for a layer-k target that needs a gradient (``--nitp-no-stop-gradient``) but
    was computed inside an activation-recomputation checkpoint."""
    config = model.config
    index = next((i for i, layer in enumerate(model.decoder.layers)
                  if layer.layer_number == target_layer), None)
    block = (f"recompute_method='block' with recompute_num_layers <= {index} (layer {target_layer} "
             f"is layer {index} of its pipeline stage, counting from 0), or "
             if index else "")
    return RuntimeError(
        f"NITP target layer k={target_layer} was computed without autograd although "
        "--nitp-no-stop-gradient needs its gradient: activation recomputation covers layer "
        f"{target_layer} (recompute_granularity={config.recompute_granularity!r}, "
        f"recompute_method={config.recompute_method!r}, "
        f"recompute_num_layers={config.recompute_num_layers}) runs it under no_grad in the "
        "forward and again in the backward pass, where its output no longer reaches the loss; "
        "training would silently get no gradient through the target. Fix: keep layer "
        f"{target_layer} out of recomputation ({block}recompute_granularity='selective' or no "
        "recomputation), or keep the stop-gradient (the paper's default, which recomputation "
        "does not affect)."
    )
