"""Pipeline layout arithmetic: which layers each stage holds, where layer k lives, and what
routing layer k's target to the last stage costs.

Pure functions of the settings (no process group, no model): the checks of a configuration
(``config/resolve.py``, ``config/performance.py``), the ``--dry-run`` plan, the tools and the
router itself (``nitp/routing.py``, its row shares) all compute them here, so every one of them
agrees with the others and with what megatron-core builds.
"""

from __future__ import annotations


def stage_layer_counts(
    num_layers: int, pipeline_size: int, first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> list[int]:
    """Transformer layers on each pipeline stage, as megatron-core builds them.

    Even split by default; ``first_stage_layers`` / ``last_stage_layers`` are megatron-core's
    ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` (flags
    ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``), the
    other stages sharing the rest evenly. The counts come from megatron-core's own
    ``get_num_layers_to_build`` (the function TransformerBlock calls); the checks that
    TransformerConfig would make are made here first, as ValueErrors naming the numbers.
    """
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if pipeline_size < 1 or num_layers < 1:
        raise ValueError(f"{num_layers} layers over {pipeline_size} pipeline stages")
    if uneven and pipeline_size == 1:
        raise ValueError("first/last pipeline stage layer counts need pipeline parallelism "
                         "(--pipeline-model-parallel-size > 1)")
    middle_layers, middle_stages = num_layers, pipeline_size
    for name, count in (("first", first_stage_layers), ("last", last_stage_layers)):
        if count is not None:
            if count <= 0:
                raise ValueError(f"the {name} pipeline stage must hold at least one layer "
                                 f"(got {count})")
            middle_layers -= count
            middle_stages -= 1
    if middle_layers < 0 or bool(middle_layers) != bool(middle_stages) or (
            middle_stages and middle_layers % middle_stages):
        what = ("the other stages" if uneven else "the stages")
        raise ValueError(f"{num_layers} layers do not split over {pipeline_size} pipeline stages "
                         f"(first stage {first_stage_layers}, last stage {last_stage_layers}): "
                         f"{middle_layers} layers left for {middle_stages} of {what}, which must "
                         "divide them evenly")
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    config = SimpleNamespace(  # the fields get_num_layers_to_build reads (0.16 and 0.19)
        num_layers=num_layers, pipeline_model_parallel_size=pipeline_size,
        num_layers_in_first_pipeline_stage=first_stage_layers,
        num_layers_in_last_pipeline_stage=last_stage_layers,
        pipeline_model_parallel_layout=None, virtual_pipeline_model_parallel_size=None,
        account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False,
    )
    return [get_num_layers_to_build(config, pp_rank=rank) for rank in range(pipeline_size)]


def target_stage(
    target_layer: int, num_layers: int, pipeline_size: int, first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> int:
    """Pipeline stage that owns layer k (k = 0 is the embedding, on the first stage), for the
    per-stage layer counts of ``stage_layer_counts``. The model itself decides from what it
    built (``nitp.routing.owner_stage``); this pure version serves plans, validation and
    tools."""
    if target_layer == 0:
        return 0
    if not 1 <= target_layer <= num_layers:
        raise ValueError(f"target layer {target_layer} is not one of the {num_layers} layers")
    last = 0
    for stage, count in enumerate(
            stage_layer_counts(num_layers, pipeline_size, first_stage_layers, last_stage_layers)):
        last += count
        if target_layer <= last:
            return stage
    raise AssertionError("unreachable: the stage counts sum to num_layers")


def routed_rows(rows: int, tensor_parallel: int, sequence_parallel: bool) -> int:
    """Rows of the ``[rows, b, h]`` target one owning-stage rank sends per micro-batch.

    ``rows``: the rank's layer-k rows (``s/cp``, or ``s/cp/tp`` under sequence parallelism).
    Without SP the TP ranks hold the same rows and each sends ``ceil(rows / tp)`` of them (the
    last share zero-padded when TP does not divide them, so the last stage's all-gather gets
    equal parts); under SP each sends its whole shard.
    """
    if sequence_parallel or tensor_parallel == 1:
        return rows
    return -(-rows // tensor_parallel)


def routed_bytes_per_step(
    *, seq_length: int, micro_batch_size: int, hidden_size: int, num_microbatches: int,
    target_layer: int, num_layers: int, tensor_parallel: int = 1, pipeline_parallel: int = 1,
    data_parallel: int = 1, context_parallel: int = 1, sequence_parallel: bool = False,
    dtype_bytes: int = 2, first_stage_layers: int | None = None,
    last_stage_layers: int | None = None, virtual_pipeline: int | None = None,
) -> dict:
    """Bytes NITP adds to pipeline communication, per micro-batch and per optimizer step, and
    the send buffers the owning stage holds at once.

    One ``[ceil(s/cp/tp), b, h]`` target share per micro-batch goes from every rank of the
    owning stage (each TP rank its 1/TP of the rows, or its own shard under SP; each CP rank
    its chunk) to its counterpart on the last stage (``routed_rows``). Nothing is sent
    backward. Zero when layer k is on the last stage. Returned: per sending rank and
    micro-batch, per sending rank and step, the whole job's total per step (all DP replicas),
    and ``peak_bytes_held_per_rank``: the most bytes a sending rank's pending sends hold at
    once under 1F1B, ``min(PP - owner, M)`` micro-batches (a send is released once the
    backward of its micro-batch reaches the owner; ``nitp.routing.TargetRouter``).
    ``first_stage_layers`` / ``last_stage_layers``: an uneven pipeline split
    (``stage_layer_counts``). ``virtual_pipeline``: the interleaved schedule's chunks per rank:
    the owner is a (rank, chunk) (``owner_chunk``); nothing travels when it is a chunk of the
    last rank (handed over in memory); the peak held is bounded by the rank's warm-up count of
    chunk forwards, ``min(2 (PP - owner - 1) + (V - 1) PP + 1, M)``.
    """
    if virtual_pipeline:
        owner, chunk = target_chunk(target_layer, num_layers, pipeline_parallel,
                                    virtual_pipeline, first_stage_layers, last_stage_layers)
        in_flight = min(2 * (pipeline_parallel - owner - 1)
                        + (virtual_pipeline - 1) * pipeline_parallel + 1, num_microbatches)
    else:
        owner = target_stage(target_layer, num_layers, pipeline_parallel, first_stage_layers,
                             last_stage_layers)
        chunk, in_flight = 0, min(pipeline_parallel - owner, num_microbatches)
    routed = pipeline_parallel > 1 and owner != pipeline_parallel - 1
    rows = seq_length // context_parallel // (tensor_parallel if sequence_parallel else 1)
    share = routed_rows(rows, tensor_parallel, sequence_parallel)
    per_micro = share * micro_batch_size * hidden_size * dtype_bytes if routed else 0
    senders = tensor_parallel * context_parallel * data_parallel
    pipeline_activation = rows * micro_batch_size * hidden_size * dtype_bytes
    return {
        "owner_stage": owner,
        "owner_chunk": chunk,
        "routed": routed,
        "bytes_per_microbatch_per_rank": per_micro,
        "bytes_per_step_per_rank": per_micro * num_microbatches,
        "bytes_per_step_total": per_micro * num_microbatches * senders,
        "peak_bytes_held_per_rank": per_micro * in_flight,
        "backward_bytes": 0,
        # megatron-core's own traffic, for scale: forward activation + backward gradient at each
        # of the PP-1 stage boundaries, per micro-batch, per rank.
        "pipeline_bytes_per_step_per_rank": 2 * (pipeline_parallel - 1) * pipeline_activation
        * num_microbatches,
    }


def virtual_pipeline_size(num_layers: int | None, pipeline_size: int,
                          layers_per_virtual_stage: int | None = None,
                          virtual_stages_per_rank: int | None = None) -> int | None:
    """Model chunks per pipeline rank of the interleaved schedule (megatron-core's
    ``virtual_pipeline_model_parallel_size``), None for the plain schedule. As Megatron-LM's
    ``validate_args``: ``--num-virtual-stages-per-pipeline-rank`` V, else the layers of a stage
    over ``--num-layers-per-virtual-pipeline-stage``; one chunk is the plain schedule. No
    checks here (``config.resolve`` makes them); a split that does not divide gives a floor."""
    if virtual_stages_per_rank is not None:
        chunks = virtual_stages_per_rank
    elif layers_per_virtual_stage and num_layers and pipeline_size:
        chunks = num_layers // pipeline_size // layers_per_virtual_stage
    else:
        return None
    return chunks if chunks and chunks > 1 else None


def chunk_layer_ranges(
    num_layers: int, pipeline_size: int, virtual_size: int | None,
    first_stage_layers: int | None = None, last_stage_layers: int | None = None,
) -> dict[tuple[int, int], range]:
    """``(pipeline rank, model chunk) -> range of 1-based layer numbers`` as megatron-core
    builds them (``get_num_layers_to_build`` / ``get_transformer_layer_offset`` with
    ``vp_stage``): chunk v of rank r follows chunk v of rank r-1, and chunk v+1 of rank 0
    follows chunk v of the last rank, each rank's layers split evenly over its chunks. The
    plain schedule is one chunk per rank. Raises ValueError when a stage's layers do not split
    over its chunks."""
    counts = stage_layer_counts(num_layers, pipeline_size, first_stage_layers, last_stage_layers)
    chunks = virtual_size or 1
    for rank, count in enumerate(counts):
        if count % chunks:
            raise ValueError(f"pipeline stage {rank} holds {count} layers, which do not split "
                             f"into {chunks} model chunks (virtual stages) of equal size")
    ranges, start = {}, 1
    for chunk in range(chunks):
        for rank, count in enumerate(counts):
            ranges[rank, chunk] = range(start, start + count // chunks)
            start += count // chunks
    return ranges


def target_chunk(target_layer: int, num_layers: int, pipeline_size: int,
                 virtual_size: int | None, first_stage_layers: int | None = None,
                 last_stage_layers: int | None = None) -> tuple[int, int]:
    """(pipeline rank, model chunk) that owns layer k (k = 0, the embedding: the first rank's
    first chunk). The last stage of the model is ``(pipeline_size - 1, chunks - 1)``."""
    if target_layer == 0:
        return 0, 0
    for owner, layers in chunk_layer_ranges(num_layers, pipeline_size, virtual_size,
                                            first_stage_layers, last_stage_layers).items():
        if target_layer in layers:
            return owner
    raise ValueError(f"target layer {target_layer} is not one of the {num_layers} layers")


def pipeline_bubble_fraction(pipeline_size: int, num_microbatches: int,
                             virtual_size: int | None = None) -> float:
    """Idle fraction of a step's ideal compute time under 1F1B: ``(p - 1) / m``, and
    ``(p - 1) / (v m)`` under the interleaved schedule with v chunks per rank (Narayanan et
    al. 2021, sec. 2.2; the bubble time over the ideal time, Megatron-LM's figure)."""
    return (pipeline_size - 1) / ((virtual_size or 1) * num_microbatches)


def in_flight_forwards(pipeline_size: int, num_microbatches: int, stage: int,
                       virtual_size: int | None = None) -> float:
    """How many micro-batches' activations of a whole stage rank ``stage`` holds at its peak,
    from megatron-core's warm-up counts (``get_pp_rank_microbatches``): 1F1B holds its
    ``p - r - 1`` warm-up forwards plus one, ``min(p - r, m)``; the interleaved schedule holds
    ``2 (p - r - 1) + (v - 1) p + 1`` chunk forwards (micro-batch groups of p, at most all
    ``v m``), each 1/v of the stage's layers."""
    if pipeline_size == 1:
        return 1.0
    if not virtual_size:
        return float(min(pipeline_size - stage, num_microbatches))
    chunks = min(2 * (pipeline_size - stage - 1) + (virtual_size - 1) * pipeline_size + 1,
                 virtual_size * num_microbatches)
    return chunks / virtual_size
