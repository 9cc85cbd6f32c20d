"""The ranges of the numeric settings, checked before anything else reads them.

A size of 0 divides by zero somewhere in the checks or the model build, a negative one
builds nonsense, a dropout of 1 drops everything, a logging interval of 0 divides the
iteration number by zero and a negative one fires every iteration, a negative
``--save-keep-last`` would delete the newest checkpoint: each is refused in one line that
names the flag, the value and the range (``check_ranges``, the first check of ``resolve.validate``).
Settings that are None (not given, no default) are not checked. The layout's own divisibility
rules and the cross-setting checks stay in ``resolve``, and NITP's settings are checked by
``NITPConfig.validate`` with the method's own wording (layer k against the depth, lambda).
"""

from __future__ import annotations

import dataclasses

from megatron_nitp.config.schema import FLAT, GROUPS, RunConfig, field_dest

#: (lowest, the lowest itself allowed, highest or None, the highest itself allowed)
COUNT = (1, True, None, False)  # sizes, counts, lengths, timeouts in whole units
NON_NEGATIVE = (0, True, None, False)  # weights, coefficients, start points, seeds, rates
POSITIVE = (0, False, None, False)  # scales and constants that divide or multiply
PROBABILITY = (0, True, 1, False)  # dropout; Adam's betas
FRACTION = (0, True, 1, True)  # a part of the run

RANGES = {
    **dict.fromkeys((
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "kv_channels", "seq_length", "max_position_embeddings",
        "vocab_size", "make_vocab_size_divisible_by", "num_moe_experts", "moe_router_topk",
        "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "nitp_projector_ffn_ratio",
        "micro_batch_size", "global_batch_size", "train_iters", "train_samples",
        "lr_decay_samples", "lr_decay_iters", "tensor_model_parallel_size",
        "pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size",
        "expert_tensor_parallel_size", "num_layers_per_virtual_pipeline_stage",
        "num_virtual_stages_per_pipeline_rank", "distributed_timeout_minutes",
        "recompute_num_layers", "log_interval", "tensorboard_log_interval",
        "tensorboard_queue_size", "save_keep_last"), COUNT),
    **dict.fromkeys((
        "moe_aux_loss_coeff", "moe_router_bias_update_rate", "moe_z_loss_coeff", "mtp_num_layers",
        "mtp_loss_scaling_factor",
        "seed", "weight_decay", "clip_grad", "lr", "min_lr", "lr_warmup_iters",
        "lr_warmup_samples", "lr_wsd_decay_iters", "lr_wsd_decay_samples",
        "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
        "eval_interval", "eval_iters", "geometry_interval", "save_interval",
        "manual_gc_interval"), NON_NEGATIVE),
    **dict.fromkeys((
        "rotary_base", "norm_epsilon", "init_method_std", "adam_eps", "loss_scale",
        "initial_loss_scale", "dataset_build_timeout_minutes", "peak_tflops",
        "moe_expert_capacity_factor"), POSITIVE),
    **dict.fromkeys(("hidden_dropout", "attention_dropout", "adam_beta1", "adam_beta2"),
                    PROBABILITY),
    **dict.fromkeys(("lr_wsd_decay_ratio", "lr_warmup_fraction"), FRACTION),
}

#: What the boundary value means, where it is a switch: said beside the refusal.
MEANINGS = {
    "eval_interval": "0: never", "eval_iters": "0: no validation", "geometry_interval": "0: never",
    "save_interval": "0 or none: only the final checkpoint",
    "manual_gc_interval": "0: collect only at start and around validation",
    "save_keep_last": "omit it to keep every checkpoint",
}


def flag_of(name: str) -> str:
    """The command-line flag of the flat setting ``name`` (``num_moe_experts``:
    ``--num-experts``)."""
    group, attr = FLAT[name]
    cls = GROUPS[group][0]
    f = {f.name: f for f in dataclasses.fields(cls)}[attr]
    return f.metadata.get("name") or "--" + field_dest(cls, f).replace("_", "-")


def describe(bounds: tuple) -> str:
    low, low_in, high, high_in = bounds
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def out_of_range(value, bounds: tuple) -> bool:
    low, low_in, high, high_in = bounds
    below = value < low or (value == low and not low_in)
    above = high is not None and (value > high or (value == high and not high_in))
    return below or above


def check_ranges(config: RunConfig) -> str | None:
    """The one-line refusal of the first setting of ``config`` outside its range (None when
    every one is inside)."""
    for name, bounds in RANGES.items():
        value = config.setting(name)
        if value is not None and out_of_range(value, bounds):
            meaning = f" ({MEANINGS[name]})" if name in MEANINGS else ""
            return f"{flag_of(name)} {value} must be {describe(bounds)}{meaning}."
    return None
