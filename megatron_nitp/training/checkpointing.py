"""Checkpoints that survive pre-emption, crashes and layout changes.

Everything is written with megatron-core's ``dist_checkpointing`` (sharded, so any TP/PP/DP
layout can reload it; the data-parallel replicas share the writing) plus a few small files::

    SAVE/iter_0000300/                 dist_checkpointing: model (projector included), optimizer,
                                       LR scheduler
    SAVE/iter_0000300/rng/rank_*.pt    per-rank RNG states (Python, NumPy, torch, megatron tracker)
    SAVE/iter_0000300/nitp.json        iteration, consumed samples, model flags, NITP config
    SAVE/iter_0000300/manifest.json    every file's size and CRC32, written last by rank 0
    SAVE/latest_checkpointed_iteration.txt   moved (atomically) only after the manifest exists

A checkpoint becomes visible only when every rank finished writing it and the manifest is
complete: a crash mid-save leaves the previous one as latest. Each rank checksums the files it
wrote itself, right after writing them (in the background writer with ``--async-save``); rank
0 gathers those entries into the manifest, so nobody re-reads the whole checkpoint. At load the
ranks share the verification (each checks a byte-balanced part of the files, the verdicts are
gathered), so missing, truncated or corrupted files are named at a cost per rank that falls
with the number of ranks; ``--load-fallback`` then tries the previous complete checkpoint.
``--no-verify`` skips the CRC32s (sizes are still written and checked).

With ``--async-save`` the shards are written by a forked process while training goes on;
:class:`AsyncSaves` polls for completion after each iteration (one collective while a save is
pending) and finalizes (manifest, tracker, rotation) once every rank's write has finished.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import random
import shutil
import time
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
               "moe_layer_pattern", "mtp_num_layers", "rotary_base", "norm_epsilon")
#: model flags added to MODEL_FLAGS later: compared only when the checkpoint stores them
LATER_MODEL_FLAGS = ("rotary_base", "norm_epsilon")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or fields."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


#: What this process read and wrote for checkpoint checksums (tools/checkpoint_benchmark.py
#: reports them): bytes checksummed at save and at load, and bytes of the files it wrote.
STATS = {"save_checksum_bytes": 0, "load_verify_bytes": 0, "written_bytes": 0}


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _entry(path: str, verify: bool) -> dict:
    """One manifest entry for a file this process has just written: its size and, unless
    ``--no-verify``, its CRC32 (a read of a file still in the page cache)."""
    size = os.path.getsize(path)
    STATS["written_bytes"] += size
    if not verify:
        return {"bytes": size}
    STATS["save_checksum_bytes"] += size
    return {"bytes": size, "crc32": _crc32(path)}


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


def _save_strategy():
    """torch_dist, with the data-parallel replicas sharing the writing of the replicated
    tensors (megatron-core's FullyParallelSaveStrategyWrapper, Megatron-LM's
    ``--ckpt-fully-parallel-save``): without it DP rank 0 writes every replicated tensor, so
    its write (and the checksums of what it wrote) would not shrink as DP grows."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _save_request(state: dict, path: str):
    """The megatron-core AsyncRequest that writes ``state``'s shards (planned here, with the
    collectives that takes; rank 0 has written the common part). Both the synchronous and the
    asynchronous save run it, so both know which files this rank writes. megatron-core 0.19
    defaults to the nvidia-resiliency-ext writer; ask for its own ("mcore")."""
    kwargs = {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(state, path, sharded_strategy=_save_strategy(),
                                   async_sharded_save=True, **kwargs)


def _write_and_checksum(write, root: str, verify: bool, stall: bool, out, *args, **kwargs):
    """megatron-core's write of this rank's shard files, then their manifest entries: each
    rank checksums only what it wrote, while the files are still in the page cache. With
    ``--async-save`` this runs in the forked writer and hands the entries back through ``out``
    (a queue the trainer reads at finalization); synchronously it returns them. ``args[1]`` is
    megatron-core's write plan: (file path, storage key, data) per file."""
    buckets = args[1]
    if stall and buckets:  # the stall-async-write test fault: die mid-write (faults.py)
        with open(buckets[0][0], "wb") as f:
            f.write(b"partial")
        time.sleep(faults.STALL_SECONDS)
    try:
        write(*args, **kwargs)
        entries = {os.path.relpath(b[0], root): _entry(b[0], verify) for b in buckets}
    except Exception as err:  # reported by the trainer at finalization, on every rank
        entries = {"error": f"{type(err).__name__}: {err}"}
        if out is None:
            raise
    if out is not None:
        out.put(entries)
    return entries


class AsyncSaves:
    """The checkpoints being written in the background (``--async-save``), on megatron-core's
    AsyncCallsQueue: each save's writer is a process forked from the trainer (on GPU after the
    copy to host memory; on CPU the fork's copy-on-write snapshot is the copy), and a save is
    finalized (manifest, tracker, rotation) only once every rank's writer has finished - the
    queue's completion check is a collective, so all ranks agree. Call :meth:`poll` on every
    rank after each iteration (it costs one all-reduce while a save is pending, nothing
    otherwise) and :meth:`wait` before exiting."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.paths: dict[int, str] = {}

    def schedule(self, request, path: str) -> None:
        self.paths[self.queue.schedule_async_request(request)] = path

    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def poll(self, blocking: bool = False) -> list[str]:
        """The paths of the checkpoints finalized now (every rank must call it)."""
        done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        return [self.paths.pop(i) for i in done]

    def wait(self) -> list[str]:
        """Finalizes every pending save, waiting for the writers."""
        return self.poll(blocking=True)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, args,
                    consumed_samples: int = 0, keep_last: int | None = None,
                    async_saves: AsyncSaves | None = None,
                    imported_from: str | None = None) -> str:
    """Writes a checkpoint of ``iteration``; once every rank's files are written, rank 0 puts
    the ranks' manifest entries together and then moves the tracker to it (the
    ``crash-in-save`` test fault stops the process in between: ``training/faults.py``).

    With ``async_saves`` the shards are written in the background and this returns once they
    are scheduled; the manifest and tracker follow when :meth:`AsyncSaves.poll` finalizes the
    save. A save still pending from before is finalized first. ``imported_from``
    (``megatron_nitp/hf.py``): a weights-only checkpoint converted from that Hugging Face
    folder, without optimizer and scheduler (loadable with ``--finetune`` only)."""
    if async_saves is not None:
        async_saves.wait()
    verify = getattr(args, "verify", True)
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
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    request = _save_request(state, path)
    own = {}  # this rank's files: {path relative to the checkpoint: manifest entry}
    if rank == 0 and os.path.exists(os.path.join(path, "common.pt")):
        own["common.pt"] = _entry(os.path.join(path, "common.pt"), verify)  # 0.16-0.18
    # the per-rank RNG states (still before the manifest and the tracker)
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    rng_file = os.path.join("rng", f"rank_{rank:05d}.pt")
    torch.save(_rng_state(), os.path.join(path, rng_file))
    own[rng_file] = _entry(os.path.join(path, rng_file), verify)
    if rank == 0:
        with open(os.path.join(path, META), "w") as f:
            json.dump(_meta(iteration, consumed_samples, args, imported_from), f, indent=2)
        own[META] = _entry(os.path.join(path, META), verify)
    finish = functools.partial(_finalize, root, path, iteration, own, keep_last, verify)
    if async_saves is None:
        args_ = list(request.async_fn_args)
        if request.preload_fn is not None:  # device-to-host copy (GPU); no copy on CPU
            args_[1] = request.preload_fn()
        if request.async_fn is not None:
            own.update(_write_and_checksum(request.async_fn, path, verify, False, None, *args_,
                                           **request.async_fn_kwargs))
        torch.distributed.barrier()
        for fn in request.finalize_fns:
            fn()
        finish(None)
        return path
    out = None
    if request.async_fn is not None:
        import multiprocessing

        out = multiprocessing.get_context("fork").Queue()
        stall = faults.due("stall-async-write", iteration)
        request = request._replace(async_fn=functools.partial(
            _write_and_checksum, request.async_fn, path, verify, stall, out))
    request.add_finalize_fn(functools.partial(finish, out))
    async_saves.schedule(request, path)
    return path


def _meta(iteration: int, consumed_samples: int, args, imported_from: str | None = None) -> dict:
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
    if imported_from:
        meta["imported_from"] = imported_from
    return meta


def _finalize(root: str, path: str, iteration: int, own: dict, keep_last: int | None,
              verify: bool, out) -> None:
    """Runs on every rank once every rank's shards are written (and megatron-core has written
    its metadata): gathers the ranks' manifest entries to rank 0, which adds the files it wrote
    during finalization, writes the manifest and then moves the tracker."""
    if out is not None:
        written = out.get(timeout=600)
        if "error" in written:
            raise CheckpointError(f"writing {path} failed on rank "
                                  f"{torch.distributed.get_rank()}: {written['error']}")
        own = {**own, **written}
    if faults.due("crash-in-save", iteration):
        os._exit(faults.EXIT_CRASH_IN_SAVE)
    rank = torch.distributed.get_rank()
    gathered = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(own, gathered, dst=0)
    if rank == 0:
        manifest = {}
        for entries in gathered:
            manifest.update(entries)
        # megatron-core's metadata (.metadata, metadata.json), written by rank 0 in the
        # finalization; any other file nobody reported is checksummed here too, so the
        # manifest always covers the whole folder (a listing, not a read of the others' files)
        for rel in _files(path):
            if rel not in manifest:
                manifest[rel] = _entry(os.path.join(path, rel), verify)
        manifest = dict(sorted(manifest.items()))
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


def _share(manifest: dict, rank: int, world: int) -> list[str]:
    """The files ``rank`` verifies: the manifest split into ``world`` parts of about equal
    bytes (largest first, each to the least loaded rank; the same split on every rank)."""
    loads = [0] * world
    mine = []
    for rel in sorted(manifest, key=lambda r: (-manifest[r]["bytes"], r)):
        who = loads.index(min(loads))
        loads[who] += manifest[rel]["bytes"]
        if who == rank:
            mine.append(rel)
    return mine


def _check_file(path: str, rel: str, expected: dict, verify: bool) -> str | None:
    file = os.path.join(path, rel)
    if not os.path.exists(file):
        return f"checkpoint file missing: {file}"
    size = os.path.getsize(file)
    if size != expected["bytes"]:
        return (f"checkpoint file truncated: {file} has {size} bytes, {expected['bytes']} were "
                "written")
    if verify and "crc32" in expected:
        STATS["load_verify_bytes"] += size
        if _crc32(file) != expected["crc32"]:
            return f"checkpoint file corrupted (CRC32 mismatch): {file}"
    return None


def verify_checkpoint(path: str, verify: bool = True) -> None:
    """Raises CheckpointError naming the first missing, truncated or corrupted file.

    In a distributed run every rank must call it: each checks its byte-balanced share of the
    files (:func:`_share`) and the verdicts are gathered, so the bytes each rank reads fall as
    the ranks grow and all ranks raise the same error. Without ``verify`` (``--no-verify``)
    only the files' presence and sizes are checked."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{path} is incomplete: {MANIFEST} is missing (the save never "
                              "finished); use an earlier checkpoint or --load-fallback.")
    with open(manifest_path) as f:
        manifest = json.load(f)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                   if distributed else (0, 1))
    errors = {}
    for rel in _share(manifest, rank, world):
        error = _check_file(path, rel, manifest[rel], verify)
        if error:
            errors[rel] = error
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, errors)
        errors = {k: v for part in everyone for k, v in part.items()}
    if errors:
        first = errors[min(errors)]
        more = f" (and {len(errors) - 1} more file(s))" if len(errors) > 1 else ""
        raise CheckpointError(first + more)


def find_checkpoint(root: str, fallback: bool = False, verify: bool = True) -> str:
    """The latest checkpoint under ``root``, verified; with ``fallback`` the newest complete
    and intact one if the latest is not. In a distributed run every rank must call it."""
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
            verify_checkpoint(path, verify)
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
            if section == "model" and key in LATER_MODEL_FLAGS and key not in meta.get("model", {}):
                continue
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
    rebuild it from their model and NITP sections.

    The speed and memory settings (``PerformanceConfig``: communication overlap, grouped-GEMM
    experts, fused permutation, FP8, fusions, recomputation) are dropped: they change how the
    training cluster computed, not the weights (megatron-core's TEGroupedMLP and SequentialMLP
    share their checkpoint keys), and the machine that exports or evaluates may lack their
    kernels (a checkpoint trained with ``--moe-grouped-gemm`` on GPUs is read by SequentialMLP,
    whose expert names the Hugging Face mapping knows). Overlapped parameter gathering also
    needs the distributed optimizer, which one process does not use. The model computes in
    fp32 (a bf16 checkpoint's weights are exact in fp32): evaluations do not change with the
    training precision."""
    import dataclasses

    from megatron_nitp.config import RunConfig, complete, preset_config, resolve
    from megatron_nitp.config.schema import PerformanceConfig

    if "config" in meta:
        config = RunConfig.from_dict(meta["config"])
    else:
        model, nitp, extra = meta["model"], meta["nitp"], meta.get("export", {})
        flat = {k: v for k, v in {**model, **extra}.items()
                if k not in ("padded_vocab_size", "moe_layer_pattern") and v is not None}
        flat.update({("nitp" if k == "enabled" else f"nitp_{k}"): v for k, v in nitp.items()})
        config = preset_config("tiny-dense", **flat)
    config = dataclasses.replace(config, performance=PerformanceConfig())
    config = complete(config.replace(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=1, expert_tensor_parallel_size=None,
        context_parallel_size=1, sequence_parallel=False,
        use_distributed_optimizer=False, decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None, micro_batch_size=1, global_batch_size=1,
        load=None, save=None, bf16=False, fp16=False))
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
    path = find_checkpoint(root, fallback, getattr(args, "verify", True))
    meta = read_meta(path)
    if meta.get("imported_from") and not weights_only and optimizer is not None:
        raise CheckpointError(
            f"{path} was imported from {meta['imported_from']} (weights only: no optimizer, "
            "scheduler or data position to resume): load it with --finetune.")
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
