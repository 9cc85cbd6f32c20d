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

import errno
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
from megatron_nitp.training.megatron_lm_folder import is_megatron_lm_checkpoint
from megatron_nitp.training.model import as_chunks, unwrap

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
#: NITP fields added later, with the value a checkpoint that does not store them trained with
LATER_NITP_FIELDS = {"document_boundary": "allow", "extra_target_layers": [], "horizon": 1,
                     "cosine_reg_weight": 0.0}


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


def optimizer_format(args, optimizer=None) -> str:
    """The optimizer format a save of this run writes: Megatron-LM's choice. With the
    distributed optimizer ``dp_reshardable`` by default (each rank holds and writes only its
    own shard, so host memory and bytes per rank fall as DP grows) and ``fully_reshardable``
    with ``--dist-ckpt-optim-fully-reshardable`` (each rank gathers its data-parallel group's
    whole state: for a save that another TP/PP/EP will load); the plain optimizer's state is
    always per parameter (``model_space``)."""
    distributed = (_is_distributed_optimizer(optimizer) if optimizer is not None
                   else getattr(args, "use_distributed_optimizer", False))
    if not distributed:
        return MODEL_SPACE
    if getattr(args, "dist_ckpt_optim_fully_reshardable", False):
        return FULLY_RESHARDABLE
    return DP_RESHARDABLE


def _sharded_state(model, optimizer, is_loading: bool, fmt: str = FULLY_RESHARDABLE) -> dict:
    """megatron-core's sharded state of the model and optimizer; ``fmt`` is the distributed
    optimizer's format (:func:`optimizer_format` at save, the checkpoint's at load; by default
    the layout-independent per-parameter form, which tests/parallel_harness.py compares across
    layouts). megatron-core's own default (flattened ranges, "fully_sharded_model_space") cannot
    be saved at DP >= 2, so a distributed optimizer always names its format."""
    model_sd = _model_sharded_state(model)
    state = {"model": model_sd}
    if optimizer is not None:
        kwargs = {}
        if _is_distributed_optimizer(optimizer):
            kwargs["metadata"] = {"distrib_optim_sharding_type": fmt}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                         **kwargs)
    return state


def _model_sharded_state(model) -> dict:
    """The model's sharded state; under the interleaved schedule one entry per chunk. The
    tensors' keys are global (layer numbers, TP offsets), so a checkpoint written with any
    chunking loads into any other: the entries only group them."""
    chunks = as_chunks(model)
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict(prefix="model.")
    return {f"chunk{i}": unwrap(c).sharded_state_dict(prefix="model.")
            for i, c in enumerate(chunks)}


def _load_model_state(model, loaded: dict) -> None:
    """Loads :func:`_model_sharded_state`'s filled entries into the (unwrapped) chunks."""
    chunks = as_chunks(model)
    parts = [loaded] if len(chunks) == 1 else [loaded[f"chunk{i}"] for i in range(len(chunks))]
    for chunk, part in zip(chunks, parts):
        unwrap(chunk).load_state_dict({k[len("model."):]: v for k, v in part.items()
                                       if k.startswith("model.")}, strict=False)


def _layout(args) -> dict:
    """The parallel layout a checkpoint was written at (nitp.json "layout")."""
    return {"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size,
            "ep": args.expert_model_parallel_size,
            # expert TP: None means "as TP"; stored resolved so equal layouts compare equal
            "etp": (getattr(args, "expert_tensor_parallel_size", None)
                    or args.tensor_model_parallel_size),
            "cp": getattr(args, "context_parallel_size", 1),
            "vpp": getattr(args, "virtual_pipeline_model_parallel_size", None),
            "dp": getattr(args, "data_parallel_size", None)}


def check_optimizer_layout(meta: dict, args, path: str) -> None:
    """Refuses, before anything is read, to resume a ``dp_reshardable`` optimizer state at a
    layout it cannot serve: its tensors follow the distributed optimizer's gradient buckets of
    one TP/PP/EP/CP rank (the keys carry the data-parallel group's index), so only DP may
    change. Checkpoints that do not record their format were written ``fully_reshardable``."""
    saved = meta.get("optimizer_format", FULLY_RESHARDABLE)
    if saved != DP_RESHARDABLE or resumes_fresh_optimizer(meta):
        return
    ours, theirs = _layout(args), meta.get("layout", {})
    changed = [f"{k.upper()} {theirs[k]} -> {ours[k]}" for k in DP_RESHARDABLE_FIXED
               if k in theirs and theirs[k] != ours[k]]
    if not getattr(args, "use_distributed_optimizer", False):
        changed.append("distributed optimizer on -> off")
    if changed:
        raise CheckpointError(
            f"{path} holds the distributed optimizer's state in the dp_reshardable form, which "
            f"only a run at the same TP/PP/EP/CP with --use-distributed-optimizer can resume "
            f"({', '.join(changed)}): resave it at the old layout with "
            "--dist-ckpt-optim-fully-reshardable (resume there with --exit-interval 1: one "
            "more iteration, then a fully reshardable checkpoint), or load the weights only "
            "with --finetune.")


def _errnos(err: BaseException) -> tuple[set, str]:
    """The errno values and the text of an exception and of those it wraps (megatron-core and
    torch's checkpointing wrap the writer's OSError in RuntimeError / CheckpointException)."""
    codes, texts, seen = set(), [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            codes.add(err.errno)
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    return codes, " ".join(texts)


def describe_save_failure(root: str, path: str, err: BaseException) -> str:
    """One line saying why writing checkpoint ``path`` failed and what to do. A full disk
    shows as ENOSPC, or as torch's zip writer's ``unexpected pos N vs M`` (torch.save into a
    full file system), or megatron-core's "Worker failure"; a read-only or foreign folder as
    EACCES/EPERM/EROFS."""
    codes, text = _errnos(err)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    if errno.ENOSPC in codes or errno.EDQUOT in codes or "No space left" in text \
            or "unexpected pos" in text or "Disk quota" in text:
        try:
            free = f" ({shutil.disk_usage(root).free / 1024**3:.2f} GiB free now)"
        except OSError:
            free = ""
        return (f"saving {path} failed: no space left on the device of {root}{free}: free "
                "space or give another --save folder, then resume with --load (the previous "
                "checkpoint is still the latest)")
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS} or "Permission denied" in text \
            or "Read-only file system" in text:
        return (f"saving {path} failed: permission denied ({first}): make {root} writable "
                "for this user or give another --save folder (the previous checkpoint is still "
                "the latest)")
    return (f"saving {path} failed: {type(err).__name__}: {first} (the previous checkpoint is "
            "still the latest)")


def _agree(error: str | None) -> None:
    """Every rank raises the same CheckpointError if any rank's ``error`` is set (one
    all-gather): a failure on one rank must not leave the others waiting in a collective."""
    world = torch.distributed.get_world_size()
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, error)
    failed = [(rank, e) for rank, e in enumerate(everyone) if e]
    if failed:
        rank, message = failed[0]
        more = f"; {len(failed) - 1} other rank(s) failed too" if len(failed) > 1 else ""
        raise CheckpointError(f"{message} [rank {rank}{more}]")


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


def _raise_worker_failure(results) -> None:
    """megatron-core's writer does not raise: its worker processes put their exception (a
    full disk's OSError, say) in the results queue, which its finalization turns into a
    "Worker failure" on this rank alone. Look at the result (and put it back) so that the
    failure is known here, before any collective, and every rank can be told."""
    if results is None or not hasattr(results, "get"):
        return
    result = results.get()
    results.put(result)
    if isinstance(result, BaseException):
        raise result
    for part in (result.values() if isinstance(result, dict) else ()):
        if isinstance(part, BaseException):
            raise part


def _write_and_checksum(write, root: str, verify: bool, stall: bool, out, *args,
                        disk_full: bool = False, **kwargs):
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
        if disk_full and buckets:  # the disk-full-in-save test fault (faults.py)
            with open(buckets[0][0], "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), buckets[0][0])
        write(*args, **kwargs)
        _raise_worker_failure(args[2] if len(args) > 2 else None)
        entries = {os.path.relpath(b[0], root): _entry(b[0], verify) for b in buckets}
    except Exception as err:  # reported by the trainer at finalization, on every rank
        entries = {"error": describe_save_failure(os.path.dirname(root), root, err)}
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
                    imported_from: str | None = None,
                    imported_format: str | None = None) -> str:
    """Writes a checkpoint of ``iteration``; once every rank's files are written, rank 0 puts
    the ranks' manifest entries together and then moves the tracker to it (the
    ``crash-in-save`` test fault stops the process in between: ``training/faults.py``).

    With ``async_saves`` the shards are written in the background and this returns once they
    are scheduled; the manifest and tracker follow when :meth:`AsyncSaves.poll` finalizes the
    save. A save still pending from before is finalized first. ``imported_from``
    (``megatron_nitp/hf.py``): a weights-only checkpoint converted from that Hugging Face
    folder, without optimizer and scheduler (loadable with ``--finetune`` only); with
    ``imported_format`` :data:`MEGATRON_LM` (``megatron_nitp/megatron_lm.py``) converted from
    that Megatron-LM run, whose iteration and consumed samples it keeps: a resume continues
    them with a fresh optimizer."""
    if async_saves is not None:
        async_saves.wait()
    verify = getattr(args, "verify", True)
    path = checkpoint_dir(root, iteration)
    rank = torch.distributed.get_rank()
    fmt = optimizer_format(args, optimizer)
    error = None
    if rank == 0:
        try:
            if os.path.isdir(path):  # a leftover of an interrupted save of this same iteration
                shutil.rmtree(path)
            # empty: dist_checkpointing.save warns "Overwriting old incomplete / corrupted
            # checkpoint..." on a folder that holds anything
            os.makedirs(path)
        except OSError as err:
            error = describe_save_failure(root, path, err)
    _agree(error)
    state = _sharded_state(model, optimizer, is_loading=False, fmt=fmt)
    if scheduler is not None:
        state["scheduler"] = _optimizer().schedule_state(scheduler)
    own = {}  # this rank's files: {path relative to the checkpoint: manifest entry}
    try:
        # rank 0 writes megatron-core's common.pt in here, between collectives: if that fails,
        # that rank stops with the one line below and the launcher ends the others
        request = _save_request(state, path)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(describe_save_failure(root, path, err)) from err
    error = None
    try:  # this rank's own small files: a failure is agreed with the write's, below
        if rank == 0 and os.path.exists(os.path.join(path, "common.pt")):
            own["common.pt"] = _entry(os.path.join(path, "common.pt"), verify)  # 0.16-0.18
        # the per-rank RNG states (still before the manifest and the tracker)
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        rng_file = os.path.join("rng", f"rank_{rank:05d}.pt")
        torch.save(_rng_state(), os.path.join(path, rng_file))
        own[rng_file] = _entry(os.path.join(path, rng_file), verify)
        if rank == 0:
            with open(os.path.join(path, META), "w") as f:
                json.dump(_meta(iteration, consumed_samples, args, imported_from, fmt,
                                imported_format), f, indent=2)
            own[META] = _entry(os.path.join(path, META), verify)
    except (OSError, RuntimeError) as err:
        error = describe_save_failure(root, path, err)
    finish = functools.partial(_finalize, root, path, iteration, own, keep_last, verify)
    disk_full = faults.due("disk-full-in-save", iteration) and (
        rank == torch.distributed.get_world_size() - 1)
    if async_saves is None:
        if error is None:  # else this rank's small files failed already: nothing to write
            try:
                args_ = list(request.async_fn_args)
                if request.preload_fn is not None:  # device-to-host copy (GPU); none on CPU
                    args_[1] = request.preload_fn()
                if request.async_fn is not None:
                    own.update(_write_and_checksum(request.async_fn, path, verify, False, None,
                                                   *args_, disk_full=disk_full,
                                                   **request.async_fn_kwargs))
            except Exception as err:  # agreed below: every rank stops with the same line
                error = describe_save_failure(root, path, err)
        _agree(error)  # also the barrier before megatron-core's finalization
        for fn in request.finalize_fns:
            fn()
        finish()
        return path
    _agree(error)
    written = {}  # the writer's manifest entries, once it has finished
    if request.async_fn is not None:
        import multiprocessing

        out = multiprocessing.get_context("fork").Queue()
        stall = faults.due("stall-async-write", iteration)
        request = request._replace(async_fn=functools.partial(
            _write_and_checksum, request.async_fn, path, verify, stall, out,
            disk_full=disk_full))

        def collect():
            """First of the finalization: the writer's entries, and on every rank the same
            one-line error if any rank's writer failed (before megatron-core's finalization,
            whose collective would otherwise raise its own multi-line report)."""
            written.update(out.get(timeout=600))
            _agree(written.get("error"))

        request = request._replace(finalize_fns=[collect, *request.finalize_fns])
    request.add_finalize_fn(lambda: finish(written))
    async_saves.schedule(request, path)
    return path


def _meta(iteration: int, consumed_samples: int, args, imported_from: str | None = None,
          fmt: str = MODEL_SPACE, imported_format: str | None = None) -> dict:
    meta = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "world_size": torch.distributed.get_world_size(),
        "layout": _layout(args),
        # how the distributed optimizer's state is stored: load builds the same form
        "optimizer_format": fmt,
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
    if imported_format:
        meta["imported_format"] = imported_format
    return meta


def _finalize(root: str, path: str, iteration: int, own: dict, keep_last: int | None,
              verify: bool, written: dict | None = None) -> None:
    """Runs on every rank once every rank's shards are written (and megatron-core has written
    its metadata): gathers the ranks' manifest entries (``written``: those of the background
    writer) to rank 0, which adds the files it wrote during finalization, writes the manifest
    and then moves the tracker."""
    own = {**own, **(written or {})}
    if faults.due("crash-in-save", iteration):
        os._exit(faults.EXIT_CRASH_IN_SAVE)
    rank = torch.distributed.get_rank()
    gathered = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(own, gathered, dst=0)
    error = None
    if rank == 0:
        try:
            manifest = {}
            for entries in gathered:
                manifest.update(entries)
            # megatron-core's metadata (.metadata, metadata.json), written by rank 0 in the
            # finalization; any other file nobody reported is checksummed here too, so the
            # manifest always covers the whole folder (a listing, not a read of the others'
            # files)
            for rel in _files(path):
                if rel not in manifest:
                    manifest[rel] = _entry(os.path.join(path, rel), verify)
            manifest = dict(sorted(manifest.items()))
            with open(os.path.join(path, MANIFEST + ".tmp"), "w") as f:
                json.dump(manifest, f, indent=1)
            os.replace(os.path.join(path, MANIFEST + ".tmp"), os.path.join(path, MANIFEST))
            previous = read_tracker(root)
            if previous is not None and previous > iteration:
                # only a resume from an older checkpoint of this folder (--load-fallback past
                # a broken latest) gets here: runs of another lineage are refused at start
                print(f"> moving {os.path.join(root, TRACKER)} back from iteration {previous} "
                      f"to {iteration}: this run resumed from an older checkpoint of the "
                      "folder", flush=True)
            tmp = os.path.join(root, TRACKER + ".tmp")
            with open(tmp, "w") as f:
                f.write(str(iteration))
            os.replace(tmp, os.path.join(root, TRACKER))
            if keep_last:
                _rotate(root, keep_last, iteration)
        except OSError as err:  # the manifest or the tracker: the tracker did not move
            error = describe_save_failure(root, path, err)
    _agree(error)


def _probe_writable(root: str) -> str | None:
    """Creates ``root`` and writes and removes a probe file in it; the failure, in one line."""
    probe = os.path.join(root, f".write-probe-rank{torch.distributed.get_rank()}-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as err:
        return (f"the checkpoint folder {root} is not writable ({err.strerror or err}): give a "
                "--save folder this user can write, or fix its permissions")
    return None


def held_checkpoints(root: str) -> list[str]:
    """What makes ``root`` a folder of some run's checkpoints: its tracker and its complete
    ``iter_*`` folders (an incomplete one is a crashed save's leftover, nothing to keep)."""
    if not os.path.isdir(root):
        return []
    held = [TRACKER] if os.path.exists(os.path.join(root, TRACKER)) else []
    return held + [os.path.basename(checkpoint_dir(root, i)) for i in _complete_iterations(root)]


def holds_nothing(root: str) -> bool:
    """Whether ``--load ROOT`` has nothing to resume: the folder is absent or empty (the start
    checks' write probes aside). Such a run starts from scratch, as in Megatron-LM, so one
    command line (always ``--load`` of the run's folder) serves the first launch and every
    requeue. A folder with anything in it - a tracker, a crashed save's ``iter_*``, other files
    (a run folder given for its checkpoints folder) - is not nothing: it is loaded or refused,
    never silently trained over."""
    if not os.path.exists(root):
        return True
    if not os.path.isdir(root):
        return False
    return all(name.startswith(".write-probe-") for name in os.listdir(root))


def _same_folder(a: str | None, b: str) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def check_save_folder(root: str, args, needed_bytes: float | None = None) -> list[str]:
    """The start checks of the checkpoint folder, on every rank (the verdicts are gathered, so
    all ranks stop with the same one-line CheckpointError), before the model is built:

    - it is writable (created, a probe file written and removed), not found at the first save
      hours later;
    - it belongs to this run's lineage: a folder that holds checkpoints (a tracker or complete
      ``iter_*``) is written only by a run that resumes from it (``--load`` the same folder,
      not ``--finetune``); anything else would move its tracker back to this run's lower
      iterations and mix two runs' checkpoints (``--save-keep-last`` deleted the new run's own);
    - ``needed_bytes`` (one checkpoint, ``plan.checkpoint_bytes``): refused if the free space
      cannot hold one; a returned warning if it cannot hold two (a save is written beside the
      previous one before rotation removes anything).

    Returns the warnings (on every rank)."""
    error = _probe_writable(root)
    if error is None:
        held = held_checkpoints(root)
        resumes = _same_folder(getattr(args, "load", None), root) and not args.finetune
        if held and not resumes:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            how = ("--finetune starts a new run at iteration 0"
                   if _same_folder(getattr(args, "load", None), root) else
                   f"--load {args.load} resumes another folder's run" if args.load else
                   "this run starts from scratch")
            error = (f"the checkpoint folder {root} already holds checkpoints ({shown}) and "
                     f"{how}: its tracker would move back and --save-keep-last could delete "
                     f"this run's own checkpoints; give another --save folder, or --load {root} "
                     "to resume that run")
    warnings = []
    if error is None and needed_bytes:
        free = shutil.disk_usage(root).free
        gib = 1024**3
        if free < needed_bytes:
            error = (f"the checkpoint folder {root} has {free / gib:.2f} GiB free but one "
                     f"checkpoint of this run takes about {needed_bytes / gib:.2f} GiB "
                     "(--dry-run shows the figure): free space or give another --save folder")
        elif free < 2 * needed_bytes:
            warnings.append(
                f"warning: the checkpoint folder {root} has {free / gib:.2f} GiB free, less "
                f"than two checkpoints of this run (2 x {needed_bytes / gib:.2f} GiB): a save "
                "is written beside the previous one, so the second save may run out of space")
    world = torch.distributed.get_world_size()
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, error)
    errors = [e for e in everyone if e]
    if errors:
        raise CheckpointError(errors[0])
    return warnings


def _complete_iterations(root: str) -> list[int]:
    found = []
    for name in os.listdir(root):
        if name.startswith("iter_") and os.path.exists(os.path.join(root, name, MANIFEST)):
            found.append(int(name[len("iter_"):]))
    return sorted(found)


def read_tracker(root: str) -> int | None:
    """The iteration ``latest_checkpointed_iteration.txt`` names, None without a readable one."""
    try:
        with open(os.path.join(root, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _rotate(root: str, keep_last: int, newest: int) -> None:
    """Deletes the complete checkpoints older than the newest ``keep_last`` among those up to
    ``newest``, the one just written (which the tracker now names). Checkpoints numbered above
    it are never candidates: they are not this run's (another run's, left in the folder, or
    a newer one this run resumed past with --load-fallback), and ranking by number would keep
    them and delete the run's own - the checkpoint just written included."""
    own = [i for i in _complete_iterations(root) if i <= newest]
    for iteration in own[:-keep_last]:
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
        held = sorted(os.listdir(root)) if os.path.isdir(root) else []
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise CheckpointError(
            f"no checkpoint in {root}: {TRACKER} is missing" + (
                f" but the folder is not empty ({shown}): a crashed first save "
                "or not a checkpoint folder; give the folder that holds the tracker, or move "
                "these files away to start from scratch." if held else "."))
    if is_megatron_lm_checkpoint(root):
        raise CheckpointError(
            f"{root} is a Megatron-LM checkpoint, not one of ours: convert it with python "
            f"tools/import_checkpoint.py --megatron {root} --save NEW_FOLDER, then --load that")
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
SHAPE_NITP_FIELDS = ("projector", "projector_ffn_ratio", "extra_target_layers", "horizon")


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
            if section == "nitp" and key not in meta.get("nitp", {}):
                saved = LATER_NITP_FIELDS.get(key)
            saved, current = (list(v) if isinstance(v, tuple) else v for v in (saved, current))
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

    from megatron_nitp.config import (ONE_PROCESS_LAYOUT, RunConfig, complete, preset_config,
                                      resolve)
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
        **ONE_PROCESS_LAYOUT, use_distributed_optimizer=False, micro_batch_size=1,
        global_batch_size=1, load=None, save=None, bf16=False, fp16=False,
        dist_ckpt_optim_fully_reshardable=False))
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


def _optimizer():
    """training/optimizer.py, imported when a scheduler is saved or loaded (it imports
    megatron-core's optimizer, which export and evaluation never need)."""
    from megatron_nitp.training import optimizer

    return optimizer


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, args=None,
                    weights_only: bool = False, fallback: bool = False,
                    override: bool = False) -> dict:
    """Restores a checkpoint into this run (any parallel layout). Returns its meta data.

    ``weights_only`` (``--finetune``) loads the model alone: iteration, optimizer, scheduler,
    data position and RNG start fresh. RNG states are restored only when the layout (world
    size) is unchanged; a resharded run continues with the same weights and optimizer state.
    A Megatron-LM import (:func:`resumes_fresh_optimizer`) resumes its iteration and data
    position with a fresh optimizer, the scheduler stepped to that iteration.
    """
    path = find_checkpoint(root, fallback, getattr(args, "verify", True))
    meta = read_meta(path)
    fresh = resumes_fresh_optimizer(meta) and not weights_only
    if meta.get("imported_from") and not fresh and not weights_only and optimizer is not None:
        raise CheckpointError(
            f"{path} was imported from {meta['imported_from']} (weights only: no optimizer, "
            "scheduler or data position to resume): load it with --finetune.")
    if args is not None:
        # an import's NITP settings were the tool's defaults: like --finetune, only the
        # projector's shape must agree (the run's own NITP flags apply from here)
        check_compatible(meta, args, override, weights_only or fresh)
    loads_optimizer = optimizer is not None and not weights_only and not fresh
    if loads_optimizer and args is not None:
        check_optimizer_layout(meta, args, path)
    if loads_optimizer and args is not None and args.use_distributed_optimizer:
        _materialize_adam_state(optimizer)
    override_schedule = bool(getattr(args, "override_opt_param_scheduler", False))
    if loads_optimizer and scheduler is not None and not (
            override_schedule or getattr(args, "use_checkpoint_opt_param_scheduler", False)):
        saved = dist_checkpointing.load_common_state_dict(path).get("scheduler") or {}
        diffs = _optimizer().schedule_differences(scheduler, saved, meta.get("config"))
        if diffs:
            raise CheckpointError(
                f"the learning-rate schedule of {path} differs from this run's ("
                + "; ".join(diffs) + "): pass --override-opt_param-scheduler to follow this "
                "command line's schedule from the checkpoint's iteration, or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's.")
    state = _sharded_state(model, optimizer if loads_optimizer else None, is_loading=True,
                           fmt=meta.get("optimizer_format", FULLY_RESHARDABLE))
    if scheduler is not None and not weights_only and not fresh:
        state["scheduler"] = _optimizer().schedule_state(scheduler)
    loaded = dist_checkpointing.load(state, path, strict="assume_ok_unexpected")
    _load_model_state(model, loaded["model"])
    if weights_only or optimizer is None or fresh:
        if optimizer is not None:
            optimizer.reload_model_params()
        if fresh and scheduler is not None:
            # no scheduler state stored: this run's schedule, at the checkpoint's iteration
            scheduler.step(increment=meta["iteration"])
        return meta
    optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        _optimizer().load_schedule(scheduler, loaded["scheduler"], meta.get("config"),
                                   override_schedule)
    rank_file = os.path.join(path, "rng", f"rank_{torch.distributed.get_rank():05d}.pt")
    if meta.get("world_size") == torch.distributed.get_world_size() and os.path.exists(rank_file):
        _set_rng_state(torch.load(rank_file, weights_only=False))
    return meta


def load_model_weights(root: str, model) -> int:
    """Model weights of the latest checkpoint under ``root`` (any layout); its iteration."""
    return load_checkpoint(root, model, weights_only=True)["iteration"]
