"""megatron-core's optimizer (AdamW, fp32 main params, grad clipping) and LR scheduler.

Both take the run config's sections they read (``RunConfig.training``, ``.schedule`` and the
``.derived`` values of a resolved config), not the whole config: what decides the optimizer
is then visible at the call, and a test builds one from those sections alone.
"""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_nitp.config.schema import Derived, ScheduleConfig, TrainingConfig
from megatron_nitp.training.model import as_chunks, params_dtype


def build_optimizer(model, training: TrainingConfig, schedule: ScheduleConfig,
                    derived: Derived, count_zeros: bool = False):
    """AdamW (betas 0.9/0.95, wd 0.1, clip 1.0 by default) over the DDP-wrapped model chunks,
    and its scheduler (:func:`build_scheduler`).

    The scheduler counts optimizer steps (iterations): warm-up, then WSD's stable phase and its
    final decay of ``--lr-wsd-decay-iters`` (20% of training by default, as in the paper).
    ``derived``: the resolved config's (``config.resolve``), for the decay lengths.
    ``count_zeros`` (``--log-num-zeros-in-grad``): ``optimizer.step()`` also counts the
    gradient entries that are zero.
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=schedule.lr,
        min_lr=schedule.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=training.bf16,
        fp16=training.fp16,
        params_dtype=params_dtype(training),
        loss_scale=training.loss_scale,
        initial_loss_scale=training.initial_loss_scale,
        use_distributed_optimizer=training.use_distributed_optimizer,
        log_num_zeros_in_grad=count_zeros,
    )
    optimizer = get_megatron_optimizer(config, as_chunks(model))
    return optimizer, build_scheduler(optimizer, training, schedule, derived)


def build_scheduler(optimizer, training: TrainingConfig, schedule: ScheduleConfig,
                    derived: Derived) -> OptimizerParamScheduler:
    """megatron-core's scheduler, stepped once per iteration: Megatron-LM's sample-based
    lengths arrive here as iterations (``config.resolve`` writes them into ``training`` and
    ``schedule`` and computes the decay lengths into ``derived``); the constant weight decay
    and its length come from ``training``."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=schedule.lr,
        min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.lr_warmup_iters,
        lr_decay_steps=derived.lr_decay_iters,
        lr_decay_style=schedule.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=derived.lr_wsd_decay_iters,
        lr_wsd_decay_style=schedule.lr_wsd_decay_style,
    )


#: The schedule a checkpoint's scheduler state holds (megatron-core's keys, also the
#: ``OptimizerParamScheduler`` attributes) and the flag that sets each: what megatron-core's
#: ``load_state_dict`` compares. ``wd_incr_steps`` is left out: with the constant weight decay
#: it is --train-iters and decides nothing.
SCHEDULE_STATE = (("max_lr", "--lr"), ("min_lr", "--min-lr"),
                  ("lr_warmup_steps", "--lr-warmup-iters"),
                  ("lr_decay_steps", "--lr-decay-iters (default --train-iters)"),
                  ("lr_decay_style", "--lr-decay-style"), ("start_wd", "--weight-decay"))


def schedule_state(scheduler) -> dict:
    """What a checkpoint stores of the scheduler: megatron-core's state, plus WSD's decay length
    and shape, which it leaves out (a resume on the checkpoint's schedule needs them)."""
    return {**scheduler.state_dict(), "wsd_decay_steps": scheduler.wsd_decay_steps,
            "lr_wsd_decay_style": scheduler.lr_wsd_decay_style}


def _saved_wsd(saved: dict, saved_config: dict | None) -> tuple:
    """A checkpoint's (WSD decay steps, WSD decay style): its scheduler state's, else (saved
    before :func:`schedule_state` kept them) its stored run config's, else None."""
    config = saved_config or {}
    return (saved.get("wsd_decay_steps", (config.get("derived") or {}).get("lr_wsd_decay_iters")),
            saved.get("lr_wsd_decay_style", config.get("schedule", {}).get("lr_wsd_decay_style")))


def schedule_differences(scheduler, saved: dict, saved_config: dict | None) -> list[str]:
    """Where this run's schedule differs from a checkpoint's scheduler state ``saved`` (WSD's
    decay from the run config it stores, ``saved_config``, for older checkpoints)."""
    diffs = []
    for key, flag in SCHEDULE_STATE:
        if key in saved and saved[key] != getattr(scheduler, key):
            diffs.append(f"{flag}: checkpoint {saved[key]!r}, this run {getattr(scheduler, key)!r}")
    if "WSD" in (saved.get("lr_decay_style"), scheduler.lr_decay_style):
        for value, attr, flag in zip(_saved_wsd(saved, saved_config),
                                     ("wsd_decay_steps", "lr_wsd_decay_style"),
                                     ("--lr-wsd-decay-iters", "--lr-wsd-decay-style")):
            if value is not None and value != getattr(scheduler, attr):
                diffs.append(f"{flag}: checkpoint {value!r}, this run {getattr(scheduler, attr)!r}")
    return diffs


def load_schedule(scheduler, saved: dict, saved_config: dict | None, override: bool) -> None:
    """Restores a checkpoint's scheduler: its step count always (the schedule continues from the
    checkpoint's iteration); its schedule unless ``override`` (--override-opt_param-scheduler:
    this command line's wins, e.g. a decay-phase ablation branching from a stable-phase
    checkpoint). A difference without either option was refused before loading
    (:func:`schedule_differences`), so "the checkpoint's" here is the mismatch-free default and
    --use-checkpoint-opt_param-scheduler alike."""
    scheduler.override_opt_param_scheduler = override
    scheduler.use_checkpoint_opt_param_scheduler = not override
    scheduler.load_state_dict(saved)
    # the per-group bounds, which get_lr reads before the scheduler's own: those of the
    # schedule in force (the optimizer's state came with this run's, see match_saved_groups)
    for group in scheduler.optimizer.param_groups:
        group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
    if not override:
        steps, style = _saved_wsd(saved, saved_config)
        scheduler.wsd_decay_steps = steps if steps is not None else scheduler.wsd_decay_steps
        scheduler.lr_wsd_decay_style = style or scheduler.lr_wsd_decay_style
    scheduler.step(increment=0)  # the learning rate of the schedule now in force


#: The learning-rate bounds an optimizer parameter group carries (the scheduler's, per group).
GROUP_BOUNDS = ("max_lr", "min_lr")


def match_saved_groups(saved_state, optimizer) -> None:
    """Gives the parameter groups of a checkpoint's optimizer state (``saved_state``, as
    ``dist_checkpointing.load`` returns it) this run's learning-rate bounds, group by group.

    Why: megatron-core pairs saved and current groups by a key, and since 0.19 that key holds
    ``max_lr`` and ``min_lr`` (0.16 to 0.18: ``wd_mult``, ``lr_mult``, ``is_expert_parallel``,
    ``is_decoupled_lr`` only), so a resume with another ``--lr`` or ``--min-lr`` under
    --override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler failed with "Could
    not find parameter group with key". Groups are paired here by the rest of the key; the
    bounds in force are set after loading (:func:`load_schedule`)."""
    from megatron.core.optimizer import optimizer as mcore_optimizer

    keys = [k for k in getattr(mcore_optimizer, "param_group_identifier_keys", ())
            if k not in GROUP_BOUNDS]
    current = {tuple(g.get(k) for k in keys): g for g in optimizer.param_groups}

    def visit(node):
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "param_groups" and isinstance(value, list):
                    for group in value:
                        own = current.get(tuple(group.get(k) for k in keys))
                        if own is not None and all(b in group for b in GROUP_BOUNDS):
                            group.update({b: own[b] for b in GROUP_BOUNDS})
                else:
                    visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(saved_state)
