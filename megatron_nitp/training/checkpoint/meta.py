"""A checkpoint's ``nitp.json``: what it records besides the tensors, and the checks a load
makes against it before anything else is read.

``nitp.json`` holds the iteration, the consumed samples, the world size, the parallel layout
(``"layout"``), the optimizer format (``"optimizer_format"``), the whole run config once
(``"config"``, read back by ``megatron_nitp/config/stored.py``) and, for an import, where it
came from (``"imported_from"``, ``"imported_format"``).

Checkpoints written by earlier versions lack some of these and hold others; every reading of a
field that an older checkpoint may lack is here, with the value such a checkpoint was written
with:

- ``"model"`` and ``"nitp"`` sections (before the run config was stored once): compared as
  stored; newer checkpoints' are computed from ``"config"`` (:func:`saved_model`,
  :func:`saved_nitp`);
- model flags of :data:`LATER_MODEL_FLAGS` missing: not compared;
- NITP fields of :data:`LATER_NITP_FIELDS` missing: the value it trained with;
- no ``"optimizer_format"``: ``fully_reshardable`` (the only format then);
- no ``"layout"``: nothing to compare;
- no ``"config"`` (before the stored config): fp32 training (:func:`trained_precision`);
- no ``"consumed_samples"`` (the first checkpoints): 0.
"""

from __future__ import annotations

import dataclasses
import json
import os

from megatron_nitp.config.stored import stored_config
from megatron_nitp.training.checkpoint.files import CheckpointError

META = "nitp.json"
#: The model-shape settings a checkpoint must agree on (flat names of the run config)
MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "padded_vocab_size",
               "untie_embeddings_and_output_weights", "add_qkv_bias", "num_moe_experts",
               "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
               "moe_layer_pattern", "mtp_num_layers", "rotary_base", "norm_epsilon")
#: model flags added to MODEL_FLAGS later: compared only when the checkpoint stores them
LATER_MODEL_FLAGS = ("rotary_base", "norm_epsilon")
#: NITP fields added later, with the value a checkpoint that does not store them trained with
LATER_NITP_FIELDS = {"document_boundary": "allow", "extra_target_layers": [], "horizon": 1,
                     "cosine_reg_weight": 0.0}
#: With --finetune (weights only) the NITP objective may change; the projector's shape may not.
SHAPE_NITP_FIELDS = ("projector", "projector_ffn_ratio", "extra_target_layers", "horizon")


#: The distributed optimizer's checkpoint formats (megatron-core's
#: ``distrib_optim_sharding_type``), recorded in nitp.json as "optimizer_format".
#: dp_reshardable: each rank writes and reads only its own shard of the fp32 parameters and Adam
#: moments, in the optimizer's bucket layout (loadable at the same TP/PP/EP/CP; DP may change).
#: fully_reshardable (``--dist-ckpt-optim-fully-reshardable``): every rank gathers its
#: data-parallel group's whole state and writes it per parameter (loadable at any layout).
DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
#: the plain (not distributed) optimizer's per-parameter state: loadable at any layout
MODEL_SPACE = "model_space"
#: the layout fields a dp_reshardable optimizer state is tied to (nitp.json "layout")
DP_RESHARDABLE_FIXED = ("tp", "pp", "vpp", "ep", "etp", "cp")


#: nitp.json "imported_format" of a checkpoint converted from a Megatron-LM run: its iteration
#: and consumed samples resume, its optimizer starts fresh (no optimizer state is stored)
MEGATRON_LM = "megatron-lm"


def resumes_fresh_optimizer(meta: dict) -> bool:
    """Whether a checkpoint resumes its iteration without optimizer state (a Megatron-LM
    import, ``megatron_nitp/megatron_lm.py``)."""
    return meta.get("imported_format") == MEGATRON_LM


def imported_source(meta: dict) -> str | None:
    """What a checkpoint was imported from, in words ("Hugging Face DIR", "Megatron-LM DIR"),
    None for a checkpoint of a run."""
    if not meta.get("imported_from"):
        return None
    kind = "Megatron-LM" if resumes_fresh_optimizer(meta) else "Hugging Face"
    return f"{kind} {meta['imported_from']}"


def model_meta(config) -> dict:
    """The model-shape settings of a resolved run config that a checkpoint must agree on
    (JSON types: lists, not tuples)."""
    flat = config.flat()
    meta = {k: flat[k] for k in MODEL_FLAGS}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}


def layout(config) -> dict:
    """The parallel layout a checkpoint is written at (nitp.json "layout") of a resolved run
    config."""
    parallel = config.parallel
    return {"tp": parallel.tensor_model_parallel_size,
            "pp": parallel.pipeline_model_parallel_size,
            "ep": parallel.expert_model_parallel_size,
            # expert TP: None means "as TP"; stored resolved so equal layouts compare equal
            "etp": (parallel.expert_tensor_parallel_size
                    or parallel.tensor_model_parallel_size),
            "cp": parallel.context_parallel_size,
            "vpp": config.virtual_pipeline_model_parallel_size,
            "dp": config.derived.data_parallel_size}


def build_meta(iteration: int, consumed_samples: int, world_size: int, config,
               fmt: str, imported_from: str | None = None,
               imported_format: str | None = None) -> dict:
    """The nitp.json of a checkpoint of ``iteration`` written by a run of ``config`` (resolved)
    on ``world_size`` ranks, its optimizer state in format ``fmt``."""
    meta = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "world_size": world_size,
        "layout": layout(config),
        # how the distributed optimizer's state is stored: load builds the same form
        "optimizer_format": fmt,
        # the whole run config (RunConfig.to_dict): the checks at load, export, evaluation
        # and the tools read it back (megatron_nitp.config.stored)
        "config": config.to_dict(),
    }
    if imported_from:
        meta["imported_from"] = imported_from
    if imported_format:
        meta["imported_format"] = imported_format
    return meta


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def saved_model(meta: dict) -> dict:
    """The checkpoint's model-shape settings (:func:`model_meta`): its ``"model"`` section
    where it stores one (older checkpoints), else computed from its stored config; empty when
    it stores neither."""
    if "model" in meta:
        return meta["model"]
    return model_meta(stored_config(meta)) if "config" in meta else {}


def saved_nitp(meta: dict) -> dict:
    """The checkpoint's NITP config as a dict: its ``"nitp"`` section where it stores one
    (older checkpoints), else its stored config's; empty when it stores neither."""
    if "nitp" in meta:
        return meta["nitp"]
    return dataclasses.asdict(stored_config(meta).nitp_config) if "config" in meta else {}


def saved_optimizer_format(meta: dict) -> str:
    """The checkpoint's optimizer format; checkpoints that do not record it were written
    ``fully_reshardable``."""
    return meta.get("optimizer_format", FULLY_RESHARDABLE)


def saved_consumed_samples(meta: dict) -> int:
    """The samples the run had consumed; the first checkpoints did not record them: 0."""
    return meta.get("consumed_samples", 0)


def trained_precision(meta: dict) -> tuple[bool, bool]:
    """(bf16, fp16) of the run that wrote the checkpoint; checkpoints older than the stored
    config trained in fp32."""
    training = meta.get("config", {}).get("training", {})
    return bool(training.get("bf16", False)), bool(training.get("fp16", False))


def check_compatible(meta: dict, config, override: bool = False,
                     weights_only: bool = False) -> list[str]:
    """Fields where the checkpoint's model or NITP config differs from this run's (``config``,
    resolved). Raises CheckpointError listing them unless ``override``."""
    saved = {"model": saved_model(meta), "nitp": saved_nitp(meta)}
    ours = {"model": model_meta(config), "nitp": dataclasses.asdict(config.nitp_config)}
    diffs = []
    for section in ("model", "nitp"):
        keys = set(saved[section]) | set(ours[section])
        if weights_only and section == "nitp":
            keys &= set(SHAPE_NITP_FIELDS)
        for key in sorted(keys):
            if section == "model" and key in LATER_MODEL_FLAGS and key not in saved["model"]:
                continue
            theirs, current = saved[section].get(key), ours[section].get(key)
            if section == "nitp" and key not in saved["nitp"]:
                theirs = LATER_NITP_FIELDS.get(key)
            theirs, current = (list(v) if isinstance(v, tuple) else v for v in (theirs, current))
            if theirs != current:
                diffs.append(f"{section}.{key}: checkpoint {theirs!r}, this run {current!r}")
    if diffs and not override:
        raise CheckpointError(
            "the checkpoint does not match this run:\n  " + "\n  ".join(diffs)
            + "\nfix the flags, or pass --override-config to load it deliberately."
        )
    return diffs


def check_optimizer_layout(meta: dict, config, path: str) -> None:
    """Refuses, before anything is read, to resume a ``dp_reshardable`` optimizer state at a
    layout it cannot serve (``config``: this run's, resolved): its tensors follow the
    distributed optimizer's gradient buckets of one TP/PP/EP/CP rank (the keys carry the
    data-parallel group's index), so only DP may change."""
    if saved_optimizer_format(meta) != DP_RESHARDABLE or resumes_fresh_optimizer(meta):
        return
    ours, theirs = layout(config), meta.get("layout", {})
    changed = [f"{k.upper()} {theirs[k]} -> {ours[k]}" for k in DP_RESHARDABLE_FIXED
               if k in theirs and theirs[k] != ours[k]]
    if not config.training.use_distributed_optimizer:
        changed.append("distributed optimizer on -> off")
    if changed:
        raise CheckpointError(
            f"{path} holds the distributed optimizer's state in the dp_reshardable form, which "
            f"only a run at the same TP/PP/EP/CP with --use-distributed-optimizer can resume "
            f"({', '.join(changed)}): resave it at the old layout with "
            "--dist-ckpt-optim-fully-reshardable (resume there with --exit-interval 1: one "
            "more iteration, then a fully reshardable checkpoint), or load the weights only "
            "with --finetune.")
