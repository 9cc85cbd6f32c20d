"""``--dry-run``: the plan of a job, checked without starting it.

``python pretrain_gpt_nitp.py --preset dense-3b --tensor-model-parallel-size 2 --world-size 64
--dry-run`` checks the world-dependent arithmetic (data-parallel size, micro-batches per step,
expert-parallel fit), estimates the memory of each pipeline stage per GPU, and prints the plan.
No process group is started and no model is built: parameter counts come from the shapes.

Exit codes: 0 the job can start; 2 the layout is impossible (``error: ...``); 3 the memory
estimate exceeds the GPU memory (``$NITP_GPU_MEMORY_GIB``, default 80), with what to change.

The memory estimate, per GPU, for each pipeline stage (the largest is reported), assumes:

- **Parameters of a rank**: its stage's layers (layers split evenly over PP), divided by TP for
  attention, dense FFN, shared expert, projector and vocabulary matrices (norms and the router are
  replicated); routed experts divided by EP and by the expert tensor-parallel size
  (``--expert-tensor-parallel-size``; megatron-core's default: equal to TP). The first stage holds the embedding; the last stage the final norm, the
  output layer (untied, or with PP > 1 a copy of the tied embedding) and the NITP projector.
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
import os
import sys
from typing import Optional

from megatron_nitp.config import RunConfig, pipeline_split, resolve

GIB = 1024**3
#: GPU memory compared with the estimate when ``$NITP_GPU_MEMORY_GIB`` is unset (80 GB H100/A100).
DEFAULT_GPU_MEMORY_GIB = 80.0
GPU_MEMORY_ENV = "NITP_GPU_MEMORY_GIB"
#: CUDA context, NCCL buffers, cuBLAS/Transformer Engine workspaces, allocator fragmentation.
RUNTIME_OVERHEAD_GIB = 4.0


@dataclasses.dataclass(frozen=True)
class Layout:
    """The parallel layout of a job of ``world`` processes."""

    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    sp: bool
    etp: Optional[int] = None
    """--expert-tensor-parallel-size (None: TP)"""

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the routed experts (megatron-core: world / (PP x EP x ETP))."""
        return max(1, self.world // (self.pp * self.ep * self.expert_tp))


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


def world_size(args: RunConfig) -> int:
    """``--world-size``, else ``$WORLD_SIZE``, else TP x PP x CP (one model replica)."""
    if args.planned_world_size is not None:
        return args.planned_world_size
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
            * args.context_parallel_size)


def gpu_memory_gib() -> float:
    """The GPU memory to plan for: ``$NITP_GPU_MEMORY_GIB`` (GiB), default 80."""
    value = os.environ.get(GPU_MEMORY_ENV, "").strip()
    if not value:
        return DEFAULT_GPU_MEMORY_GIB
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if gib <= 0:
        raise ValueError(f"${GPU_MEMORY_ENV}={value!r} is not a positive number of GiB.")
    return gib


def _vocab(args: RunConfig, tp: int) -> tuple[int, int]:
    """The vocabulary and its padded size (a multiple of make-vocab-size-divisible-by x TP):
    the resolved one (``--vocab-size``, else the tokenizer's) of a resolved config, else
    ``--vocab-size`` or :data:`DEFAULT_VOCAB_SIZE`."""
    from megatron_nitp.config import DEFAULT_VOCAB_SIZE, padded_vocab

    if args.derived is not None:
        vocab = args.derived.vocab_size
    else:
        vocab = args.model.vocab_size or DEFAULT_VOCAB_SIZE
    return vocab, padded_vocab(vocab, args.make_vocab_size_divisible_by, tp)


def tokenizer_vocab_size(args: RunConfig) -> int | None:
    """The vocabulary of the tokenizer ``--tokenizer-type``/``--tokenizer-model`` name (built
    as training builds it, ``build_tokenizer``), None when none is named (the built-in corpus,
    or ``--mock-data`` alone: ``--vocab-size`` or the default then). Raises FileNotFoundError
    or ValueError for a missing or unreadable tokenizer."""
    if args.tokenizer_model is None and args.tokenizer_type != "NullTokenizer":
        return None
    from megatron_nitp.data.tokenizer import build_tokenizer

    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.model.vocab_size,
                           merge_file=args.merge_file).vocab_size


def _widths(args: RunConfig) -> tuple[int, int, int]:
    """(d, q, kv): hidden size, query and key/value projection widths."""
    head = args.kv_channels or args.hidden_size // args.num_attention_heads
    return args.hidden_size, args.num_attention_heads * head, args.num_query_groups * head


def _moe_pattern(args: RunConfig) -> list[int]:
    from megatron_nitp.config.resolve import moe_pattern

    return list(moe_pattern(args) or [0] * args.num_layers)


def _shape(args: RunConfig):
    from megatron_nitp.config.flops import ModelShape

    return ModelShape.from_dict({**args.flat(), "tensor_model_parallel_size": 1})


def layer_parameters(args: RunConfig, moe: bool, tp: int = 1, ep: int = 1,
                     etp: Optional[int] = None) -> tuple[int, int]:
    """``(dense, expert)`` parameters of one layer on one rank (``flops.layer_parameters``)."""
    from megatron_nitp.config.flops import layer_parameters as count

    return count(_shape(args), moe, tp, ep, etp)


def projector_parameters(args: RunConfig, tp: int = 1) -> int:
    """The NITP projector (training only): ``3 r d^2`` for SwiGLU, ``d^2`` linear, 0 none."""
    if not args.nitp:
        return 0
    from megatron_nitp.nitp.config import projector_parameters as count

    return count(args.nitp_projector, args.hidden_size, args.nitp_projector_ffn_ratio) // tp


def _stage_layers(args: RunConfig, layout: Layout, stage: int) -> slice:
    """The (0-based) layers pipeline stage ``stage`` builds, uneven splits included."""
    from megatron_nitp.layout import stage_layer_counts

    counts = stage_layer_counts(args.num_layers, layout.pp, *pipeline_split(args))
    start = sum(counts[:stage])
    return slice(start, start + counts[stage])


def _target_stage(args: RunConfig, layout: Layout) -> int:
    """The pipeline stage that holds layer k, uneven splits included."""
    from megatron_nitp.layout import target_stage

    return target_stage(args.nitp_target_layer, args.num_layers, layout.pp,
                        *pipeline_split(args))


def stage_parameters(args: RunConfig, layout: Layout, stage: int) -> tuple[int, int]:
    """``(dense, expert)`` parameters of one rank of pipeline stage ``stage``."""
    pattern = _moe_pattern(args)
    dense = expert = 0
    for moe in pattern[_stage_layers(args, layout, stage)]:
        a, b = layer_parameters(args, bool(moe), layout.tp, layout.ep, layout.expert_tp)
        dense, expert = dense + a, expert + b
    d = args.hidden_size
    vocab_rows = _vocab(args, layout.tp)[1] // layout.tp * d
    if stage == 0:
        dense += vocab_rows
    if stage == layout.pp - 1:
        dense += d + projector_parameters(args, layout.tp)  # final norm, NITP projector
        if args.untie_embeddings_and_output_weights or layout.pp > 1:
            dense += vocab_rows  # output layer (a copy of the tied embedding when PP > 1)
    return dense, expert


def model_parameters(args: RunConfig) -> dict[str, int]:
    """Total and active parameters of the model for inference (no projector), TP = 1: the
    FLOPs model's count (``flops.parameter_counts``) with this run's vocabulary."""
    from megatron_nitp.config.flops import parameter_counts

    counts = parameter_counts(_shape(args))
    return {"total": counts["total"], "active": counts["activated"],
            "projector": projector_parameters(args)}


def activation_bytes_per_token(args: RunConfig, moe: bool, layout: Layout,
                               full_recompute: bool = False) -> float:
    """Bytes kept for backward per token by one layer on one rank (see the module docstring).

    ``full_recompute``: the layer is inside a full-recompute checkpoint, which keeps only its
    input (``d``, divided by TP under SP). Selective recomputation drops the parts named by
    ``--recompute-modules``: ``mlp`` the dense FFN's ``3f``, ``moe`` the MoE FFN, ``moe_act``
    the experts' product ``k f_e``, ``shared_experts`` the shared expert's ``3 f_s``,
    ``layernorm`` the two norm outputs (``2d`` of the ``4d``); ``core_attn`` nothing here,
    since the estimate already assumes flash attention (no ``s x s`` scores to drop)."""
    d, q, kv = _widths(args)
    dtype = 2 if (args.bf16 or args.fp16) else 4
    sp = layout.tp if layout.sp else 1
    if full_recompute:
        return dtype * d / sp
    recomputed = set()
    if args.recompute_granularity == "selective":
        recomputed = set(args.recompute_modules or ("core_attn",))
    wide = (2 if "layernorm" in recomputed else 4) * d / sp
    experts = 0.0
    if moe:
        experts = 0 if "moe" in recomputed else args.moe_router_topk * (
            d + (2 if "moe_act" in recomputed else 3) * args.moe_ffn_hidden_size)
        ffn = 0 if recomputed & {"moe", "shared_experts"} else 3 * (
            args.moe_shared_expert_intermediate_size or 0)
    else:
        ffn = 0 if "mlp" in recomputed else 3 * args.ffn_hidden_size
    return dtype * (wide + (2 * q + 2 * kv + ffn) / layout.tp + experts / layout.expert_tp)


def _stage_activations(args: RunConfig, layout: Layout, stage: int, tokens: int) -> tuple:
    """(bytes one micro-batch keeps on stage ``stage``, bytes the backward pass of a
    full-recompute chunk rebuilds at once: its layers' whole activations, one chunk at a
    time)."""
    layers = _stage_layers(args, layout, stage)
    pattern = _moe_pattern(args)[layers]
    if args.recompute_granularity != "full":
        return tokens * sum(activation_bytes_per_token(args, bool(m), layout)
                            for m in pattern), 0.0
    n = args.recompute_num_layers
    covered = len(pattern) if args.recompute_method == "uniform" else min(n, len(pattern))
    kept = sum(activation_bytes_per_token(args, bool(m), layout, full_recompute=i < covered)
               for i, m in enumerate(pattern))
    chunk = n if args.recompute_method == "uniform" else 1
    rebuilt = max((sum(activation_bytes_per_token(args, bool(m), layout)
                       for m in pattern[i:i + chunk]) for i in range(0, covered, chunk)),
                  default=0.0)
    return tokens * kept, tokens * rebuilt


def stage_memory(args: RunConfig, layout: Layout, num_microbatches: int,
                 stage: int) -> StageMemory:
    """The memory estimate of one GPU of pipeline stage ``stage`` (module docstring)."""
    half = args.bf16 or args.fp16
    dtype = 2 if half else 4
    dense, expert = stage_parameters(args, layout, stage)
    optimizer_bytes = 12 if half else 8
    dense_shards = layout.dp * layout.cp if args.use_distributed_optimizer else 1
    expert_shards = layout.expert_dp if args.use_distributed_optimizer else 1

    d = args.hidden_size
    tokens = args.seq_length // layout.cp * args.micro_batch_size
    sp_split = layout.tp if layout.sp else 1
    per_micro, rebuilt = _stage_activations(args, layout, stage, tokens)
    activations = stage_in_flight(args, layout, num_microbatches, stage) * per_micro + rebuilt
    if stage == layout.pp - 1:
        padded = _vocab(args, layout.tp)[1]
        activations += tokens * padded / layout.tp * (dtype + 4)  # logits + fp32 copy
        activations += tokens * d / sp_split * dtype  # output layer input
        if args.nitp:
            ratio = args.nitp_projector_ffn_ratio if args.nitp_projector == "swiglu" else 0
            activations += tokens * (3 * ratio * d / layout.tp * dtype
                                     + d / sp_split * (dtype + 2 * 4))
    if (args.nitp and layout.pp > 1 and stage != layout.pp - 1
            and _target_stage(args, layout) == stage):
        from megatron_nitp.layout import routed_rows

        # routed send buffers: this rank's [ceil(s/cp/tp), b, d] share of z (its shard under
        # SP), held until the backward of its micro-batch reaches the stage
        rows = routed_rows(args.seq_length // layout.cp // sp_split, layout.tp, layout.sp)
        in_flight = min(layout.pp - stage, num_microbatches)
        activations += in_flight * rows * args.micro_batch_size * d * dtype
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
    from megatron_nitp.layout import in_flight_forwards

    return in_flight_forwards(layout.pp, num_microbatches, stage,
                              args.virtual_pipeline_model_parallel_size)


def pipeline_schedules(args: RunConfig) -> Optional[dict]:
    """The pipeline bubble and the activations of in-flight micro-batches on stage 0 (the
    stage that holds the most) under the plain 1F1B schedule and the interleaved one: the
    run's V chunks per rank, or 2 when the run is plain and its stages split in two (what
    interleaving would give). None without pipeline parallelism.

    Bubble: ``(p - 1) / m`` plain, ``(p - 1) / (v m)`` interleaved (idle time over ideal
    compute time, Megatron-LM's figure); in flight: megatron-core's warm-up counts
    (``layout.in_flight_forwards``), times one micro-batch's activations of the stage."""
    from megatron_nitp.layout import (chunk_layer_ranges, in_flight_forwards,
                                      pipeline_bubble_fraction)

    layout = layout_of(args)
    if layout.pp == 1:
        return None
    micro = args.num_microbatches
    vpp = args.virtual_pipeline_model_parallel_size
    if vpp is None:
        try:
            chunk_layer_ranges(args.num_layers, layout.pp, 2, *pipeline_split(args))
            vpp, hypothetical = 2, True
        except ValueError:
            hypothetical = True
    else:
        hypothetical = False
    tokens = args.seq_length // layout.cp * args.micro_batch_size
    per_micro = _stage_activations(args, layout, 0, tokens)[0]
    figures = {"pipeline": layout.pp, "microbatches": micro, "chunks": vpp,
               "hypothetical": hypothetical,
               "plain_bubble": pipeline_bubble_fraction(layout.pp, micro),
               "plain_in_flight": in_flight_forwards(layout.pp, micro, 0),
               "stage0_microbatch_bytes": per_micro}
    figures["plain_in_flight_bytes"] = figures["plain_in_flight"] * per_micro
    if vpp is not None:
        figures["interleaved_bubble"] = pipeline_bubble_fraction(layout.pp, micro, vpp)
        figures["interleaved_in_flight"] = in_flight_forwards(layout.pp, micro, 0, vpp)
        figures["interleaved_in_flight_bytes"] = figures["interleaved_in_flight"] * per_micro
    return figures


def describe_schedules(figures: dict) -> str:
    """One line of :func:`pipeline_schedules`' figures for the plan."""
    p, m, v = figures["pipeline"], figures["microbatches"], figures["chunks"]
    plain = (f"1F1B bubble (p-1)/m = {p - 1}/{m} = {figures['plain_bubble']:.1%}, in flight "
             f"on stage 0 {figures['plain_in_flight']:g} micro-batches "
             f"({_bytes(figures['plain_in_flight_bytes'])})")
    if v is None:
        return plain + "; interleaved: the stages' layers do not split into chunks"
    interleaved = (f"interleaved V={v}: bubble (p-1)/(v m) = {p - 1}/{v * m} = "
                   f"{figures['interleaved_bubble']:.1%}, in flight on stage 0 "
                   f"{figures['interleaved_in_flight']:g} micro-batches "
                   f"({_bytes(figures['interleaved_in_flight_bytes'])})")
    if figures["hypothetical"]:
        return (f"{plain} (this run); {interleaved} with "
                f"--num-virtual-stages-per-pipeline-rank {v}")
    return f"{interleaved} (this run); {plain} without interleaving"


def layout_of(args: RunConfig) -> Layout:
    """The layout of a resolved config (``config.resolve``: world and data-parallel size
    known)."""
    return Layout(world=args.world_size, tp=args.tensor_model_parallel_size,
                  pp=args.pipeline_model_parallel_size, cp=args.context_parallel_size,
                  ep=args.expert_model_parallel_size, dp=args.data_parallel_size,
                  sp=bool(args.sequence_parallel), etp=args.expert_tensor_parallel_size)


def stage_memories(args: RunConfig) -> list[StageMemory]:
    """The estimate of every pipeline stage of a resolved config, stage 0 first."""
    layout = layout_of(args)
    return [stage_memory(args, layout, args.num_microbatches, i) for i in range(layout.pp)]


def planned_memory(args: RunConfig) -> StageMemory:
    """The per-GPU estimate ``--dry-run`` reports for a resolved config: the largest stage's.
    Arithmetic on the config only (no model, no tokenizer), so the training loop calls it to
    print the plan beside the measured peak (``training/memory.py``)."""
    return max(stage_memories(args), key=lambda m: m.total)


def checkpoint_format(args: RunConfig) -> str:
    """The optimizer format a save of this run writes (``checkpointing.optimizer_format``):
    ``dp_reshardable`` (distributed optimizer, the default), ``fully_reshardable``
    (``--dist-ckpt-optim-fully-reshardable``) or ``model_space`` (the plain optimizer)."""
    if not args.use_distributed_optimizer:
        return "model_space"
    return "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"


def _checkpoint_bytes_per_parameter(args: RunConfig) -> tuple[int, int]:
    """(weights, optimizer) bytes per parameter in a checkpoint: weights in the training dtype;
    the optimizer's fp32 main parameters and two Adam moments (12 B), except the plain
    optimizer in fp32, whose main parameters are the weights (8 B)."""
    half = args.bf16 or args.fp16
    return (2 if half else 4), (12 if half or args.use_distributed_optimizer else 8)


def checkpoint_bytes(args: RunConfig) -> int:
    """Bytes of one checkpoint of a resolved config on disk, all ranks' files together: every
    parameter once (NITP projector included; a tied output layer is not written twice) in the
    training dtype plus its optimizer state (:func:`_checkpoint_bytes_per_parameter`). The same
    in every format; the small files (RNG states, scheduler, metadata, manifest) and the
    distributed optimizer's alignment padding are left out. The start check of ``--save``'s
    free space (``checkpointing.check_save_folder``) compares it with the disk."""
    counts = model_parameters(args)
    weights, optimizer = _checkpoint_bytes_per_parameter(args)
    return (counts["total"] + counts["projector"]) * (weights + optimizer)


def checkpoint_host_memory(args: RunConfig) -> dict[str, float]:
    """Host memory per rank (bytes, the largest pipeline stage) of a resolved config's
    checkpoint in the format it writes (:func:`checkpoint_format`):

    - ``save``: the state a rank stages for its write - its share of the weights (the
      data-parallel replicas split the replicated tensors: fully parallel save) and of the
      optimizer state: its own shard with ``dp_reshardable``, the whole data-parallel group's
      with ``fully_reshardable`` (gathered on every rank), 1/DP of the replicated state with the
      plain optimizer;
    - ``load``: what a rank reads and holds at load (= its bytes read): its model-parallel
      part's whole weights (every replica loads them) plus its optimizer shard
      (``dp_reshardable``) or its data-parallel group's whole optimizer state (the others).

    So with ``dp_reshardable`` both fall as DP grows, with ``fully_reshardable`` the optimizer
    term does not (about 12 B x the rank's model-parallel parameters)."""
    layout = layout_of(args)
    fmt = checkpoint_format(args)
    weights, optimizer = _checkpoint_bytes_per_parameter(args)
    dense_dp, expert_dp = layout.dp * layout.cp, layout.expert_dp
    save = load = 0.0
    for stage in range(layout.pp):
        dense, expert = stage_parameters(args, layout, stage)
        whole = dense + expert
        share = dense / dense_dp + expert / expert_dp
        opt_save = optimizer * (whole if fmt == "fully_reshardable" else share)
        opt_load = optimizer * (share if fmt == "dp_reshardable" else whole)
        save = max(save, weights * share + opt_save)
        load = max(load, weights * whole + opt_load)
    return {"format": fmt, "save": save, "load": load}


def memory_terms(m: StageMemory, runtime: bool = True) -> str:
    """``weights + gradients + optimizer + activations [+ runtime]`` in readable units."""
    return (f"weights {_bytes(m.weights)} + gradients {_bytes(m.gradients)} + optimizer "
            f"{_bytes(m.optimizer)} + activations {_bytes(m.activations)}"
            + (f" + runtime {_bytes(m.runtime)}" if runtime else ""))


def describe_memory(m: StageMemory) -> str:
    """``total = weights + gradients + optimizer + activations + runtime`` in readable units."""
    return f"{_bytes(m.total)} = {memory_terms(m)}"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _advice(args: RunConfig, layout: Layout, worst: StageMemory) -> list[str]:
    """What to change, largest memory term first."""
    fixes = []
    static = worst.weights + worst.gradients + worst.optimizer
    if not args.use_distributed_optimizer and (layout.dp * layout.cp > 1 or layout.expert_dp > 1):
        fixes.append((worst.optimizer, "add --use-distributed-optimizer (shards the optimizer "
                                       "states over the data-parallel ranks)"))
    model = ["raise --pipeline-model-parallel-size (now %d) or --tensor-model-parallel-size "
             "(now %d)" % (layout.pp, layout.tp)]
    if args.num_moe_experts:
        model.append("raise --expert-model-parallel-size (now %d)" % layout.ep)
    fixes.append((static, " or ".join(model) + " to hold fewer parameters per GPU"))
    act = []
    if args.micro_batch_size > 1:
        act.append(f"lower --micro-batch-size (now {args.micro_batch_size})")
    if layout.tp > 1 and not layout.sp:
        act.append("add --sequence-parallel")
    if args.recompute_granularity != "full":
        act.append("add --recompute-granularity full --recompute-method uniform "
                   "--recompute-num-layers 1 (each layer keeps only its input)")
    act.append("raise --tensor-model-parallel-size or --context-parallel-size")
    fixes.append((worst.activations, ", ".join(act) + " to shrink the activations"))
    return [text for _, text in sorted(fixes, key=lambda item: -item[0])]


def _vocab_source(args: RunConfig) -> str:
    if args.model.vocab_size:
        return " (--vocab-size)"
    if args.tokenizer_model is not None:
        return f" (the tokenizer's, {args.tokenizer_model})"
    if args.mock_data:
        return " (--mock-data: a NullTokenizer of the default size; --vocab-size sets it)"
    return " (assumed: give --tokenizer-model or --vocab-size for the real one)"


def check_data_files(args: RunConfig, vocab_size: int | None) -> str | None:
    """The start-of-run data checks (``datasets.check_data``: sizes, split, token ids) when the
    files are on this machine; a plan made elsewhere (a login node) says they were not
    checked. Returns the plan's data line, None without files to check (the built-in corpus,
    ``--mock-data``). Raises ValueError naming the fix."""
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_nitp.data.datasets import check_data, check_data_prefixes, requested_samples

    per_split = (args.train_data_path, args.valid_data_path, args.test_data_path)
    blends = [b for b in (per_split if args.train_data_path else (args.data_path,)) if b]
    if args.mock_data or not blends:
        return None
    prefixes = [p for blend in blends for p in get_blend_from_list(list(blend))[0]]
    try:
        check_data_prefixes(prefixes)
    except FileNotFoundError as err:
        missing = str(err).split(" (data prefix")[0]
        return f"not checked here ({missing}); the job checks it at start"
    samples = requested_samples(args.train_iters, args.global_batch_size, args.eval_iters,
                                args.eval_interval)
    notes = check_data(prefixes, None if args.train_data_path else args.split, samples,
                       vocab_size)
    checked = "file sizes, split" + (", token ids" if vocab_size is not None else "")
    return f"{len(prefixes)} dataset(s): {checked} checked" + "".join(f"; {n}" for n in notes)


def dry_run(args: RunConfig) -> int:
    """Checks the layout, prints the plan; returns the exit code (0 = the job can start,
    2 = impossible layout, 3 = does not fit in GPU memory)."""
    from megatron_nitp.layout import routed_bytes_per_step

    missing = None
    try:
        world = world_size(args)
        try:
            tokenizer_vocab = tokenizer_vocab_size(args)
        except FileNotFoundError as err:
            if not args.model.vocab_size:
                raise
            # planning on another machine (a laptop, a login node) than the job's: the
            # vocabulary is known from --vocab-size or the preset, say what the job will need
            tokenizer_vocab, missing = None, str(err)
        args = resolve(args, world, tokenizer_vocab)
        gpu_gib = gpu_memory_gib()
        data = check_data_files(args, tokenizer_vocab)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layout = layout_of(args)
    micro = args.num_microbatches
    counts = model_parameters(args)
    vocab, padded = _vocab(args, layout.tp)
    stages = stage_memories(args)
    worst = max(stages, key=lambda m: m.total)
    fits = worst.total <= gpu_gib * GIB

    kind = "MoE GPT" if args.num_moe_experts else "dense GPT"
    ffn = (f"FFN {args.ffn_hidden_size}" if not args.num_moe_experts else
           f"dense FFN {args.ffn_hidden_size}, {sum(_moe_pattern(args))} MoE layers of "
           f"{args.num_moe_experts} experts (width {args.moe_ffn_hidden_size}) top-"
           f"{args.moe_router_topk}" + (f" + shared {args.moe_shared_expert_intermediate_size}"
                                        if args.moe_shared_expert_intermediate_size else ""))
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    lines = [
        "NITP job plan (dry run: no process group started, no model built)",
        ("model", f"{args.preset} ({kind}): {args.num_layers} layers, hidden {args.hidden_size}, "
                  f"{ffn}, {args.num_attention_heads} heads / {args.num_query_groups} KV groups, "
                  f"seq {args.seq_length}, vocab {vocab}" + _vocab_source(args)
                  + f", padded {padded}"),
        ("parameters", f"total {_count(counts['total'])}, active {_count(counts['active'])}"
                       + (f"; NITP projector {_count(counts['projector'])} (training only)"
                          if counts["projector"] else "")),
        ("layout", f"world {world} = TP {layout.tp} x PP {layout.pp} x CP {layout.cp} x "
                   f"DP {layout.dp}; EP {layout.ep}"
                   + (f" (expert DP {layout.expert_dp})" if args.num_moe_experts else "")
                   + f"; sequence parallel {'on' if layout.sp else 'off'}"),
        ("batch", f"micro-batch {args.micro_batch_size} x DP {layout.dp} x {micro} micro-batches "
                  f"= global batch {args.global_batch_size}; "
                  f"{args.global_batch_size * args.seq_length:,} tokens per step; "
                  f"{args.train_iters:,} iterations"),
        ("training", f"{precision}, lr {args.lr:g} ({args.lr_decay_style}), distributed "
                     f"optimizer {'on' if args.use_distributed_optimizer else 'off'}"),
    ]
    if data:
        lines.append(("data", data))
    if missing:
        lines.append(("tokenizer", f"{missing}: planned with --vocab-size "
                                   f"{args.model.vocab_size}; the job reads it at start"))
    if args.nitp:
        owner = _target_stage(args, layout)
        routed = routed_bytes_per_step(
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            hidden_size=args.hidden_size, num_microbatches=micro,
            target_layer=args.nitp_target_layer, num_layers=args.num_layers,
            tensor_parallel=layout.tp, pipeline_parallel=layout.pp, data_parallel=layout.dp,
            context_parallel=layout.cp, sequence_parallel=layout.sp,
            dtype_bytes=2 if (args.bf16 or args.fp16) else 4,
            first_stage_layers=pipeline_split(args)[0],
            last_stage_layers=pipeline_split(args)[1])
        where = (f"layer {args.nitp_target_layer}" if args.nitp_target_layer else "embeddings")
        lines.append(("NITP", f"k={args.nitp_target_layer} ({where}), lambda "
                              f"{args.nitp_loss_weight:g}, on pipeline stage {owner} of "
                              f"{layout.pp}"))
        if routed["routed"]:
            lines.append(("NITP routing", f"{_bytes(routed['bytes_per_microbatch_per_rank'])} per "
                          f"micro-batch per sending rank, {_bytes(routed['bytes_per_step_total'])} "
                          f"per step for the job (stage {owner} -> stage {layout.pp - 1}; "
                          f"nothing backward); send buffers held at once: at most "
                          f"{_bytes(routed['peak_bytes_held_per_rank'])} per sending rank"))
        else:
            lines.append(("NITP routing", "none (the target is on the last stage)"))
    else:
        lines.append(("NITP", "off (NTP baseline)"))
    schedules = pipeline_schedules(args)
    if schedules is not None:
        lines.append(("pipeline", describe_schedules(schedules)))
    for m in stages:
        label = "memory/GPU" if layout.pp == 1 else f"memory stage {m.stage}"
        lines.append((label, describe_memory(m) + f" ({_count(m.parameters)} parameters on "
                             "this GPU"
                             + (", NITP projector included)" if m.stage == layout.pp - 1
                                and counts["projector"] else ")")))
    host = checkpoint_host_memory(args)
    lines.append(("checkpoint", f"{_bytes(checkpoint_bytes(args))} on disk; host memory per "
                                f"rank {_bytes(host['save'])} at save, {_bytes(host['load'])} "
                                f"at load (read); optimizer {host['format']}"
                                + (" (resumable at this TP/PP/EP/CP; "
                                   "--dist-ckpt-optim-fully-reshardable for a layout change)"
                                   if host["format"] == "dp_reshardable" else "")))
    verdict = "fits" if fits else "DOES NOT FIT"
    lines.append(("estimate", f"{_bytes(worst.total)} per GPU (pipeline stage {worst.stage}) of "
                              f"{gpu_gib:g} GiB (${GPU_MEMORY_ENV}): {verdict}"))
    print(lines[0])
    for label, text in lines[1:]:
        print(f"  {label:<15} {text}")
    sys.stdout.flush()
    if not fits:
        print(f"error: the memory estimate ({_bytes(worst.total)} on pipeline stage {worst.stage}) "
              f"exceeds the GPU memory ({gpu_gib:g} GiB; set ${GPU_MEMORY_ENV} for another GPU): "
              + "; or ".join(_advice(args, layout, worst)) + ".", file=sys.stderr)
        return 3
    return 0
