"""``--dry-run``: the plan of a job, checked without starting it.

``python pretrain_gpt_nitp.py --preset dense-3b --tensor-model-parallel-size 2 --world-size 64
--dry-run`` checks the world-dependent arithmetic (data-parallel size, micro-batches per step,
expert-parallel fit), the tokenizer and the data files where they are on this machine
(:func:`check_job`), estimates the memory of each pipeline stage per GPU (``memory_plan``, whose
docstring lists the assumptions) and prints the plan (:func:`plan_lines`). No process group is
started and no model is built: parameter counts come from the shapes (``parameters``).

Exit codes: 0 the job can start; 2 the layout is impossible (``error: ...``); 3 the memory
estimate exceeds the GPU memory (``$NITP_GPU_MEMORY_GIB``, default 80), with what to change.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from megatron_nitp.accounting.checkpoint import checkpoint_bytes, checkpoint_host_memory
from megatron_nitp.accounting.memory_plan import (GIB, StageMemory, describe_memory,
                                                  format_bytes, stage_memories)
from megatron_nitp.accounting.parallel import Layout, layout_of
from megatron_nitp.accounting.parameters import format_count, model_parameters, moe_layers
from megatron_nitp.accounting.schedules import describe_schedules, pipeline_schedules
from megatron_nitp.accounting.shape import vocab_of
from megatron_nitp.config import RunConfig, pipeline_split, resolve
from megatron_nitp.layout import routed_bytes_per_step

#: GPU memory compared with the estimate when ``$NITP_GPU_MEMORY_GIB`` is unset (80 GB H100/A100).
DEFAULT_GPU_MEMORY_GIB = 80.0
GPU_MEMORY_ENV = "NITP_GPU_MEMORY_GIB"


# --------------------------------------------------------------------------------- the checks

def world_size(args: RunConfig) -> int:
    """``--world-size``, else ``$WORLD_SIZE``, else TP x PP x CP (one model replica)."""
    if args.planned_world_size is not None:
        return args.planned_world_size
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return (args.parallel.tensor_model_parallel_size * args.parallel.pipeline_model_parallel_size
            * args.parallel.context_parallel_size)


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


def tokenizer_vocab_size(args: RunConfig) -> int | None:
    """The vocabulary of the tokenizer ``--tokenizer-type``/``--tokenizer-model`` name (built
    as training builds it, ``build_tokenizer``), None when none is named (the built-in corpus,
    or ``--mock-data`` alone: ``--vocab-size`` or the default then). Raises FileNotFoundError
    or ValueError for a missing or unreadable tokenizer."""
    data = args.data
    if data.tokenizer_model is None and data.tokenizer_type != "NullTokenizer":
        return None
    from megatron_nitp.data.tokenizer import build_tokenizer

    return build_tokenizer(data.tokenizer_type, data.tokenizer_model, args.model.vocab_size,
                           merge_file=data.merge_file).vocab_size


def check_data_files(args: RunConfig, vocab_size: int | None) -> str | None:
    """The start-of-run data checks (``datasets.check_data``: sizes, split, token ids) when the
    files are on this machine; a plan made elsewhere (a login node) says they were not
    checked. Returns the plan's data line, None without files to check (the built-in corpus,
    ``--mock-data``). Raises ValueError naming the fix."""
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_nitp.data.datasets import check_data, check_data_prefixes, requested_samples

    per_split = (args.data.train_data_path, args.data.valid_data_path, args.data.test_data_path)
    blends = [b for b in (per_split if args.data.train_data_path else (args.data.data_path,)) if b]
    if args.data.mock_data or not blends:
        return None
    prefixes = [p for blend in blends for p in get_blend_from_list(list(blend))[0]]
    try:
        check_data_prefixes(prefixes)
    except FileNotFoundError as err:
        missing = str(err).split(" (data prefix")[0]
        return f"not checked here ({missing}); the job checks it at start"
    t, log = args.training, args.logging
    samples = requested_samples(t.train_iters, t.global_batch_size, log.eval_iters,
                                log.eval_interval)
    notes = check_data(prefixes, None if args.data.train_data_path else args.data.split, samples,
                       vocab_size)
    checked = "file sizes, split" + (", token ids" if vocab_size is not None else "")
    return f"{len(prefixes)} dataset(s): {checked} checked" + "".join(f"; {n}" for n in notes)


@dataclasses.dataclass(frozen=True)
class CheckedJob:
    """A job that passed :func:`check_job`: its config resolved for its world, and what the
    checks found for the plan to print."""

    args: RunConfig
    world: int
    gpu_gib: float
    data: str | None
    """the plan's data line (:func:`check_data_files`), None without files to check"""
    missing_tokenizer: str | None
    """why the tokenizer could not be read here (planned with ``--vocab-size`` instead)"""


def check_job(args: RunConfig) -> CheckedJob:
    """Resolves ``args`` for the planned world with the tokenizer's vocabulary and checks the
    GPU memory setting and the data files. Raises ValueError or FileNotFoundError for a job
    that cannot start."""
    missing = None
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
    return CheckedJob(args=args, world=world, gpu_gib=gpu_gib, data=data,
                      missing_tokenizer=missing)


# ------------------------------------------------------------------------------- the plan lines

def _vocab_source(args: RunConfig) -> str:
    if args.model.vocab_size:
        return " (--vocab-size)"
    if args.data.tokenizer_model is not None:
        return f" (the tokenizer's, {args.data.tokenizer_model})"
    if args.data.mock_data:
        return " (--mock-data: a NullTokenizer of the default size; --vocab-size sets it)"
    return " (assumed: give --tokenizer-model or --vocab-size for the real one)"


def _model_line(args: RunConfig, layout: Layout) -> str:
    vocab, padded = vocab_of(args, layout.tp)
    m, moe = args.model, args.moe
    kind = "MoE GPT" if moe.num_moe_experts else "dense GPT"
    ffn = (f"FFN {m.ffn_hidden_size}" if not moe.num_moe_experts else
           f"dense FFN {m.ffn_hidden_size}, {sum(moe_layers(args))} MoE layers of "
           f"{moe.num_moe_experts} experts (width {moe.moe_ffn_hidden_size}) top-"
           f"{moe.moe_router_topk}" + (f" + shared {moe.moe_shared_expert_intermediate_size}"
                                       if moe.moe_shared_expert_intermediate_size else ""))
    return (f"{args.preset} ({kind}): {m.num_layers} layers, hidden {m.hidden_size}, "
            f"{ffn}, {m.num_attention_heads} heads / {m.num_query_groups} KV groups, "
            f"seq {m.seq_length}, vocab {vocab}" + _vocab_source(args) + f", padded {padded}")


def _job_lines(job: CheckedJob, layout: Layout, counts: dict) -> list[tuple[str, str]]:
    """The model, its parameters, the layout, the batch and the training settings."""
    args = job.args
    t, s = args.training, args.schedule
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    lines = [
        ("model", _model_line(args, layout)),
        ("parameters", f"total {format_count(counts['total'])}, active "
                       f"{format_count(counts['active'])}"
                       + (f"; NITP projector {format_count(counts['projector'])} (training only)"
                          if counts["projector"] else "")),
        ("layout", f"world {job.world} = TP {layout.tp} x PP {layout.pp} x CP {layout.cp} x "
                   f"DP {layout.dp}; EP {layout.ep}"
                   + (f" (expert DP {layout.expert_dp})" if args.moe.num_moe_experts else "")
                   + f"; sequence parallel {'on' if layout.sp else 'off'}"),
        ("batch", f"micro-batch {t.micro_batch_size} x DP {layout.dp} x "
                  f"{args.derived.num_microbatches} micro-batches = global batch "
                  f"{t.global_batch_size}; {t.global_batch_size * args.model.seq_length:,} "
                  f"tokens per step; {t.train_iters:,} iterations"),
        ("training", f"{precision}, lr {s.lr:g} ({s.lr_decay_style}), distributed "
                     f"optimizer {'on' if t.use_distributed_optimizer else 'off'}"),
    ]
    if job.data:
        lines.append(("data", job.data))
    if job.missing_tokenizer:
        lines.append(("tokenizer", f"{job.missing_tokenizer}: planned with --vocab-size "
                                   f"{args.model.vocab_size}; the job reads it at start"))
    return lines


def _nitp_lines(args: RunConfig, layout: Layout) -> list[tuple[str, str]]:
    """Where layer k is and what routing its target to the last stage costs."""
    if not args.nitp_config.enabled:
        return [("NITP", "off (NTP baseline)")]
    vpp = args.virtual_pipeline_model_parallel_size
    routed = routed_bytes_per_step(
        seq_length=args.model.seq_length, micro_batch_size=args.training.micro_batch_size,
        hidden_size=args.model.hidden_size, num_microbatches=args.derived.num_microbatches,
        target_layer=args.nitp_config.target_layer, num_layers=args.model.num_layers,
        tensor_parallel=layout.tp, pipeline_parallel=layout.pp, data_parallel=layout.dp,
        context_parallel=layout.cp, sequence_parallel=layout.sp,
        dtype_bytes=2 if (args.training.bf16 or args.training.fp16) else 4,
        first_stage_layers=pipeline_split(args.parallel)[0],
        last_stage_layers=pipeline_split(args.parallel)[1], virtual_pipeline=vpp)
    owner = routed["owner_stage"]
    k = args.nitp_config.target_layer
    where = f"layer {k}" if k else "embeddings"
    chunk = f" (model chunk {routed['owner_chunk']} of {vpp})" if vpp else ""
    lines = [("NITP", f"k={args.nitp_config.target_layer} ({where}), lambda "
                      f"{args.nitp_config.loss_weight:g}, on pipeline stage {owner}{chunk} of "
                      f"{layout.pp}")]
    if routed["routed"]:
        lines.append(("NITP routing", f"{format_bytes(routed['bytes_per_microbatch_per_rank'])} "
                      f"per micro-batch per sending rank, "
                      f"{format_bytes(routed['bytes_per_step_total'])} per step for the job "
                      f"(stage {owner} -> stage {layout.pp - 1}; nothing backward); send "
                      f"buffers held at once: at most "
                      f"{format_bytes(routed['peak_bytes_held_per_rank'])} per sending rank"))
    elif vpp and owner == layout.pp - 1 and routed["owner_chunk"] != vpp - 1:
        lines.append(("NITP routing", "none over the wire (the target is on an earlier chunk "
                                      "of the last stage: handed over in memory)"))
    else:
        lines.append(("NITP routing", "none (the target is on the last stage)"))
    return lines


def _memory_lines(args: RunConfig, layout: Layout, stages: list[StageMemory],
                  counts: dict) -> list[tuple[str, str]]:
    """Each stage's memory per GPU, and the checkpoint's size on disk and in host memory."""
    lines = []
    for m in stages:
        label = "memory/GPU" if layout.pp == 1 else f"memory stage {m.stage}"
        lines.append((label, describe_memory(m) + f" ({format_count(m.parameters)} parameters "
                             "on this GPU"
                             + (", NITP projector included)" if m.stage == layout.pp - 1
                                and counts["projector"] else ")")))
    host = checkpoint_host_memory(args)
    lines.append(("checkpoint", f"{format_bytes(checkpoint_bytes(args))} on disk; host memory "
                                f"per rank {format_bytes(host['save'])} at save, "
                                f"{format_bytes(host['load'])} at load (read); optimizer "
                                f"{host['format']}"
                                + (" (resumable at this TP/PP/EP/CP; "
                                   "--dist-ckpt-optim-fully-reshardable for a layout change)"
                                   if host["format"] == "dp_reshardable" else "")))
    return lines


def plan_lines(job: CheckedJob, stages: list[StageMemory]) -> list[tuple[str, str]]:
    """The plan of a checked job as (label, text) lines, the memory verdict last."""
    args = job.args
    layout = layout_of(args)
    counts = model_parameters(args)
    worst = max(stages, key=lambda m: m.total)
    verdict = "fits" if worst.total <= job.gpu_gib * GIB else "DOES NOT FIT"
    schedules = pipeline_schedules(args)
    pipeline = [("pipeline", describe_schedules(schedules))] if schedules is not None else []
    return (_job_lines(job, layout, counts) + _nitp_lines(args, layout) + pipeline
            + _memory_lines(args, layout, stages, counts)
            + [("estimate", f"{format_bytes(worst.total)} per GPU (pipeline stage "
                            f"{worst.stage}) of {job.gpu_gib:g} GiB (${GPU_MEMORY_ENV}): "
                            f"{verdict}")])


def _advice(args: RunConfig, layout: Layout, worst: StageMemory) -> list[str]:
    """What to change, largest memory term first."""
    fixes = []
    static = worst.weights + worst.gradients + worst.optimizer
    sharded = layout.dp * layout.cp > 1 or layout.expert_dp > 1
    if not args.training.use_distributed_optimizer and sharded:
        fixes.append((worst.optimizer, "add --use-distributed-optimizer (shards the optimizer "
                                       "states over the data-parallel ranks)"))
    model = ["raise --pipeline-model-parallel-size (now %d) or --tensor-model-parallel-size "
             "(now %d)" % (layout.pp, layout.tp)]
    if args.moe.num_moe_experts:
        model.append("raise --expert-model-parallel-size (now %d)" % layout.ep)
    fixes.append((static, " or ".join(model) + " to hold fewer parameters per GPU"))
    act = []
    if args.training.micro_batch_size > 1:
        act.append(f"lower --micro-batch-size (now {args.training.micro_batch_size})")
    if layout.tp > 1 and not layout.sp:
        act.append("add --sequence-parallel")
    if args.performance.recompute_granularity != "full":
        act.append("add --recompute-granularity full --recompute-method uniform "
                   "--recompute-num-layers 1 (each layer keeps only its input)")
    act.append("raise --tensor-model-parallel-size or --context-parallel-size")
    fixes.append((worst.activations, ", ".join(act) + " to shrink the activations"))
    return [text for _, text in sorted(fixes, key=lambda item: -item[0])]


# ---------------------------------------------------------------------------------- the run

def dry_run(args: RunConfig) -> int:
    """Checks the job, prints the plan; returns the exit code (0 = the job can start,
    2 = impossible layout, 3 = does not fit in GPU memory)."""
    try:
        job = check_job(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stages = stage_memories(job.args)
    print("NITP job plan (dry run: no process group started, no model built)")
    for label, text in plan_lines(job, stages):
        print(f"  {label:<15} {text}")
    sys.stdout.flush()
    worst = max(stages, key=lambda m: m.total)
    if worst.total > job.gpu_gib * GIB:
        print(f"error: the memory estimate ({format_bytes(worst.total)} on pipeline stage "
              f"{worst.stage}) exceeds the GPU memory ({job.gpu_gib:g} GiB; set "
              f"${GPU_MEMORY_ENV} for another GPU): "
              + "; or ".join(_advice(job.args, layout_of(job.args), worst)) + ".",
              file=sys.stderr)
        return 3
    return 0
