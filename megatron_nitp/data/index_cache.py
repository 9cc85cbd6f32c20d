"""The dataset index cache that every rank of a job reads: one folder for all nodes, built once.

megatron-core's GPTDataset builds its document, sample and shuffle indices on global rank 0 and
writes them to ``--data-cache-path``; the other ranks wait at a barrier and then read them.
Two things go wrong on clusters, silently or late:

- The folder is not the same on every node (a path inside each node's container, a node-local
  scratch disk): the other nodes find no index and fail with FileNotFoundError after the build.
  :func:`check_shared` proves it before any data work: rank 0 writes a token file, the first
  rank of every node reads it, and a node that does not see it is named.
- The first run on a large corpus (the paper's ~330B tokens) builds the index for longer than
  the collective timeout (``--distributed-timeout-minutes``, 10 by default), so the waiting
  ranks time out. Under :func:`rank0_builds_first` the others wait for rank 0 on a group of
  their own, under ``--dataset-build-timeout-minutes``, saying what they wait for;
  ``tools/build_index.py`` builds the index before the job, from the job's own flags.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
import uuid
import torch

#: Seconds a rank waits silently for rank 0's index build before it says what it waits for.
QUIET_WAIT_S = 10.0
_PROBE = ".nitp-shared-check-"


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_shared(path: str) -> None:
    """Raises ValueError unless ``path`` is one folder for every node of the job: global rank 0
    writes a token file into it, and the first rank of each node (``LOCAL_RANK`` 0) must read
    that token. Every rank must call it (four small collectives); the file is removed."""
    rank = torch.distributed.get_rank()
    token = [uuid.uuid4().hex if rank == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    probe = os.path.join(path, _PROBE + token[0])
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write(token[0])
    torch.distributed.barrier()
    seen = True
    if _local_rank() == 0:
        try:
            with open(probe) as f:
                seen = f.read() == token[0]
        except OSError:
            seen = False
    verdicts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(verdicts, (seen, socket.gethostname(), rank))
    if rank == 0:  # every node has read it (the gather is after the reads)
        os.remove(probe)
    torch.distributed.barrier()
    blind = [f"{host} (rank {r})" for ok, host, r in verdicts if not ok]
    if blind:
        raise ValueError(
            f"--data-cache-path {path} is not one folder for all nodes: the file global rank 0 "
            f"wrote there is not visible on {', '.join(blind)}, so those nodes could not read "
            "the dataset index rank 0 builds; give a path on a file system every node mounts "
            "(e.g. the run folder on the shared file system, bind-mounted into the container).")


@contextlib.contextmanager
def rank0_builds_first(cache_dir: str, timeout_minutes: float):
    """Inside it, the default group's plain barriers wait on a gloo group created with
    ``timeout_minutes`` instead of the collective timeout: megatron-core's
    ``BlendedMegatronDatasetBuilder.build`` builds on global rank 0 first while every other rank
    waits in ``torch.distributed.barrier()``, and a first build on a large corpus may outlast
    ``--distributed-timeout-minutes``. A wait longer than :data:`QUIET_WAIT_S` is announced
    once per node; one past the timeout raises ValueError naming the fix. Every rank must enter
    it and run the same build inside."""
    group = torch.distributed.new_group(
        backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    rank = torch.distributed.get_rank()
    original = torch.distributed.barrier
    announced = [rank == 0 or _local_rank() != 0]

    def barrier(group_=None, async_op=False, device_ids=None):
        if group_ is not None or async_op or device_ids is not None:
            return original(group_, async_op=async_op, device_ids=device_ids)
        _wait(group, rank, cache_dir, timeout_minutes, original, announced)
        return None

    torch.distributed.barrier = barrier
    try:
        yield
    finally:
        torch.distributed.barrier = original
        torch.distributed.destroy_process_group(group)


def _wait(group, rank: int, cache_dir: str, timeout_minutes: float, original,
          announced: list) -> None:
    start = time.monotonic()
    work = original(group=group, async_op=True)
    try:
        while not work.is_completed():
            time.sleep(0.05)
            if not announced[0] and time.monotonic() - start > QUIET_WAIT_S:
                print(f"> waiting for global rank 0 to build the dataset index in {cache_dir} "
                      f"(up to --dataset-build-timeout-minutes {timeout_minutes:g}; "
                      "tools/build_index.py builds it before the job)", flush=True)
                announced[0] = True
        work.wait()
    except RuntimeError as err:
        raise ValueError(
            f"rank {rank} waited {(time.monotonic() - start) / 60:.1f} minutes for global rank "
            f"0 to build the dataset index in {cache_dir} ({err.__class__.__name__}): build it "
            "before the job with `python tools/build_index.py` and the job's flags, or raise "
            "--dataset-build-timeout-minutes.") from err
