"""The size of a run's checkpoint, from its resolved config: on disk (:func:`checkpoint_bytes`,
which the start check of ``--save``'s free space compares with the disk) and in host memory per
rank at save and at load (:func:`checkpoint_host_memory`), in the optimizer format the run writes
(:func:`checkpoint_format`). ``--dry-run`` prints both."""

from __future__ import annotations

from megatron_nitp.accounting.parallel import layout_of
from megatron_nitp.accounting.parameters import model_parameters, stage_parameters
from megatron_nitp.config import RunConfig


def checkpoint_format(args: RunConfig) -> str:
    """The optimizer format a save of this run writes (``checkpointing.optimizer_format``):
    ``dp_reshardable`` (distributed optimizer, the default), ``fully_reshardable``
    (``--dist-ckpt-optim-fully-reshardable``) or ``model_space`` (the plain optimizer)."""
    if not args.training.use_distributed_optimizer:
        return "model_space"
    if args.checkpoint.dist_ckpt_optim_fully_reshardable:
        return "fully_reshardable"
    return "dp_reshardable"


def _checkpoint_bytes_per_parameter(args: RunConfig) -> tuple[int, int]:
    """(weights, optimizer) bytes per parameter in a checkpoint: weights in the training dtype;
    the optimizer's fp32 main parameters and two Adam moments (12 B), except the plain
    optimizer in fp32, whose main parameters are the weights (8 B)."""
    half = args.training.bf16 or args.training.fp16
    return (2 if half else 4), (12 if half or args.training.use_distributed_optimizer else 8)


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
