"""Builds the megatron-core model: config from flags, layer spec, NITP model, precision, DDP."""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nitp import kernels
from megatron_nitp.config import performance as config_performance
from megatron_nitp.device import device, has_cuda
from megatron_nitp.models import NITPGPTModel
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.config import pipeline_split
from megatron_nitp.config.schema import (ModelConfig, MoEConfig, ParallelConfig,
                                         PerformanceConfig, RunConfig, TrainingConfig)
from megatron_nitp.layout import target_chunk, virtual_pipeline_size
from megatron_nitp.nitp.routing import TargetRouter
from megatron_nitp.objectives import build_objectives, representation_objectives
from megatron_nitp.training.initialize import distributed_timeout
from megatron_nitp.training.timers import ROUTING_WAIT, TIMERS


def params_dtype(training: TrainingConfig) -> torch.dtype:
    """The weights' dtype of ``--bf16`` / ``--fp16`` (fp32 otherwise)."""
    if training.bf16:
        return torch.bfloat16
    if training.fp16:
        return torch.float16
    return torch.float32


def router_loss_gradient_correction(parallel: ParallelConfig) -> int:
    """The factor by which megatron-core < 0.19's router-loss gradients (load balancing and
    z-loss) are too small under per-token loss (``calculate_per_token_loss``, which NITP's
    accounting uses) with TP or CP > 1.

    ``TopKRouter.attach_and_log_load_balancing_loss`` multiplies each rank's partial aux loss
    (its own tokens' share; the shares of the TP x CP group sum to the aux loss) by the rank's
    *local* token count before ``finalize_model_grads`` divides every gradient by the global
    token count; ``apply_z_loss`` does the same with a coefficient already divided by TP x CP.
    One process multiplies by the micro-batch's whole count, so with TP x CP > 1 both
    gradients come out 1/(TP x CP) of one process's (measured: the router's Adam moments off by
    up to 80% after 3 steps at TP2+SP, EP2). Coefficients TP x CP times larger compensate
    exactly; the router divides the logged values by the same coefficients, so the reported
    losses do not change. megatron-core 0.19 multiplies by ``num_local_tokens *
    tp_cp_group.size()`` itself (0.16.1, 0.17.0 and 0.18.0 do not: their sources inspected):
    no correction there.
    """
    from packaging.version import Version

    from megatron_nitp.compat import megatron_core_version

    if megatron_core_version() >= Version("0.19.0rc0"):
        return 1
    return parallel.tensor_model_parallel_size * parallel.context_parallel_size


def moe_config(moe: MoEConfig, parallel: ParallelConfig, performance: PerformanceConfig,
               moe_layer_pattern: tuple | None) -> dict:
    """DeepSeek-V2-style MoE fields of the TransformerConfig (empty for a dense model): routed
    SwiGLU experts with top-k softmax routing, one shared expert, the load-balancing loss, and
    the per-layer dense/MoE pattern (a shallow dense stage first, ``Derived.moe_layer_pattern``)."""
    if not moe.num_moe_experts:
        return {}
    correction = router_loss_gradient_correction(parallel)
    return dict(
        num_moe_experts=moe.num_moe_experts,
        moe_router_topk=moe.moe_router_topk,
        moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size or None,
        moe_layer_freq=list(moe_layer_pattern),
        moe_router_load_balancing_type=moe.moe_router_load_balancing_type,
        moe_aux_loss_coeff=(0.0 if moe.moe_router_load_balancing_type == "none" else
                            moe.moe_aux_loss_coeff * correction),
        moe_router_score_function=moe.moe_router_score_function,
        moe_router_pre_softmax=moe.moe_router_pre_softmax,
        moe_router_enable_expert_bias=moe.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=moe.moe_router_bias_update_rate,
        moe_z_loss_coeff=(None if moe.moe_z_loss_coeff is None else
                          moe.moe_z_loss_coeff * correction),
        moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
        moe_token_drop_policy=moe.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=moe.moe_pad_expert_input_to_capacity,
        moe_token_dispatcher_type=moe.moe_token_dispatcher_type,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        moe_grouped_gemm=performance.moe_grouped_gemm,
        moe_permute_fusion=performance.moe_permute_fusion,
        moe_router_dtype="fp32",
    )


def transformer_config(model: ModelConfig, moe: MoEConfig, parallel: ParallelConfig,
                       performance: PerformanceConfig, *, dtype: torch.dtype,
                       moe_layer_pattern: tuple | None = None, document_mask: bool = False,
                       objective_fields: dict | None = None,
                       perform_initialization: bool = True) -> TransformerConfig:
    """Qwen2/Llama-style blocks: RMSNorm, SwiGLU, RoPE, GQA, no linear biases, from the model,
    MoE, layout and kernel sections of a resolved run config (:func:`run_transformer_config`
    gives the rest from the run). ``dtype``: weights and pipeline messages; ``document_mask``:
    ``--reset-attention-mask`` (no fused softmax); ``objective_fields``: what the auxiliary
    objectives ask of megatron-core (MTP's depth). ``perform_initialization=False`` leaves the
    weights' storage uninitialized (counting parameters of the paper's models without
    computing them)."""
    on_gpu = has_cuda()
    return TransformerConfig(
        **moe_config(moe, parallel, performance, moe_layer_pattern),
        **(objective_fields or {}),
        **config_performance.transformer_config_fields(performance, parallel.transformer_impl),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=parallel.decoder_last_pipeline_num_layers,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=perform_initialization,
        bias_dropout_fusion=on_gpu,
        # Apex's fused softmax under the local spec's causal mask type ignores the mask it is
        # given (an upper-triangular kernel): the per-document mask needs the unfused softmax.
        masked_softmax_fusion=kernels.fused_softmax_available() and not document_mask,
        calculate_per_token_loss=True,
        # megatron-core's default synchronizes the whole device after every batched pipeline
        # send/recv, a workaround for a race in old PyTorch (< 1.13; we need >= 2.4). Under PP
        # with NITP routing that sync also waits for the owner stage's pending target send,
        # which completes only when the last stage reaches that micro-batch's loss: 1F1B's
        # warm-up would run one micro-batch at a time. The p2p requests are still waited on.
        batch_p2p_sync=False,
        **interleaving_fields(virtual_pipeline_size(
            model.num_layers, parallel.pipeline_model_parallel_size,
            parallel.num_layers_per_virtual_pipeline_stage,
            parallel.num_virtual_stages_per_pipeline_rank)),
    )


def run_transformer_config(config: RunConfig,
                           perform_initialization: bool = True) -> TransformerConfig:
    """The TransformerConfig of a resolved run config: its sections, its precision, document
    mask, MoE layer pattern and the fields its objectives ask for."""
    objective_fields = {}
    for objective in build_objectives(config.nitp_config, config.mtp):
        objective_fields.update(objective.transformer_config())
    return transformer_config(
        config.model, config.moe, config.parallel, config.performance,
        dtype=params_dtype(config.training), moe_layer_pattern=config.derived.moe_layer_pattern,
        document_mask=config.data.reset_attention_mask, objective_fields=objective_fields,
        perform_initialization=perform_initialization)


def interleaving_fields(vpp: int | None) -> dict:
    """The TransformerConfig fields of the interleaved pipeline schedule (none without it):
    the chunks per rank, and the pipeline p2p as Megatron-LM sets it by default there
    (``--overlap-p2p-communication``: individual isend/irecv overlapped with compute, not
    batched), which also lets PP=2 run interleaved."""
    if vpp is None:
        return {}
    return dict(virtual_pipeline_model_parallel_size=vpp, overlap_p2p_comm=True,
                batch_p2p_comm=False)


def layer_spec(config: TransformerConfig, impl: str = "transformer_engine", sdpa: bool = False,
               vp_stage: int | None = None):
    """The layer spec (dense) or the per-layer block spec (MoE: dense and MoE layers by
    ``moe_layer_freq``), with TE's modules on GPU and megatron-core's local ones otherwise;
    ``sdpa``: torch's scaled_dot_product_attention as core attention (``models/attention.py``);
    ``vp_stage``: the model chunk whose layers a MoE block spec lists (interleaved schedule)."""
    spec = _base_layer_spec(config, impl, vp_stage)
    if sdpa:
        from megatron_nitp.models.attention import use_sdpa

        use_sdpa(spec)
    return spec


def _base_layer_spec(config: TransformerConfig, impl: str, vp_stage: int | None = None):
    from megatron.core.models.gpt import gpt_layer_specs

    te = kernels.use_transformer_engine(impl)
    if not te and config.sequence_parallel:
        # The local norm under SP; compat.apply() chose by what is installed and cannot see
        # --transformer-impl local on a machine that has TE (the patch is idempotent).
        from megatron_nitp.compat import te as te_compat

        te_compat.patch_torch_norm_sequence_parallel()
    if config.num_moe_experts:
        chunk = {} if vp_stage is None else {"vp_stage": vp_stage}
        return gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=te, normalization="RMSNorm", **chunk
        )
    if te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def clear_moe_tracker() -> None:
    """Empties megatron-core's module-level MoE metrics tracker: 0.19 keeps it in
    ``moe_logging`` (``get_moe_layer_wise_logging_tracker()`` there returns a copy, so clearing
    that copy cleared nothing); 0.16 to 0.18 in a dict ``moe_utils`` returns itself."""
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    else:
        destroy_moe_metrics_tracker()


def build_model(
    args,
    nitp: NITPConfig | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    perform_initialization: bool = True,
    vp_stage: int | None = None,
    shared_routers: dict | None = None,
) -> NITPGPTModel:
    """This rank's pipeline stage of the model, not yet wrapped, on ``device()``.

    On GPU megatron-core allocates its parallel linears on the current CUDA device, but the
    local spec's norms (``torch.nn.RMSNorm``) and the MoE router on the default device, the
    CPU: every caller (training, export, evaluation) gets the whole model on one device.

    ``vp_stage``: under the interleaved schedule, which of this rank's model chunks
    (:func:`build_model_chunks`); ``shared_routers``: the routers of tapped layers its chunks
    share.
    """
    config = run_transformer_config(args, perform_initialization)
    if args.moe.num_moe_experts:
        # megatron-core's router losses go to a module-level per-layer tracker sized by the
        # first model that logs; a model of another depth built later in this process (an
        # export after training, in-process tests) would index past it
        clear_moe_tracker()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    nitp = nitp if nitp is not None else args.nitp_config
    extra_chunk = {}
    if vp_stage is not None:
        extra_chunk = {"vp_stage": vp_stage, "tap_owners": tap_owners(args, nitp),
                       "shared_routers": shared_routers if shared_routers is not None else {}}
    impl = args.parallel.transformer_impl
    sdpa = config_performance.attention_path(args.performance, impl) == "sdpa"
    spec = layer_spec(config, impl, sdpa=sdpa, vp_stage=vp_stage)
    te = kernels.use_transformer_engine(impl)
    extra = {}
    for objective in build_objectives(args.nitp_config, args.mtp):
        extra.update(objective.model_kwargs(config, spec, te, vp_stage=vp_stage))
    model = NITPGPTModel(
        config,
        nitp,
        routing_timeout=distributed_timeout(),
        routing_wait_timer=partial(TIMERS.phase, ROUTING_WAIT),
        transformer_layer_spec=spec,
        **extra,
        vocab_size=args.derived.padded_vocab_size,
        max_sequence_length=args.model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=args.model.rotary_base,
        **extra_chunk,
    )
    return model.to(device())


def build_model_chunks(args, perform_initialization: bool = True) -> list[NITPGPTModel]:
    """This rank's model chunks: one per virtual stage under the interleaved schedule
    (megatron-core's ``vp_stage`` 0..V-1, each with its own pre/post-process flags, built in
    the same order on every rank: the NITP owner vote is collective), else one."""
    vpp = args.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_model(args, perform_initialization=perform_initialization)]
    # One router per routed tapped layer, shared by the chunks, made before any chunk: a chunk's
    # construction may block in megatron-core's collectives (the tied embedding's all-reduce
    # between the first and the last chunk) that the other ranks join only at a later chunk.
    last = (args.parallel.pipeline_model_parallel_size - 1, vpp - 1)
    routers = {layer: TargetRouter(owner[0], split_over_tp=not args.parallel.sequence_parallel,
                                   timeout=distributed_timeout(),
                                   wait_timer=partial(TIMERS.phase, ROUTING_WAIT), tap=layer)
               for layer, owner in sorted(tap_owners(args, args.nitp_config).items())
               if owner != last}
    return [build_model(args, perform_initialization=perform_initialization, vp_stage=v,
                        shared_routers=routers) for v in range(vpp)]


def tap_owners(args, nitp: NITPConfig) -> dict[int, tuple[int, int]]:
    """Tapped layer -> the (pipeline rank, model chunk) that builds it under the interleaved
    schedule, from the layout megatron-core builds (``layout.target_chunk``)."""
    p = args.parallel
    return {layer: target_chunk(layer, args.model.num_layers, p.pipeline_model_parallel_size,
                                args.virtual_pipeline_model_parallel_size, *pipeline_split(p))
            for o in representation_objectives(nitp) for layer in o.taps}


def as_chunks(model) -> list:
    """The model chunks of ``model``: the list itself under the interleaved schedule (a list of
    DDP-wrapped chunks, megatron-core's convention), else ``[model]``."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def last_chunk(model) -> NITPGPTModel:
    """The unwrapped chunk that computes the loss on the last pipeline rank (the only one with
    the NITP projector): the last chunk."""
    return unwrap(as_chunks(model)[-1])


def set_schedule_functions(model, finalize_model_grads_func, grad_scale_func=None) -> None:
    """The hooks megatron-core's schedules read from the first chunk's config, as Megatron-LM
    sets them: ``no_sync`` (one per chunk under interleaving), the gradient finalization, the
    fp16 loss scale and, with overlapped reduction/gather under interleaving, each chunk's
    ``start_grad_sync`` / ``start_param_sync`` so they start as its chunk's backward ends."""
    chunks = as_chunks(model)
    config = chunks[0].config

    def one_or_list(funcs):
        return funcs[0] if len(funcs) == 1 else funcs

    config.no_sync_func = one_or_list([c.no_sync for c in chunks])
    if len(chunks) > 1 and getattr(chunks[0].ddp_config, "overlap_grad_reduce", False):
        config.grad_sync_func = [c.start_grad_sync for c in chunks]
    if len(chunks) > 1 and getattr(chunks[0].ddp_config, "overlap_param_gather", False):
        config.param_sync_func = [c.start_param_sync for c in chunks]
    config.finalize_model_grads_func = finalize_model_grads_func
    config.grad_scale_func = grad_scale_func


def wrap_model(model: NITPGPTModel, args, disable_bucketing: bool = False):
    """Mixed-precision wrapper (bf16/fp16 weights, fp32 outputs) and megatron DDP with fp32
    gradient buffers, as megatron's training loop does; a list of chunks gives a list, chunk 2
    onwards without bucketing (their communication overlaps compute anyway: Megatron-LM's
    ``get_model``)."""
    if isinstance(model, (list, tuple)):
        return [wrap_model(chunk, args, disable_bucketing=i > 0) for i, chunk in enumerate(model)]
    config = model.config
    module = Float16Module(config, model) if (args.training.bf16 or args.training.fp16) else model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=args.training.use_distributed_optimizer,
        **config_performance.ddp_config_fields(args.performance),
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=module,
                                   disable_bucketing=disable_bucketing)


@contextlib.contextmanager
def params_synced(model):
    """With ``--overlap-param-gather`` the distributed optimizer's updated parameters reach
    each rank's model only in the next forward pass (DDP's forward pre-hooks start the
    all-gather layer by layer). A checkpoint or an evaluation in between would read the old
    weights: as Megatron-LM does, turn the hooks off around them, which all-gathers the
    parameters first, and back on after. A no-op without overlap."""
    hooked = [c for c in as_chunks(model) if getattr(c, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def unwrap(model: torch.nn.Module) -> NITPGPTModel:
    """The NITPGPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(model, NITPGPTModel):
        model = model.module
    return model
