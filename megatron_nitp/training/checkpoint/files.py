"""A checkpoint folder's files: the ``iter_*`` folders, the tracker, the manifest of sizes and
CRC32s, their atomic writes, the verification at load and the start checks of ``--save``.

Nothing here knows what the files hold (``state.py``, ``meta.py``) or how they are written
(``save.py``): a checkpoint is complete once its manifest exists, and latest once the tracker
names it; both are written to a temporary name and moved, so a crash leaves the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import torch

from megatron_nitp.training.folders import probe_writable
from megatron_nitp.training.megatron_lm_folder import is_megatron_lm_checkpoint

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"


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


def manifest_entry(path: str, verify: bool) -> dict:
    """One manifest entry for a file this process has just written: its size and, unless
    ``--no-verify``, its CRC32 (a read of a file still in the page cache)."""
    size = os.path.getsize(path)
    STATS["written_bytes"] += size
    if not verify:
        return {"bytes": size}
    STATS["save_checksum_bytes"] += size
    return {"bytes": size, "crc32": _crc32(path)}


def listed_files(path: str) -> list[str]:
    """Every file under checkpoint ``path`` (relative), the manifest aside."""
    out = []
    for base, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), path)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(path: str, manifest: dict) -> None:
    """Writes checkpoint ``path``'s manifest (sorted) under a temporary name and moves it in
    place: the checkpoint is complete from that move on."""
    with open(os.path.join(path, MANIFEST + ".tmp"), "w") as f:
        json.dump(dict(sorted(manifest.items())), f, indent=1)
    os.replace(os.path.join(path, MANIFEST + ".tmp"), os.path.join(path, MANIFEST))


def write_tracker(root: str, iteration: int) -> None:
    """Makes ``iteration`` the latest checkpoint of ``root``: the tracker is written under a
    temporary name and moved, so a crash leaves the previous one."""
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


def rotate(root: str, keep_last: int, newest: int) -> None:
    """Deletes the complete checkpoints older than the newest ``keep_last`` among those up to
    ``newest``, the one just written (which the tracker now names). Checkpoints numbered above
    it are never candidates: they are not this run's (another run's, left in the folder, or
    a newer one this run resumed past with --load-fallback), and ranking by number would keep
    them and delete the run's own - the checkpoint just written included. ``keep_last`` below
    1 deletes nothing (``--save-keep-last`` refuses it: ``own[:-k]`` would take the newest)."""
    own = [i for i in _complete_iterations(root) if i <= newest]
    for iteration in (own[:-keep_last] if keep_last >= 1 else []):
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


def check_save_folder(root: str, checkpoint, needed_bytes: float | None = None) -> list[str]:
    """The start checks of the checkpoint folder, on every rank (the verdicts are gathered, so
    all ranks stop with the same one-line CheckpointError), before the model is built;
    ``checkpoint`` is the run's ``CheckpointConfig`` (``--load``, ``--finetune``):

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
    error = probe_writable(root, "checkpoint folder", "--save")
    if error is None:
        held = held_checkpoints(root)
        loads_here = _same_folder(checkpoint.load, root)
        resumes = loads_here and not checkpoint.finetune
        if held and not resumes:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            how = ("--finetune starts a new run at iteration 0" if loads_here else
                   f"--load {checkpoint.load} resumes another folder's run" if checkpoint.load
                   else "this run starts from scratch")
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
