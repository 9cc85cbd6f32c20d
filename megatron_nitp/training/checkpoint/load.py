"""Reading a checkpoint back into a run: found and verified (``files.py``), checked against
this run's config (``meta.py``), then the model, optimizer, scheduler and RNG states restored
at any parallel layout the optimizer format allows."""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing

from megatron_nitp.training.checkpoint.files import CheckpointError, find_checkpoint
from megatron_nitp.training.checkpoint.meta import (check_compatible, check_optimizer_layout,
                                                    read_meta, resumes_fresh_optimizer,
                                                    saved_optimizer_format)
from megatron_nitp.training.checkpoint.state import (load_model_state, materialize_adam_state,
                                                     schedules, set_rng_state, sharded_state)


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, config=None,
                    weights_only: bool = False, fallback: bool = False,
                    override: bool = False) -> dict:
    """Restores a checkpoint into this run (any parallel layout). Returns its meta data.
    ``config``: the run's resolved ``RunConfig`` (None: load without checking it, as export
    and evaluation do).

    ``weights_only`` (``--finetune``) loads the model alone: iteration, optimizer, scheduler,
    data position and RNG start fresh. RNG states are restored only when the layout (world
    size) is unchanged; a resharded run continues with the same weights and optimizer state.
    A Megatron-LM import (:func:`resumes_fresh_optimizer`), and any checkpoint under
    ``--no-load-optim``, resumes its iteration and data position with a fresh optimizer, the
    scheduler stepped to that iteration. ``--no-load-rng`` leaves the RNG states as they are.
    """
    checkpoint = config.checkpoint if config is not None else None
    path = find_checkpoint(root, fallback, checkpoint is None or checkpoint.verify)
    meta = read_meta(path)
    fresh = (resumes_fresh_optimizer(meta) or (checkpoint is not None and checkpoint.no_load_optim)
             ) and not weights_only
    if meta.get("imported_from") and not fresh and not weights_only and optimizer is not None:
        raise CheckpointError(
            f"{path} was imported from {meta['imported_from']} (weights only: no optimizer, "
            "scheduler or data position to resume): load it with --finetune.")
    if config is not None:
        # an import's NITP settings were the tool's defaults: like --finetune, only the
        # projector's shape must agree (the run's own NITP flags apply from here)
        check_compatible(meta, config, override, weights_only or resumes_fresh_optimizer(meta))
    loads_optimizer = optimizer is not None and not weights_only and not fresh
    if loads_optimizer and config is not None:
        check_optimizer_layout(meta, config, path)
    if loads_optimizer and config is not None and config.training.use_distributed_optimizer:
        materialize_adam_state(optimizer)
    override_schedule = checkpoint is not None and checkpoint.override_opt_param_scheduler
    keeps_saved_schedule = checkpoint is not None and checkpoint.use_checkpoint_opt_param_scheduler
    if loads_optimizer and scheduler is not None and not (
            override_schedule or keeps_saved_schedule):
        saved = dist_checkpointing.load_common_state_dict(path).get("scheduler") or {}
        diffs = schedules().schedule_differences(scheduler, saved, meta.get("config"))
        if diffs:
            raise CheckpointError(
                f"the learning-rate schedule of {path} differs from this run's ("
                + "; ".join(diffs) + "): pass --override-opt_param-scheduler to follow this "
                "command line's schedule from the checkpoint's iteration, or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's.")
    state = sharded_state(model, optimizer if loads_optimizer else None, is_loading=True,
                          fmt=saved_optimizer_format(meta))
    if scheduler is not None and not weights_only and not fresh:
        state["scheduler"] = schedules().schedule_state(scheduler)
    loaded = dist_checkpointing.load(state, path, strict="assume_ok_unexpected")
    load_model_state(model, loaded["model"])
    if loads_optimizer:
        schedules().match_saved_groups(loaded["optimizer"], optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None:
            schedules().load_schedule(scheduler, loaded["scheduler"], meta.get("config"),
                                       override_schedule)
    else:
        if optimizer is not None:
            optimizer.reload_model_params()
        if fresh and scheduler is not None:
            # no scheduler state read: this run's schedule, at the checkpoint's iteration
            scheduler.step(increment=meta["iteration"])
    # a resume of this framework's run restores the RNG (a fine-tuning start, an import, and
    # --no-load-rng do not)
    if (weights_only or optimizer is None or resumes_fresh_optimizer(meta)
            or (checkpoint is not None and checkpoint.no_load_rng)):
        return meta
    rank_file = os.path.join(path, "rng", f"rank_{torch.distributed.get_rank():05d}.pt")
    if meta.get("world_size") == torch.distributed.get_world_size() and os.path.exists(rank_file):
        set_rng_state(torch.load(rank_file, weights_only=False))
    return meta


def load_model_weights(root: str, model) -> int:
    """Model weights of the latest checkpoint under ``root`` (any layout); its iteration."""
    return load_checkpoint(root, model, weights_only=True)["iteration"]
