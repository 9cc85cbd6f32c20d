"""Writing a checkpoint: every rank's shards through megatron-core's ``dist_checkpointing``
(the data-parallel replicas share the writing), its RNG state and, on rank 0, ``nitp.json``;
each rank checksums what it wrote; once every rank has written, rank 0 writes the manifest
and moves the tracker (``files.py``). With ``--async-save`` the shards are written by a forked
process while training goes on (:class:`AsyncSaves`). A failure on any rank stops every rank
with the same one line, naming the cause (a full disk, a read-only folder)."""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import shutil
import time

import torch
from megatron.core import dist_checkpointing

from megatron_nitp.training import faults
from megatron_nitp.training.checkpoint.files import (CheckpointError, checkpoint_dir,
                                                     listed_files, manifest_entry, rotate,
                                                     write_manifest, write_tracker)
from megatron_nitp.training.checkpoint.meta import META, build_meta
from megatron_nitp.training.checkpoint.state import (optimizer_format, rng_state, schedules,
                                                     sharded_state)


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
        entries = {os.path.relpath(b[0], root): manifest_entry(b[0], verify) for b in buckets}
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


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, config,
                    consumed_samples: int = 0, keep_last: int | None = None,
                    async_saves: AsyncSaves | None = None,
                    imported_from: str | None = None,
                    imported_format: str | None = None,
                    rank_files: dict[str, object] | None = None) -> str:
    """Writes a checkpoint of ``iteration`` of a run of ``config`` (its resolved ``RunConfig``,
    stored in nitp.json); once every rank's files are written, rank 0 puts the ranks'
    manifest entries together and then moves the tracker to it (the ``crash-in-save`` test
    fault stops the process in between: ``training/faults.py``).

    With ``async_saves`` the shards are written in the background and this returns once they
    are scheduled; the manifest and tracker follow when :meth:`AsyncSaves.poll` finalizes the
    save. A save still pending from before is finalized first. ``imported_from``
    (``megatron_nitp/hf.py``): a weights-only checkpoint converted from that Hugging Face
    folder, without optimizer and scheduler (loadable with ``--finetune`` only); with
    ``imported_format`` :data:`MEGATRON_LM` (``megatron_nitp/megatron_lm.py``) converted from
    that Megatron-LM run, whose iteration and consumed samples it keeps: a resume continues
    them with a fresh optimizer. ``rank_files``: this rank's own small state that lives outside
    megatron-core's sharded state, ``{path relative to the checkpoint: object}``, each
    ``torch.save``'d beside the RNG state before this returns (also with ``async_saves``), so
    the checkpoint holds it once it is complete and the objects may change afterwards; the
    geometry probe's first states (``training/probe.py``), which the probe reads back."""
    if async_saves is not None:
        async_saves.wait()
    verify = config.checkpoint.verify
    path = checkpoint_dir(root, iteration)
    rank = torch.distributed.get_rank()
    fmt = optimizer_format(config, optimizer)
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
    state = sharded_state(model, optimizer, is_loading=False, fmt=fmt)
    if scheduler is not None:
        state["scheduler"] = schedules().schedule_state(scheduler)
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
            own["common.pt"] = manifest_entry(os.path.join(path, "common.pt"), verify)  # 0.16-0.18
        # the per-rank RNG states (still before the manifest and the tracker)
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        rng_file = os.path.join("rng", f"rank_{rank:05d}.pt")
        torch.save(rng_state(), os.path.join(path, rng_file))
        own[rng_file] = manifest_entry(os.path.join(path, rng_file), verify)
        for rel, obj in (rank_files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
            torch.save(obj, os.path.join(path, rel))
            own[rel] = manifest_entry(os.path.join(path, rel), verify)
        if rank == 0:
            meta = build_meta(iteration, consumed_samples, torch.distributed.get_world_size(),
                              config, fmt, imported_from, imported_format)
            with open(os.path.join(path, META), "w") as f:
                json.dump(meta, f, indent=2)
            own[META] = manifest_entry(os.path.join(path, META), verify)
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
            for rel in listed_files(path):
                if rel not in manifest:
                    manifest[rel] = manifest_entry(os.path.join(path, rel), verify)
            write_manifest(path, manifest)
            write_tracker(root, iteration)
            if keep_last:
                rotate(root, keep_last, iteration)
        except OSError as err:  # the manifest or the tracker: the tracker did not move
            error = describe_save_failure(root, path, err)
    _agree(error)


