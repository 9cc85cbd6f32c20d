"""The parallel layout of a planned job (:class:`Layout`) and where its layers sit: which
layers a pipeline stage builds and which stage holds NITP's target layer k, uneven splits
included. The arithmetic is ``megatron_nitp.layout``'s, the one the model builder runs."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_nitp.config import RunConfig, pipeline_split
from megatron_nitp.layout import stage_layer_counts
from megatron_nitp.layout import target_stage as layout_target_stage


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


def layout_of(args: RunConfig) -> Layout:
    """The layout of a resolved config (``config.resolve``: world and data-parallel size
    known)."""
    p = args.parallel
    return Layout(world=args.world_size, tp=p.tensor_model_parallel_size,
                  pp=p.pipeline_model_parallel_size, cp=p.context_parallel_size,
                  ep=p.expert_model_parallel_size, dp=args.derived.data_parallel_size,
                  sp=bool(p.sequence_parallel), etp=p.expert_tensor_parallel_size)


def stage_layers(args: RunConfig, layout: Layout, stage: int) -> slice:
    """The (0-based) layers pipeline stage ``stage`` builds, uneven splits included."""
    counts = stage_layer_counts(args.model.num_layers, layout.pp, *pipeline_split(args.parallel))
    start = sum(counts[:stage])
    return slice(start, start + counts[stage])


def target_stage(args: RunConfig, layout: Layout) -> int:
    """The pipeline stage that holds layer k, uneven splits included."""
    return layout_target_stage(args.nitp_config.target_layer, args.model.num_layers, layout.pp,
                               *pipeline_split(args.parallel))
