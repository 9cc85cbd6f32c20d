"""Checkpoints that survive pre-emption, crashes and layout changes.

Everything is written with megatron-core's ``dist_checkpointing`` (sharded, so any TP/PP/DP
layout can reload it; the data-parallel replicas share the writing) plus a few small files::

    SAVE/iter_0000300/                 dist_checkpointing: model (projector included), optimizer,
                                       LR scheduler
    SAVE/iter_0000300/rng/rank_*.pt    per-rank RNG states (Python, NumPy, torch, megatron tracker)
    SAVE/iter_0000300/probe/dp_*_cp_*.pt   the geometry probe's first states, per DP x CP rank
                                       (``save_checkpoint``'s ``rank_files``; training/probe.py)
    SAVE/iter_0000300/nitp.json        iteration, consumed samples, layout, the run config
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

The package, by purpose: ``files.py`` (the folders, tracker, manifest and checksums, their
atomic writes, verification and the start checks of ``--save``), ``meta.py`` (``nitp.json``:
what it records, reading older checkpoints' forms, the checks a load makes against it),
``state.py`` (the sharded model and optimizer state, the RNG states), ``save.py`` and
``load.py``. The run config a checkpoint stores is read back by
``megatron_nitp/config/stored.py`` (export and evaluation need no training code for it). This
module names what the rest of the code uses.
"""

from megatron_nitp.training.checkpoint.files import (MANIFEST, STATS, TRACKER, CheckpointError,
                                                     check_save_folder, checkpoint_dir,
                                                     find_checkpoint, holds_nothing,
                                                     read_tracker, verify_checkpoint)
from megatron_nitp.training.checkpoint.load import load_checkpoint, load_model_weights
from megatron_nitp.training.checkpoint.meta import (META, MEGATRON_LM, check_compatible,
                                                    check_optimizer_layout, imported_source,
                                                    model_meta, read_meta,
                                                    saved_consumed_samples, saved_model,
                                                    saved_nitp, trained_precision)
from megatron_nitp.training.checkpoint.save import (AsyncSaves, describe_save_failure,
                                                    save_checkpoint)
from megatron_nitp.training.checkpoint.state import optimizer_format

__all__ = ["AsyncSaves", "CheckpointError", "MANIFEST", "META", "MEGATRON_LM", "STATS",
           "TRACKER", "check_compatible", "check_optimizer_layout", "check_save_folder",
           "checkpoint_dir", "describe_save_failure", "find_checkpoint", "holds_nothing",
           "imported_source", "load_checkpoint", "load_model_weights", "model_meta",
           "optimizer_format", "read_meta", "read_tracker", "save_checkpoint",
           "saved_consumed_samples", "saved_model", "saved_nitp", "trained_precision",
           "verify_checkpoint"]
