"""The run config a checkpoint stores, read back: for export, evaluation and the tools.

A checkpoint's ``nitp.json`` stores the whole run config once, under ``"config"``
(:meth:`RunConfig.to_dict`, its derived values included: the padded vocabulary, the MoE layer
pattern). Checkpoints written before the typed config store instead a ``"model"`` section (the
shape settings and the padded vocabulary), an ``"nitp"`` section (the NITP config) and an
``"export"`` section (sequence length, RoPE base, tokenizer and the like); checkpoints written
before the stored config was made the only copy hold all four. :func:`stored_config` reads
either form, so every checkpoint ever written still loads. The other fields of ``nitp.json``
(iteration, layout, optimizer format) are the checkpoint code's
(``training/checkpoint/meta.py``)."""

from __future__ import annotations

import dataclasses

from megatron_nitp.config.resolve import complete, resolve
from megatron_nitp.config.schema import ONE_PROCESS_LAYOUT, PerformanceConfig, RunConfig


def stored_config(meta: dict) -> RunConfig:
    """The run config checkpoint meta data ``meta`` (``nitp.json``) was trained with, as
    stored (the training layout, derived values when it stores them). A checkpoint older than
    the stored config is rebuilt from its model, NITP and export sections on the
    ``tiny-dense`` preset (the settings they lack keep that preset's values)."""
    if "config" in meta:
        return RunConfig.from_dict(meta["config"])
    from megatron_nitp.config import preset_config

    model, nitp, extra = meta["model"], meta["nitp"], meta.get("export", {})
    flat = {k: v for k, v in {**model, **extra}.items()
            if k not in ("padded_vocab_size", "moe_layer_pattern") and v is not None}
    flat.update({("nitp" if k == "enabled" else f"nitp_{k}"): v for k, v in nitp.items()})
    return preset_config("tiny-dense", **flat)


def stored_padded_vocab(meta: dict) -> int:
    """The checkpoint's embedding rows (its vocabulary padded for the training layout's TP):
    the ``"model"`` section's where it has one (checkpoints before the stored config was the
    only copy), else the stored config's derived value."""
    if "model" in meta:
        return meta["model"]["padded_vocab_size"]
    return meta["config"]["derived"]["padded_vocab_size"]


def config_from_meta(meta: dict) -> RunConfig:
    """The run config a checkpoint was trained with, for one process (TP = PP = EP = 1, no
    sequence parallelism or distributed optimizer), resolved with the checkpoint's padded
    vocabulary (its embedding rows, padded for the training layout's TP): what export,
    evaluation and the tools build the model from.

    The speed and memory settings (``PerformanceConfig``: communication overlap, grouped-GEMM
    experts, fused permutation, FP8, fusions, recomputation) are dropped: they change how the
    training cluster computed, not the weights (megatron-core's TEGroupedMLP and SequentialMLP
    share their checkpoint keys), and the machine that exports or evaluates may lack their
    kernels (a checkpoint trained with ``--moe-grouped-gemm`` on GPUs is read by SequentialMLP,
    whose expert names the Hugging Face mapping knows). Overlapped parameter gathering also
    needs the distributed optimizer, which one process does not use. The model computes in
    fp32 (a bf16 checkpoint's weights are exact in fp32): evaluations do not change with the
    training precision."""
    config = stored_config(meta)
    config = dataclasses.replace(config, performance=PerformanceConfig())
    config = complete(config.replace(
        **ONE_PROCESS_LAYOUT, use_distributed_optimizer=False, micro_batch_size=1,
        global_batch_size=1, load=None, save=None, bf16=False, fp16=False,
        dist_ckpt_optim_fully_reshardable=False))
    resolved = resolve(config, 1)
    return resolved.replace(derived=dataclasses.replace(
        resolved.derived, padded_vocab_size=stored_padded_vocab(meta)))
