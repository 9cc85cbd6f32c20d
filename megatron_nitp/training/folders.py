"""The folders a run writes, probed at start: a folder that cannot be written is named in one
line before the data and the model are built, not found by a traceback at the first write."""

from __future__ import annotations

import os

import torch


def probe_writable(root: str, what: str, flag: str, keep: bool = True) -> str | None:
    """Creates ``root`` and writes and removes a probe file in it; the failure in one line
    naming ``what`` the folder is and the ``flag`` that sets it, else None. ``keep=False``
    removes the folders it created, so that a run refused by a later check has written
    nothing."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    created, path = [], os.path.abspath(root)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        created.append(path)
        path = os.path.dirname(path)
    probe = os.path.join(root, f".write-probe-rank{rank}-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as err:
        return (f"the {what} {root} is not writable ({err.strerror or err}): give a {flag} "
                "folder this user can write, or fix its permissions")
    finally:
        for folder in created if not keep else ():  # deepest first
            try:
                os.rmdir(folder)
            except OSError:
                pass
    return None


def check_output_folders(run_dir: str | None, tensorboard_dir: str | None,
                         data_cache_path: str | None) -> str | None:
    """Rank 0 writes the run folder, the TensorBoard events and megatron-core's dataset index
    cache: it probes each (given) folder, leaving none it created, and every rank returns the
    same verdict (one gather), so that all stop together. None when all are writable."""
    problem = None
    if torch.distributed.get_rank() == 0:
        for what, flag, path in (("run folder", "--run-dir", run_dir),
                                 ("TensorBoard folder", "--tensorboard-dir", tensorboard_dir),
                                 ("data cache folder", "--data-cache-path", data_cache_path)):
            if path and problem is None:
                problem = probe_writable(path, what, flag, keep=False)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, problem)
    return next((p for p in everyone if p), None)
