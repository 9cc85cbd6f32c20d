"""Patches for megatron-core code paths that break without Transformer Engine or Apex.

These are about missing *libraries*, not a missing GPU: a CUDA machine without TE (or without
both TE's and Apex's FusedAdam) takes the same broken paths as a CPU. `megatron_nitp.compat`
decides which of them to apply (``PATCHES``: what each needs and the megatron-core versions
that have the problem). Each patch is idempotent and imports megatron-core only when applied.
"""

from __future__ import annotations


def patch_moe_router_without_te() -> None:
    """megatron-core < 0.17: ``transformer.moe.moe_utils.RouterGatingLinearFunction`` (the MoE
    router's gating GEMM) tests ``te_general_gemm is not None``, but the name is only defined
    when Transformer Engine imports (NameError). Defined as None, the plain-torch branch runs.
    0.17 defines it as None itself."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def patch_torch_norm_sequence_parallel() -> None:
    """``transformer.torch_norm.WrappedTorchNorm`` (the local layer spec's norm, used without TE:
    see ``kernels.use_transformer_engine``) asserts ``not config.sequence_parallel``.
    Built with sequence_parallel off and its parameters tagged ``.sequence_parallel = True``,
    finalize_model_grads all-reduces their grads over TP, which is what TE's norm does under SP.
    """
    from megatron.core.transformer import torch_norm

    if getattr(torch_norm.WrappedTorchNorm, "_nitp_patched", False):
        return
    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, **kwargs)
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)
    torch_norm.WrappedTorchNorm._nitp_patched = True


def patch_distributed_optimizer_step_state() -> None:
    """Without TE's or Apex's FusedAdam, megatron-core falls back to torch's Adam, which keeps a
    per-parameter ``"step"`` tensor. Loading a distributed optimizer checkpoint
    (``DistributedOptimizer.load_parameter_state_from_fully_reshardable``, and
    ``..._dp_reshardable``) hands ``_set_main_param_and_optimizer_states`` the param, exp_avg
    and exp_avg_sq but not "step" (restored separately in ``load_state_dict``); it copies every
    tensor of the optimizer state and fails with KeyError 'step'. Copy only the tensors that
    were given."""
    import torch

    cls = _unpatched_distributed_optimizer("_nitp_step_state_patched")
    if cls is None:
        return
    original = cls._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        # no_grad: the fp32 main parameter is a leaf that requires grad, and
        # load_parameter_state_from_dp_reshardable (unlike the fully_reshardable loader) does
        # not turn autograd off around this copy. "step": the dp_reshardable state hands back
        # the fresh optimizer's own step (a non-persistent entry, 0); the checkpoint's step is
        # restored from the param groups by load_state_dict and must not be overwritten
        with torch.no_grad():
            for key, tensor in tensors.items():
                if key != "step" and isinstance(tensor, torch.Tensor):  # 0.19 skips those too
                    destination[key].copy_(tensor)

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls._nitp_step_state_patched = True


def patch_distributed_optimizer_shared_step() -> None:
    """Without TE's or Apex's FusedAdam, ``DistributedOptimizer.load_state_dict`` restores torch
    Adam's per-parameter ``"step"`` as ONE tensor shared by every parameter's state
    (``s["step"] = step`` in a loop). torch's Adam increments each parameter's step in place,
    so after a resume the shared counter advances once per parameter per iteration and the
    bias correction is wrong from the first step on: the resumed run silently diverges from the
    uninterrupted one (seen as different losses from the second iteration after the resume).
    Give every parameter its own copy after the load."""
    cls = _unpatched_distributed_optimizer("_nitp_shared_step_patched")
    if cls is None:
        return
    original = cls.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
        return result

    cls.load_state_dict = load_state_dict
    cls._nitp_shared_step_patched = True


def _unpatched_distributed_optimizer(flag: str):
    """megatron-core's ``DistributedOptimizer`` class, or None when it is missing or already
    carries the patch named by ``flag`` (patches are idempotent)."""
    try:
        from megatron.core.optimizer import distrib_optimizer
    except ImportError:
        return None
    cls = distrib_optimizer.DistributedOptimizer
    return None if getattr(cls, flag, False) else cls
