"""megatron-core's optimizer (AdamW, fp32 main params, grad clipping) and LR scheduler."""

from __future__ import annotations

import argparse

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_nitp.training.model import params_dtype


def build_optimizer(model, args: argparse.Namespace):
    """AdamW (betas 0.9/0.95, wd 0.1, clip 1.0 by default) over the DDP-wrapped model chunks.

    The scheduler counts optimizer steps (iterations): warm-up, then WSD's stable phase and its
    final decay of ``--lr-wsd-decay-iters`` (20% of training by default, as in the paper).
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=params_dtype(args),
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [model])
    return optimizer, build_scheduler(optimizer, args)


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """megatron-core's scheduler, stepped once per iteration: Megatron-LM's sample-based
    lengths arrive here as iterations (``config.resolve``)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
