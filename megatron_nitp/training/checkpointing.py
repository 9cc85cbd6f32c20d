"""Checkpoints that survive pre-emption, crashes and layout changes.

Everything is written with megatron-core's ``dist_checkpointing`` (sharded, so any TP/PP/DP
layout can reload it) plus a few small files::

    SAVE/iter_0000300/                 dist_checkpointing: model (projector included), optimizer,
                                       LR scheduler
    SAVE/iter_0000300/rng/rank_*.pt    per-rank RNG states (Python, NumPy, torch, megatron tracker)
    SAVE/iter_0000300/nitp.json        iteration, consumed samples, model flags, NITP config
    SAVE/iter_0000300/manifest.json    every file's size and CRC32, written last by rank 0
    SAVE/latest_checkpointed_iteration.txt   moved (atomically) only after the manifest exists

A checkpoint becomes visible only when every rank finished writing it and the manifest is
complete: a crash mid-save leaves the previous one as latest. At load the manifest is verified
(missing, truncated or corrupted files are named); ``--load-fallback`` then tries the previous
complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_nitp import device
from megatron_nitp.training import faults
from megatron_nitp.training.model import unwrap

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
META = "nitp.json"
MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "padded_vocab_size",
               "untie_embeddings_and_output_weights", "add_qkv_bias", "num_moe_experts",
               "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
               "moe_layer_pattern", "mtp_num_layers")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or fields."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(path: str) -> list[str]:
    out = []
    for base, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), path)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": device.rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    device.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def model_meta(args) -> dict:
    """The model-shape settings a checkpoint must agree on (JSON types: lists, not tuples)."""
    meta = {k: getattr(args, k, None) for k in MODEL_FLAGS}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(sub, DistributedOptimizer) for sub in subs)


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    model_sd = unwrap(model).sharded_state_dict(prefix="model.")
    state = {"model": model_sd}
    if optimizer is not None:
        kwargs = {}
        if _is_distributed_optimizer(optimizer):
            # "fully_reshardable": the distributed optimizer's state in a layout-independent
            # form (the default flattened ranges cannot be saved at DP >= 2 nor reshard).
            kwargs["metadata"] = {"distrib_optim_sharding_type": "fully_reshardable"}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                         **kwargs)
    return state


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, args,
                    consumed_samples: int = 0, keep_last: int | None = None) -> str:
    """Writes a complete checkpoint of ``iteration`` and then moves the tracker to it (the
    ``crash-in-save`` test fault stops the process in between: ``training/faults.py``)."""
    path = checkpoint_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        if os.path.isdir(path):  # a leftover of an interrupted save of this same iteration
            shutil.rmtree(path)
        # empty: dist_checkpointing.save warns "Overwriting old incomplete / corrupted
        # checkpoint..." on a folder that holds anything
        os.makedirs(path)
    torch.distributed.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, path)
    # the per-rank RNG states after the shards (still before the manifest and the tracker)
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(path, "rng", f"rank_{rank:05d}.pt"))
    torch.distributed.barrier()
    if faults.due("crash-in-save", iteration):
        os._exit(faults.EXIT_CRASH_IN_SAVE)
    if rank == 0:
        meta = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "world_size": torch.distributed.get_world_size(),
            "layout": {"tp": args.tensor_model_parallel_size,
                       "pp": args.pipeline_model_parallel_size,
                       "ep": args.expert_model_parallel_size},
            "model": model_meta(args),
            "nitp": dict(args.nitp_config.__dict__),
            # the whole run config (RunConfig.to_dict): export, evaluation and the tools
            # rebuild the model from it (megatron_nitp.config.RunConfig.from_dict)
            "config": args.to_dict(),
            # not compared at load; read by exports of checkpoints older than "config"
            "export": {k: getattr(args, k, None) for k in (
                "seq_length", "max_position_embeddings", "rotary_base", "norm_epsilon",
                "vocab_size", "tokenizer_type", "tokenizer_model", "moe_layer_freq")},
        }
        with open(os.path.join(path, META), "w") as f:
            json.dump(meta, f, indent=2)
        manifest = {rel: {"bytes": os.path.getsize(os.path.join(path, rel)),
                          "crc32": _crc32(os.path.join(path, rel))} for rel in _files(path)}
        with open(os.path.join(path, MANIFEST + ".tmp"), "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(os.path.join(path, MANIFEST + ".tmp"), os.path.join(path, MANIFEST))
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER))
        if keep_last:
            _rotate(root, keep_last)
    torch.distributed.barrier()
    return path


def _complete_iterations(root: str) -> list[int]:
    found = []
    for name in os.listdir(root):
        if name.startswith("iter_") and os.path.exists(os.path.join(root, name, MANIFEST)):
            found.append(int(name[len("iter_"):]))
    return sorted(found)


def _rotate(root: str, keep_last: int) -> None:
    """Deletes complete checkpoints older than the newest ``keep_last``."""
    for iteration in _complete_iterations(root)[:-keep_last]:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def verify_checkpoint(path: str) -> None:
    """Raises CheckpointError naming the first missing, truncated or corrupted file."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{path} is incomplete: {MANIFEST} is missing (the save never "
                              "finished); use an earlier checkpoint or --load-fallback.")
    with open(manifest_path) as f:
        manifest = json.load(f)
    for rel, expected in manifest.items():
        file = os.path.join(path, rel)
        if not os.path.exists(file):
            raise CheckpointError(f"checkpoint file missing: {file}")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file truncated: {file} has {size} bytes, "
                                  f"{expected['bytes']} were written")
        if _crc32(file) != expected["crc32"]:
            raise CheckpointError(f"checkpoint file corrupted (CRC32 mismatch): {file}")


def find_checkpoint(root: str, fallback: bool = False) -> str:
    """The latest checkpoint under ``root``, verified; with ``fallback`` the newest complete
    and intact one if the latest is not."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        raise CheckpointError(f"no checkpoint in {root}: {TRACKER} is missing.")
    with open(tracker) as f:
        latest = int(f.read().strip())
    candidates = [latest]
    if fallback:
        candidates += [i for i in reversed(_complete_iterations(root)) if i != latest]
    errors = []
    for iteration in candidates:
        path = checkpoint_dir(root, iteration)
        try:
            verify_checkpoint(path)
            if errors:
                print(f"> falling back to {path} ({errors[-1]})", flush=True)
            return path
        except CheckpointError as err:
            errors.append(str(err))
    hint = "" if fallback else " (--load-fallback tries the previous checkpoints)"
    raise CheckpointError(errors[0] + hint if len(errors) == 1 else "; ".join(errors))


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


#: With --finetune (weights only) the NITP objective may change; the projector's shape may not.
SHAPE_NITP_FIELDS = ("projector", "projector_ffn_ratio")


def check_compatible(meta: dict, args, override: bool = False,
                     weights_only: bool = False) -> list[str]:
    """Fields where the checkpoint's model or NITP config differs from this run's. Raises
    CheckpointError listing them unless ``override``."""
    ours = {"model": model_meta(args), "nitp": dict(args.nitp_config.__dict__)}
    diffs = []
    for section in ("model", "nitp"):
        keys = set(meta.get(section, {})) | set(ours[section])
        if weights_only and section == "nitp":
            keys &= set(SHAPE_NITP_FIELDS)
        for key in sorted(keys):
            saved, current = meta.get(section, {}).get(key), ours[section].get(key)
            if isinstance(current, tuple):
                current = list(current)
            if saved != current:
                diffs.append(f"{section}.{key}: checkpoint {saved!r}, this run {current!r}")
    if diffs and not override:
        raise CheckpointError(
            "the checkpoint does not match this run:\n  " + "\n  ".join(diffs)
            + "\nfix the flags, or pass --override-config to load it deliberately."
        )
    return diffs


def config_from_meta(meta: dict):
    """The run config a checkpoint was trained with, for one process (TP = PP = EP = 1, no
    sequence parallelism or distributed optimizer), resolved with the checkpoint's padded
    vocabulary (its embedding rows, padded for the training layout's TP): what export,
    evaluation and the tools build the model from. Checkpoints older than the stored config
    rebuild it from their model and NITP sections."""
    import dataclasses

    from megatron_nitp.config import RunConfig, complete, preset_config, resolve

    if "config" in meta:
        config = RunConfig.from_dict(meta["config"])
    else:
        model, nitp, extra = meta["model"], meta["nitp"], meta.get("export", {})
        flat = {k: v for k, v in {**model, **extra}.items()
                if k not in ("padded_vocab_size", "moe_layer_pattern") and v is not None}
        flat.update({("nitp" if k == "enabled" else f"nitp_{k}"): v for k, v in nitp.items()})
        config = preset_config("tiny-dense", **flat)
    config = complete(config.replace(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=1, context_parallel_size=1, sequence_parallel=False,
        use_distributed_optimizer=False, decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None, micro_batch_size=1, global_batch_size=1,
        load=None, save=None))
    resolved = resolve(config, 1)
    padded = meta["model"]["padded_vocab_size"]
    return resolved.replace(derived=dataclasses.replace(resolved.derived,
                                                        padded_vocab_size=padded))


def _is_torch_adam(optimizer) -> bool:
    """torch's Adam/AdamW: what megatron-core's optimizer falls back to when neither Transformer
    Engine's nor Apex's FusedAdam imports. Those fused ones derive from torch.optim.Optimizer,
    not from Adam, keep no per-parameter "step" and are set up at load by megatron-core itself
    (the optimizer's ``init_state_fn``)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _materialize_adam_state(optimizer) -> None:
    """torch's Adam creates its state at the first step; megatron-core's distributed optimizer
    reads its per-parameter ``state["step"]`` while building the state dict it loads into
    (``DistributedOptimizer.state_dict``, the no-Apex/TE branch). Give a fresh torch Adam that
    empty state. Any other optimizer (TE's or Apex's FusedAdam on GPU) is left untouched: a
    "step" in their per-parameter state makes their own ``state_dict()`` raise KeyError."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None or not _is_torch_adam(inner):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, device="cpu")  # where torch's Adam keeps it
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, args=None,
                    weights_only: bool = False, fallback: bool = False,
                    override: bool = False) -> dict:
    """Restores a checkpoint into this run (any parallel layout). Returns its meta data.

    ``weights_only`` (``--finetune``) loads the model alone: iteration, optimizer, scheduler,
    data position and RNG start fresh. RNG states are restored only when the layout (world
    size) is unchanged; a resharded run continues with the same weights and optimizer state.
    """
    path = find_checkpoint(root, fallback)
    meta = read_meta(path)
    if args is not None:
        check_compatible(meta, args, override, weights_only)
    if optimizer is not None and not weights_only and args is not None and args.use_distributed_optimizer:
        _materialize_adam_state(optimizer)
    state = _sharded_state(model, None if weights_only else optimizer, is_loading=True)
    if scheduler is not None and not weights_only:
        state["scheduler"] = scheduler.state_dict()
    loaded = dist_checkpointing.load(state, path, strict="assume_ok_unexpected")
    inner = unwrap(model)
    inner.load_state_dict({k[len("model."):]: v for k, v in loaded["model"].items()},
                          strict=False)
    if weights_only or optimizer is None:
        if optimizer is not None:
            optimizer.reload_model_params()
        return meta
    optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    rank_file = os.path.join(path, "rng", f"rank_{torch.distributed.get_rank():05d}.pt")
    if meta.get("world_size") == torch.distributed.get_world_size() and os.path.exists(rank_file):
        _set_rng_state(torch.load(rank_file, weights_only=False))
    return meta


def load_model_weights(root: str, model) -> int:
    """Model weights of the latest checkpoint under ``root`` (any layout); its iteration."""
    return load_checkpoint(root, model, weights_only=True)["iteration"]
