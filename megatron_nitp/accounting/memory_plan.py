"""The memory plan: the memory of one GPU of each pipeline stage of a job, estimated from its
resolved config (no model built, no process group), for ``--dry-run`` (``dry_run``) and for the
first logging interval of a run, which prints it beside the measured peak (``training/memory.py``).

The memory estimate, per GPU, for each pipeline stage (the largest is reported), assumes:

- **Parameters of a rank**: its stage's layers (layers split evenly over PP), divided by TP for
  attention, dense FFN, shared expert, projector and vocabulary matrices (norms and the router are
  replicated); routed experts divided by EP and by the expert tensor-parallel size
  (``--expert-tensor-parallel-size``; megatron-core's default: equal to TP). The first stage
  holds the embedding; the last stage the final norm, the output layer (untied, or with PP > 1
  a copy of the tied embedding) and the NITP projector.
- **Per parameter**: weights 2 B in bf16/fp16 (4 B in fp32); gradients 4 B (megatron DDP keeps
  fp32 gradient buffers); optimizer 12 B in bf16/fp16 (fp32 main parameters and the two Adam
  moments; 8 B in fp32, whose weights are the main parameters). With
  ``--use-distributed-optimizer`` the optimizer bytes are divided over the data-parallel ranks
  (DP x CP for dense parameters, the expert data-parallel size world / (PP x EP x TP) for routed
  experts); weights and gradient buffers are not.
- **Activations** kept for backward, per token and layer, in the activation dtype (2 B in
  bf16/fp16), with flash/fused attention as Transformer Engine runs it on GPU (no ``s x s``
  score matrix) and no recomputation: ``4d`` (the inputs of the two norms, of QKV and of the
  FFN; divided by TP only under sequence parallelism) + ``2q + 2kv`` (Q, K, V and the attention
  output) + the FFN: ``3f`` dense SwiGLU (gate and up outputs, the product) or
  ``k (d + 3 f_e) + 3 f_s`` MoE (k permuted copies of the token, expert gate/up/product, shared
  expert), these divided by TP. This is Korthikanti et al. (2022)'s ``34 s b h`` for a GPT
  (bytes; 32 here without dropout masks) generalized to GQA and SwiGLU. Tokens per micro-batch:
  ``s / CP x b``. Under the 1F1B schedule stage ``i`` holds ``min(PP - i, micro-batches)``
  micro-batches in flight; under the interleaved schedule (V chunks per rank)
  ``(2 (PP - i - 1) + (V - 1) PP + 1) / V`` (megatron-core's warm-up, in chunks of 1/V of the
  stage; the chunks are assumed alike). With ``--recompute-granularity full`` a recomputed
  layer keeps only its input (``d``), and the backward pass rebuilds one checkpoint's layers
  at a time (one micro-batch, added once); ``selective`` drops the ``--recompute-modules``
  parts (``activation_bytes_per_token``).
- **Last stage, one micro-batch**: logits ``s b V/TP`` in the activation dtype plus their fp32
  copy for the cross entropy (``+ 4 B``); the output layer input; the NITP projector's
  ``3 r d / TP`` activations, the target ``z`` and the fp32 copies of prediction and target for
  the cosine.
- **NITP routing**: a stage that sends the layer-k target keeps each micro-batch's send buffer
  (its 1/TP share of the rows, ``ceil(s/CP/TP) x b x d``, with or without SP) until the backward
  of that micro-batch reaches it: ``min(PP - i, micro-batches)`` buffers, like the activations.
- **Runtime**: a fixed ``RUNTIME_OVERHEAD_GIB`` for the CUDA context, NCCL buffers, cuBLAS/TE
  workspaces and allocator fragmentation.

It is an estimate for choosing a layout, not a guarantee: a training run prints it beside the
measured peak after its first logging interval (:func:`planned_memory`, ``training/memory.py``).
"""

from __future__ import annotations

import dataclasses

from megatron_nitp.accounting.parallel import Layout, layout_of, stage_layers, target_stage
from megatron_nitp.accounting.parameters import moe_layers, stage_parameters
from megatron_nitp.accounting.shape import vocab_of
from megatron_nitp.config import RunConfig
from megatron_nitp.config.schema import ModelConfig
from megatron_nitp.layout import in_flight_forwards, routed_rows

GIB = 1024**3
#: CUDA context, NCCL buffers, cuBLAS/Transformer Engine workspaces, allocator fragmentation.
RUNTIME_OVERHEAD_GIB = 4.0


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Estimated memory of one GPU of a pipeline stage, in bytes."""

    stage: int
    parameters: int  # parameters held by one rank of the stage
    weights: float
    gradients: float
    optimizer: float
    activations: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime


def _widths(m: ModelConfig) -> tuple[int, int, int]:
    """(d, q, kv): hidden size, query and key/value projection widths."""
    head = m.kv_channels or m.hidden_size // m.num_attention_heads
    return m.hidden_size, m.num_attention_heads * head, m.num_query_groups * head


def activation_bytes_per_token(args: RunConfig, moe: bool, layout: Layout,
                               full_recompute: bool = False) -> float:
    """Bytes kept for backward per token by one layer on one rank (see the module docstring).

    ``full_recompute``: the layer is inside a full-recompute checkpoint, which keeps only its
    input (``d``, divided by TP under SP). Selective recomputation drops the parts named by
    ``--recompute-modules``: ``mlp`` the dense FFN's ``3f``, ``moe`` the MoE FFN, ``moe_act``
    the experts' product ``k f_e``, ``shared_experts`` the shared expert's ``3 f_s``,
    ``layernorm`` the two norm outputs (``2d`` of the ``4d``); ``core_attn`` nothing here,
    since the estimate already assumes flash attention (no ``s x s`` scores to drop)."""
    d, q, kv = _widths(args.model)
    dtype = 2 if (args.training.bf16 or args.training.fp16) else 4
    sp = layout.tp if layout.sp else 1
    if full_recompute:
        return dtype * d / sp
    recomputed = set()
    if args.performance.recompute_granularity == "selective":
        recomputed = set(args.performance.recompute_modules or ("core_attn",))
    wide = (2 if "layernorm" in recomputed else 4) * d / sp
    experts = 0.0
    if moe:
        experts = 0 if "moe" in recomputed else args.moe.moe_router_topk * (
            d + (2 if "moe_act" in recomputed else 3) * args.moe.moe_ffn_hidden_size)
        ffn = 0 if recomputed & {"moe", "shared_experts"} else 3 * (
            args.moe.moe_shared_expert_intermediate_size or 0)
    else:
        ffn = 0 if "mlp" in recomputed else 3 * args.model.ffn_hidden_size
    return dtype * (wide + (2 * q + 2 * kv + ffn) / layout.tp + experts / layout.expert_tp)


def _stage_activations(args: RunConfig, layout: Layout, stage: int, tokens: int) -> tuple:
    """(bytes one micro-batch keeps on stage ``stage``, bytes the backward pass of a
    full-recompute chunk rebuilds at once: its layers' whole activations, one chunk at a
    time)."""
    layers = stage_layers(args, layout, stage)
    pattern = moe_layers(args)[layers]
    if args.performance.recompute_granularity != "full":
        return tokens * sum(activation_bytes_per_token(args, bool(m), layout)
                            for m in pattern), 0.0
    n = args.performance.recompute_num_layers
    uniform = args.performance.recompute_method == "uniform"
    covered = len(pattern) if uniform else min(n, len(pattern))
    kept = sum(activation_bytes_per_token(args, bool(m), layout, full_recompute=i < covered)
               for i, m in enumerate(pattern))
    chunk = n if args.performance.recompute_method == "uniform" else 1
    rebuilt = max((sum(activation_bytes_per_token(args, bool(m), layout)
                       for m in pattern[i:i + chunk]) for i in range(0, covered, chunk)),
                  default=0.0)
    return tokens * kept, tokens * rebuilt


def stage_memory(args: RunConfig, layout: Layout, num_microbatches: int,
                 stage: int) -> StageMemory:
    """The memory estimate of one GPU of pipeline stage ``stage`` (module docstring)."""
    half = args.training.bf16 or args.training.fp16
    dtype = 2 if half else 4
    dense, expert = stage_parameters(args, layout, stage)
    optimizer_bytes = 12 if half else 8
    dense_shards = layout.dp * layout.cp if args.training.use_distributed_optimizer else 1
    expert_shards = layout.expert_dp if args.training.use_distributed_optimizer else 1

    d = args.model.hidden_size
    tokens = args.model.seq_length // layout.cp * args.training.micro_batch_size
    sp_split = layout.tp if layout.sp else 1
    per_micro, rebuilt = _stage_activations(args, layout, stage, tokens)
    activations = stage_in_flight(args, layout, num_microbatches, stage) * per_micro + rebuilt
    if stage == layout.pp - 1:
        padded = vocab_of(args, layout.tp)[1]
        activations += tokens * padded / layout.tp * (dtype + 4)  # logits + fp32 copy
        activations += tokens * d / sp_split * dtype  # output layer input
        if args.nitp_config.enabled:
            nitp = args.nitp_config
            ratio = nitp.projector_ffn_ratio if nitp.projector == "swiglu" else 0
            activations += tokens * (3 * ratio * d / layout.tp * dtype
                                     + d / sp_split * (dtype + 2 * 4))
        if args.mtp.mtp_num_layers:
            # per MTP depth: its layer, the [2d] input of its projection, its own logits (+ fp32
            # copy) and output-layer input, as the main head's
            per_depth = (activation_bytes_per_token(args, bool(moe_layers(args)[-1]), layout)
                         + 2 * d / sp_split * dtype + padded / layout.tp * (dtype + 4)
                         + d / sp_split * dtype)
            activations += args.mtp.mtp_num_layers * tokens * per_depth
    if (args.nitp_config.enabled and layout.pp > 1 and stage != layout.pp - 1
            and target_stage(args, layout) == stage):
        # routed send buffers: this rank's [ceil(s/cp/tp), b, d] share of z (its shard under
        # SP), held until the backward of its micro-batch reaches the stage
        rows = routed_rows(args.model.seq_length // layout.cp // sp_split, layout.tp, layout.sp)
        in_flight = min(layout.pp - stage, num_microbatches)
        activations += in_flight * rows * args.training.micro_batch_size * d * dtype
    return StageMemory(
        stage=stage,
        parameters=dense + expert,
        weights=(dense + expert) * dtype,
        gradients=(dense + expert) * 4,
        optimizer=optimizer_bytes * (dense / dense_shards + expert / expert_shards),
        activations=activations,
        runtime=RUNTIME_OVERHEAD_GIB * GIB,
    )


def stage_in_flight(args: RunConfig, layout: Layout, num_microbatches: int, stage: int) -> float:
    """Micro-batches of a whole stage's activations stage ``stage`` holds at its peak under the
    run's schedule (``layout.in_flight_forwards``: 1F1B, or interleaved with V chunks)."""
    return in_flight_forwards(layout.pp, num_microbatches, stage,
                              args.virtual_pipeline_model_parallel_size)


def stage_memories(args: RunConfig) -> list[StageMemory]:
    """The estimate of every pipeline stage of a resolved config, stage 0 first."""
    layout = layout_of(args)
    return [stage_memory(args, layout, args.derived.num_microbatches, i) for i in range(layout.pp)]


def planned_memory(args: RunConfig) -> StageMemory:
    """The per-GPU estimate ``--dry-run`` reports for a resolved config: the largest stage's.
    Arithmetic on the config only (no model, no tokenizer), so the training loop calls it to
    print the plan beside the measured peak (``training/memory.py``)."""
    return max(stage_memories(args), key=lambda m: m.total)


def memory_terms(m: StageMemory, runtime: bool = True) -> str:
    """``weights + gradients + optimizer + activations [+ runtime]`` in readable units."""
    return (f"weights {format_bytes(m.weights)} + gradients {format_bytes(m.gradients)} + "
            f"optimizer {format_bytes(m.optimizer)} + activations {format_bytes(m.activations)}"
            + (f" + runtime {format_bytes(m.runtime)}" if runtime else ""))


def describe_memory(m: StageMemory) -> str:
    """``total = weights + gradients + optimizer + activations + runtime`` in readable units."""
    return f"{format_bytes(m.total)} = {memory_terms(m)}"


def format_bytes(n: float) -> str:
    """Bytes in readable binary units: ``512 B``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
