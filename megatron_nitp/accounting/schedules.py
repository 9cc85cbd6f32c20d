"""The pipeline schedules' cost for ``--dry-run``: the bubble and the activations of in-flight
micro-batches, plain 1F1B beside interleaved (virtual pipeline stages)."""

from __future__ import annotations

from typing import Optional

from megatron_nitp.accounting.memory_plan import _stage_activations, format_bytes
from megatron_nitp.accounting.parallel import layout_of
from megatron_nitp.config import RunConfig, pipeline_split
from megatron_nitp.layout import chunk_layer_ranges, in_flight_forwards, pipeline_bubble_fraction


def pipeline_schedules(args: RunConfig) -> Optional[dict]:
    """The pipeline bubble and the activations of in-flight micro-batches on stage 0 (the
    stage that holds the most) under the plain 1F1B schedule and the interleaved one: the
    run's V chunks per rank, or 2 when the run is plain and its stages split in two (what
    interleaving would give). None without pipeline parallelism.

    Bubble: ``(p - 1) / m`` plain, ``(p - 1) / (v m)`` interleaved (idle time over ideal
    compute time, Megatron-LM's figure); in flight: megatron-core's warm-up counts
    (``layout.in_flight_forwards``), times one micro-batch's activations of the stage."""
    layout = layout_of(args)
    if layout.pp == 1:
        return None
    micro = args.derived.num_microbatches
    vpp = args.virtual_pipeline_model_parallel_size
    hypothetical = vpp is None
    if vpp is None:
        try:
            chunk_layer_ranges(args.model.num_layers, layout.pp, 2, *pipeline_split(args.parallel))
            vpp = 2
        except ValueError:
            pass
    tokens = args.model.seq_length // layout.cp * args.training.micro_batch_size
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
             f"({format_bytes(figures['plain_in_flight_bytes'])})")
    if v is None:
        return plain + "; interleaved: the stages' layers do not split into chunks"
    interleaved = (f"interleaved V={v}: bubble (p-1)/(v m) = {p - 1}/{v * m} = "
                   f"{figures['interleaved_bubble']:.1%}, in flight on stage 0 "
                   f"{figures['interleaved_in_flight']:g} micro-batches "
                   f"({format_bytes(figures['interleaved_in_flight_bytes'])})")
    if figures["hypothetical"]:
        return (f"{plain} (this run); {interleaved} with "
                f"--num-virtual-stages-per-pipeline-rank {v}")
    return f"{interleaved} (this run); {plain} without interleaving"
