"""Speed and memory settings: what this machine can run, the checks, and what megatron-core gets.

megatron-core's fast paths need kernels that a CPU machine (and a GPU machine with plain PyPI
torch) does not have: Transformer Engine (grouped-GEMM experts, fused permutation, fused RoPE,
FP8, TE's cross entropy), Apex's ``fused_weight_gradient_mlp_cuda`` (gradient-accumulation
fusion with the local layers) or the ``grouped_gemm`` package (the local grouped experts).
Asked for where they are missing, megatron-core fails deep inside the first forward, or some
silently fall back. Here each one is checked before any process group or model exists, and
refused with the reason and the fix (:func:`validate_performance`); what this machine has is
``megatron_nitp.kernels``'s answer. ``--dry-run`` checks only
the combinations (it may run on a login node without the job's GPUs).

Two settings are three-state, as in Megatron-LM where they are on by default: gradient-
accumulation fusion and RoPE fusion are ``None`` (auto) unless ``--x`` or ``--no-x`` is given,
and auto means on where the kernel is present (:func:`resolved_fusions`).

Activation recomputation is exact for NITP (``nitp/capture.py``): the layer-k hook ignores the
re-fires of the backward pass, and the final hidden state is read at the final norm, outside any
checkpoint. One combination cannot be: a target that needs its gradient
(``--nitp-no-stop-gradient``) computed inside a full-recompute checkpoint, which runs under
``no_grad``; it is refused here (:func:`recomputed_layers`).
"""

from __future__ import annotations

from megatron_nitp import kernels
from megatron_nitp.config.schema import PerformanceConfig, RunConfig
from megatron_nitp.kernels import Kernels


class _Error(ValueError):
    """Raised as the package's ConfigError by ``resolve.validate`` (no import cycle)."""


def recomputed_layers(perf: PerformanceConfig, stage_layers: list[int]) -> set[int]:
    """Global 1-based numbers of the layers whose outputs a full-recompute checkpoint computes
    under ``no_grad`` (uniform: every layer; block: the first ``--recompute-num-layers`` of each
    pipeline stage); empty without full recompute. ``stage_layers``: layers per stage."""
    if perf.recompute_granularity != "full":
        return set()
    layers, first = set(), 1
    for count in stage_layers:
        covered = count if perf.recompute_method == "uniform" else min(
            count, perf.recompute_num_layers)
        layers.update(range(first, first + covered))
        first += count
    return layers


def _validate_recompute(config: RunConfig, stage_layers: list[int]) -> None:
    perf = config.performance
    granularity, method, n = (perf.recompute_granularity, perf.recompute_method,
                              perf.recompute_num_layers)
    if granularity is None:
        for name in ("recompute_method", "recompute_num_layers", "recompute_modules"):
            if getattr(perf, name) is not None:
                raise _Error(f"--{name.replace('_', '-')} needs --recompute-granularity "
                             "(full or selective).")
        return
    if granularity == "full":
        if method is None or n is None:
            raise _Error("--recompute-granularity full needs --recompute-method (uniform or "
                         "block) and --recompute-num-layers (e.g. --recompute-method uniform "
                         "--recompute-num-layers 1: every layer, one per checkpoint).")
        if perf.recompute_modules is not None:
            raise _Error("--recompute-modules is for --recompute-granularity selective; full "
                         "recomputes whole layers.")
        if method == "uniform" and n >= 1 and any(count % n for count in stage_layers):
            raise _Error(f"--recompute-method uniform --recompute-num-layers {n} does not divide "
                         f"the layers of each pipeline stage ({', '.join(map(str, stage_layers))})"
                         ": megatron-core checkpoints chunks of exactly that many layers. Choose "
                         "a divisor (1 always works).")
        if n < 1 or (method == "block" and n > max(stage_layers)):
            raise _Error(f"--recompute-num-layers {n} must be between 1 and the layers of a "
                         f"pipeline stage ({max(stage_layers)})"
                         + (" for --recompute-method block." if method == "block" else "."))
    else:
        if method is not None or n is not None:
            raise _Error("--recompute-method and --recompute-num-layers are for "
                         "--recompute-granularity full; selective recomputes "
                         "--recompute-modules in every layer.")
        modules = set(perf.recompute_modules or ("core_attn",))
        moe_only = modules & {"moe", "moe_act", "shared_experts"}
        if moe_only and not config.moe.num_moe_experts:
            raise _Error(f"--recompute-modules {' '.join(sorted(moe_only))} recompute(s) MoE "
                         "parts, and this model has no experts (--num-experts).")
        if "moe_act" in modules and not perf.moe_grouped_gemm:
            raise _Error("--recompute-modules moe_act needs --moe-grouped-gemm "
                         "(megatron-core recomputes the grouped experts' activation only).")
    nitp = config.nitp_config
    k = nitp.target_layer
    if (nitp.enabled and nitp.objective == "nitp" and not nitp.stop_gradient
            and k in recomputed_layers(config.performance, stage_layers)):
        index = k - 1 - sum(stage_layers[:_stage_of(k, stage_layers)])
        fix = (f"--recompute-method block --recompute-num-layers {index} (layer {k} is "
               f"layer {index} of its pipeline stage, counting from 0), " if index else "")
        raise _Error(
            f"--nitp-no-stop-gradient with --recompute-granularity full "
            f"--recompute-method {method} --recompute-num-layers {n}: the NITP target layer "
            f"k={k} is inside a recompute checkpoint, which computes it without autograd in "
            "the forward pass, so its gradient could not reach the layers below it. Keep layer "
            f"{k} out of recomputation ({fix}--recompute-granularity selective, or no "
            "recomputation), or keep the stop-gradient (the paper's default, exact under any "
            "recomputation).")


def _stage_of(layer: int, stage_layers: list[int]) -> int:
    total = 0
    for stage, count in enumerate(stage_layers):
        total += count
        if layer <= total:
            return stage
    raise ValueError(f"layer {layer} is beyond the {total} layers")


def validate_performance(config: RunConfig, stage_layers: list[int]) -> None:
    """Refuses what cannot run: combinations always, missing kernels unless ``--dry-run``.
    ``stage_layers``: transformer layers per pipeline stage (``layout.stage_layer_counts``).
    Raises ``ValueError`` (``resolve.validate`` turns it into ``ConfigError``)."""
    perf, moe, t, p = config.performance, config.moe, config.training, config.parallel
    _validate_recompute(config, stage_layers)
    if perf.overlap_param_gather and not t.use_distributed_optimizer:
        raise _Error("--overlap-param-gather needs --use-distributed-optimizer (the parameters "
                     "are all-gathered only when the optimizer states are sharded).")
    if perf.fp8 and not t.bf16:
        raise _Error("--fp8-format needs --bf16 (FP8 GEMMs keep bf16 weights and activations "
                     "around them).")
    moe_flags = [name for name, on in (
        ("--moe-grouped-gemm", perf.moe_grouped_gemm),
        ("--moe-permute-fusion", perf.moe_permute_fusion),
        ("--moe-router-enable-expert-bias", moe.moe_router_enable_expert_bias),
        ("--moe-z-loss-coeff", moe.moe_z_loss_coeff is not None),
        ("--moe-expert-capacity-factor", moe.moe_expert_capacity_factor is not None),
        ("--expert-tensor-parallel-size", p.expert_tensor_parallel_size is not None),
    ) if on]
    if moe_flags and not moe.num_moe_experts:
        raise _Error(f"{', '.join(moe_flags)}: for mixture-of-experts models only "
                     "(pretrain_moe_nitp.py, --num-experts).")
    if moe.moe_router_enable_expert_bias and moe.moe_router_score_function != "sigmoid":
        raise _Error("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
                     "(megatron-core adds the bias to sigmoid scores, as DeepSeek-V3).")
    if moe.moe_pad_expert_input_to_capacity and moe.moe_expert_capacity_factor is None:
        raise _Error("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor.")
    etp = p.expert_tensor_parallel_size
    if etp is not None and etp < 1:
        raise _Error(f"--expert-tensor-parallel-size {etp} must be >= 1.")
    if etp is not None and moe.num_moe_experts and moe.moe_ffn_hidden_size % etp:
        raise _Error(f"--moe-ffn-hidden-size {moe.moe_ffn_hidden_size} is not divisible by "
                     f"--expert-tensor-parallel-size {etp}.")
    if config.dry_run:
        return
    _validate_kernels(config)


def _validate_kernels(config: RunConfig) -> None:
    """Refuses flags whose kernels this machine lacks (``megatron_nitp.kernels``)."""
    perf = config.performance
    impl = config.parallel.transformer_impl
    k = kernels.available()
    te = k.te_layers(impl)
    te_reason = kernels.why_not_te(impl)
    needs_te = [name for name, on in (
        ("--moe-permute-fusion", perf.moe_permute_fusion),
        ("--apply-rope-fusion", perf.apply_rope_fusion is True),
        ("--fp8-format", perf.fp8 is not None),
        ("--cross-entropy-fusion-impl te",
         perf.cross_entropy_loss_fusion and perf.cross_entropy_fusion_impl == "te"),
        # output-discarding checkpoint (CheckpointWithoutOutput) reads TE's FP8 state
        ("--recompute-modules layernorm", perf.recompute_granularity == "selective"
         and "layernorm" in (perf.recompute_modules or ())),
    ) if on]
    if needs_te and not te:
        raise _Error(f"{', '.join(needs_te)} need(s) Transformer Engine on a GPU, and "
                     f"{te_reason}: drop the flag, or run in an image with TE (the "
                     "Dockerfile's NGC base).")
    if perf.attention_backend in ("flash", "fused") and not te:
        raise _Error(f"--attention-backend {perf.attention_backend} is Transformer Engine's, and "
                     f"{te_reason}: use --attention-backend sdpa (torch's flash / "
                     "memory-efficient kernels) or auto.")
    if perf.fp8 and perf.fp8_recipe == "mxfp8" and (k.compute_capability or (0, 0)) < (10, 0):
        cc = ".".join(map(str, k.compute_capability or ()))
        raise _Error(f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.0 or "
                     f"higher), and this one is {cc}: use --fp8-recipe delayed or tensorwise "
                     "on Hopper.")
    if perf.moe_grouped_gemm and not (te or (k.cuda and k.grouped_gemm)):
        raise _Error(f"--moe-grouped-gemm needs Transformer Engine (TEGroupedMLP) or the "
                     f"grouped_gemm package on a GPU, and {te_reason}"
                     + ("" if not k.cuda else " and grouped_gemm is not installed")
                     + ": drop the flag (the experts then run one after the other), or run in "
                       "an image with TE.")
    if perf.gradient_accumulation_fusion is True and not _fused_wgrad(k):
        raise _Error("--gradient-accumulation-fusion needs Apex's fused_weight_gradient_mlp_cuda "
                     "on a GPU (megatron-core's own linear layers use it: the output layer and "
                     "the NITP projector, with TE's layers too), and "
                     + ("this machine has no CUDA" if not k.cuda else "it is not importable")
                     + ": drop the flag (auto turns it on where it can run).")


def _fused_wgrad(k: Kernels) -> bool:
    """Gradient-accumulation fusion can run: Apex's kernel on a GPU. TE alone is not enough:
    the output layer and the projector are megatron-core's ColumnParallelLinear, whose
    constructor raises without Apex's kernel (the NGC image has both; pip-installed TE has
    no Apex)."""
    return k.cuda and k.apex_fused_wgrad


def resolved_fusions(perf: PerformanceConfig, transformer_impl: str) -> dict:
    """The auto settings decided for this machine: ``gradient_accumulation_fusion`` and
    ``apply_rope_fusion`` (``None`` -> on where the kernel is present)."""
    k = kernels.available()
    wgrad = perf.gradient_accumulation_fusion
    rope = perf.apply_rope_fusion
    return dict(
        gradient_accumulation_fusion=_fused_wgrad(k) if wgrad is None else wgrad,
        apply_rope_fusion=k.te_layers(transformer_impl) if rope is None
        else rope,
    )


def attention_path(perf: PerformanceConfig, transformer_impl: str) -> str:
    """Which core attention the model gets here: ``te`` (TE's, the backend chosen by
    megatron-core from ``--attention-backend``), ``sdpa`` (``models/attention.py``, in either
    spec) or ``unfused`` (the local spec's DotProductAttention)."""
    backend = perf.attention_backend
    if backend == "sdpa":
        return "sdpa"
    if kernels.available().te_layers(transformer_impl):
        return "te"
    return "sdpa" if backend == "auto" else "unfused"


def transformer_config_fields(perf: PerformanceConfig, transformer_impl: str) -> dict:
    """The TransformerConfig fields of the speed and memory settings (auto ones decided)."""
    from megatron.core.transformer.enums import AttnBackend

    # megatron-core sets TE's NVTE_*_ATTN variables from it (and asserts they never change in
    # a process): the user's choice where TE's attention runs, else its default
    attention = (AttnBackend[perf.attention_backend] if attention_path(perf, transformer_impl) == "te"
                 else AttnBackend.auto)
    fields = dict(
        **resolved_fusions(perf, transformer_impl),
        attention_backend=attention,
        cross_entropy_loss_fusion=perf.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=perf.cross_entropy_fusion_impl,
        recompute_granularity=perf.recompute_granularity,
        recompute_method=perf.recompute_method,
        recompute_num_layers=perf.recompute_num_layers,
    )
    if perf.recompute_modules is not None:
        fields["recompute_modules"] = list(perf.recompute_modules)
    if perf.fp8:
        fields.update(fp8=perf.fp8, fp8_recipe=perf.fp8_recipe)
    return fields


def ddp_config_fields(perf: PerformanceConfig) -> dict:
    """The DistributedDataParallelConfig fields (communication overlap)."""
    return dict(overlap_grad_reduce=perf.overlap_grad_reduce,
                overlap_param_gather=perf.overlap_param_gather)
