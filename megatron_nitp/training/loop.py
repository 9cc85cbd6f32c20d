"""`pretrain()`: the whole run, from flags to a run folder with events, checkpoint and plot.

Order matters for users: every check that can fail (flags, data, tokenizer, layout) runs before
the model is built or a step is taken.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
from megatron.core import parallel_state

from megatron_nitp.config import RunConfig, resolve
from megatron_nitp.config.schema import LoggingConfig
from megatron_nitp.device import device
from megatron_nitp.device import name as device_name
from megatron_nitp.training import arguments
from megatron_nitp.training.exits import EXIT_NON_FINITE, ExitConditions, interrupt_deferred
from megatron_nitp.training.folders import check_output_folders
from megatron_nitp.training.initialize import initialize_distributed, set_seed
from megatron_nitp.training.logger import Throughput, TrainingLogger, is_logging_rank
from megatron_nitp.training.manual_gc import ManualGC
from megatron_nitp.training.memory import MemoryMonitor
from megatron_nitp.training.model import as_chunks, params_synced
from megatron_nitp.training.step import evaluate, train_step
from megatron_nitp.training.timers import GRAD_REDUCE, TIMERS, IntervalTimes


class UsageError(Exception):
    """Bad input found before any work: the message names the problem and the fix."""


def _barrier():
    torch.distributed.barrier()


def data_tokenizer(args: RunConfig) -> tuple[RunConfig, object]:
    """(config, tokenizer) of the run's data: ``--tokenizer-type``/``--tokenizer-model``
    through ``build_tokenizer``; without ``--data-path`` the built-in corpus and its
    SentencePiece model (prepared on first run); with ``--mock-data`` and no tokenizer named, a
    ``NullTokenizer`` of ``--vocab-size`` (default 4096), recorded in the config so a checkpoint
    says what it was trained on. Raises ValueError / FileNotFoundError naming the fix."""
    from megatron_nitp.config import DEFAULT_VOCAB_SIZE
    from megatron_nitp.data.corpus import prepare_default_corpus
    from megatron_nitp.data.tokenizer import DEFAULT_TOKENIZER_TYPE, build_tokenizer

    data = args.data
    default_kind = data.tokenizer_type == DEFAULT_TOKENIZER_TYPE and data.tokenizer_model is None
    if data.mock_data and default_kind:
        args = args.replace(tokenizer_type="NullTokenizer",
                            vocab_size=args.model.vocab_size or DEFAULT_VOCAB_SIZE)
    elif not data.mock_data and data.data_path is None and not data.train_data_path:
        if data.tokenizer_model is not None:
            raise ValueError("--tokenizer-model was given without --data-path: give both, or "
                             "neither to use the built-in corpus.")
        prefix, tokenizer_model = prepare_default_corpus()
        args = args.replace(data_path=(prefix,), tokenizer_model=tokenizer_model)
    elif data.tokenizer_model is None and data.tokenizer_type != "NullTokenizer":
        raise ValueError(f"--data-path needs --tokenizer-model (the {data.tokenizer_type} the "
                         "data was preprocessed with; see tools/train_tokenizer.py).")
    data = args.data  # the built-in corpus's paths, or the NullTokenizer, when set above
    return args, build_tokenizer(data.tokenizer_type, data.tokenizer_model, args.model.vocab_size,
                                 merge_file=data.merge_file)


def prepare_data(args: RunConfig):
    """The resolved config, the tokenizer and train/valid iterators for this data-parallel
    rank. Fails early on a missing or unreadable data path or tokenizer, or a vocabulary the
    model does not cover. Without ``--data-path`` the config names the built-in corpus; with
    ``--mock-data`` the data is megatron-core's mock GPT dataset (nothing read or cached)."""
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_nitp.data.datasets import (MicroBatchIterator, build_datasets,
                                             build_mock_datasets, check_data_prefixes,
                                             requested_samples)

    per_split = (args.data.train_data_path, args.data.valid_data_path, args.data.test_data_path)
    for blend in (per_split if args.data.train_data_path else (args.data.data_path,)):
        if blend:
            check_data_prefixes(get_blend_from_list(list(blend))[0])
    args, tokenizer = data_tokenizer(args)
    args = resolve(args, torch.distributed.get_world_size(), tokenizer.vocab_size)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    t, data = args.training, args.data
    num_samples = requested_samples(t.train_iters, t.global_batch_size, args.logging.eval_iters,
                                    args.logging.eval_interval)
    documents = dict(reset_position_ids=args.data.reset_position_ids,
                     reset_attention_mask=args.data.reset_attention_mask,
                     eod_mask_loss=args.data.eod_mask_loss)
    if args.data.mock_data:
        train_ds, valid_ds, _ = build_mock_datasets(tokenizer, args.model.seq_length, t.seed,
                                                    num_samples, **documents)
    else:
        if is_logging_rank():  # the index build can take minutes on a large corpus
            print(f"> building datasets: {num_samples[0]:,} training and {num_samples[1]:,} "
                  "validation samples", flush=True)
        train_ds, valid_ds, _ = build_datasets(
            list(data.data_path or ()), tokenizer, args.model.seq_length, t.seed, data.split,
            num_samples, data.data_cache_path,
            per_split=([list(p) if p else None for p in per_split] if args.data.train_data_path
                       else None),
            build_timeout_minutes=args.data.dataset_build_timeout_minutes, **documents,
        )
    # where documents end, for NITP targets that stop there (--nitp-document-boundary mask)
    eod = tokenizer.eod if args.nitp_config.masks_documents else None
    train = MicroBatchIterator(train_ds, args.training.micro_batch_size, dp_rank, dp_size, eod=eod)

    def valid():
        """The same held-out batches at every evaluation: comparable points on the curve."""
        return MicroBatchIterator(valid_ds, t.micro_batch_size, dp_rank, dp_size, eod=eod)

    evaluates = valid_ds is not None and len(valid_ds) and args.logging.eval_interval
    return args, tokenizer, train, (valid if evaluates else None)


def _summary(args, logger, wall: float) -> dict:
    """The run summary. "lm loss" and "nitp loss" are the means over the last logging
    interval (the iterations the last console line averaged, as Megatron-LM logs losses; the
    per-iteration values are in the history and TensorBoard); "nitp loss" is None for an NTP
    run. Validation loss and geometry are their last measured values. "peak memory" is the
    largest interval peak of the run, MB, max over ranks (GPU: max allocated; CPU: peak RSS;
    ``training/memory.py``). A run resumed into the same folder (``segments`` > 1) has the
    earlier segments' history too; "wall time" is the last segment's."""
    def last(key):
        points = logger.history.get(key)
        return points[-1][1] if points else None

    peaks = logger.history.get(logger.memory.peak_key) if logger.memory is not None else None

    return {
        "preset": args.preset if args.source("preset") != "default" or not
        arguments.kept_preset_fields(args) else f"{args.preset} (default; flags override "
        "part of it: see config.json)",
        "nitp": args.nitp_config.enabled,
        "iterations": args.training.train_iters,
        "wall time (s)": round(wall, 1),
        "segments": logger.segments,
        "lm loss": logger.interval_means.get("lm loss"),
        "nitp loss": logger.interval_means.get("nitp loss") if args.nitp_config.enabled else None,
        "validation lm loss": last("validation lm loss"),
        "effective rank": last("effective rank"),
        "cosine similarity": last("cosine similarity"),
        "peak memory (MB, max over ranks)": max(v for _, v in peaks) if peaks else None,
    }


def _print_summary(summary: dict, run_dir: str, span: tuple[int, int] | None) -> None:
    """The summary's rows; an NTP run shows no nitp loss. The losses are labelled as the means
    over the last logging interval (iterations ``span``) they are."""
    rows = {}
    for key, value in summary.items():
        if key == "nitp loss" and not summary["nitp"]:
            continue
        if key in ("lm loss", "nitp loss") and span is not None:
            key = f"{key} (mean of iterations {span[0]}-{span[1]})"
        rows[key] = value
    width = max(len(k) for k in rows)
    print("\n" + "=" * (width + 24))
    print(f" run summary ({run_dir})")
    print("-" * (width + 24))
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f" {key:<{width}}  {shown}")
    print("=" * (width + 24) + "\n", flush=True)


@dataclasses.dataclass
class Run:
    """Everything a training run holds after set-up."""

    args: RunConfig  # resolved: derived values filled
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    tokenizer: object
    train_iter: object
    valid_iter: object
    start_iteration: int = 0
    loaded: dict | None = None
    """the meta data (nitp.json) of the checkpoint ``--load`` read"""


def check_checkpoint_folders(args: RunConfig, save_dir: str) -> list[str]:
    """The start checks of the checkpoints (``args`` resolved for the world): the ``--save``
    folder is writable, belongs to this run's lineage and has room for a checkpoint
    (``checkpoint.check_save_folder``, with ``accounting.checkpoint.checkpoint_bytes`` of the
    resolved vocabulary), and a ``dp_reshardable`` checkpoint to resume fits this layout (its
    nitp.json, read before the model is built). Returns the warnings; raises UsageError in one
    line."""
    from megatron_nitp.training import checkpoint as ck
    from megatron_nitp.accounting.checkpoint import checkpoint_bytes

    try:
        warnings = ck.check_save_folder(save_dir, args.checkpoint, checkpoint_bytes(args))
        c = args.checkpoint
        latest = ck.read_tracker(c.load) if c.load and not c.finetune else None
        meta_file = os.path.join(ck.checkpoint_dir(c.load, latest), ck.META) if (
            latest is not None) else None
        if meta_file and os.path.exists(meta_file):
            with open(meta_file) as f:
                ck.check_optimizer_layout(json.load(f), args, os.path.dirname(meta_file))
    except ck.CheckpointError as err:
        raise UsageError(str(err)) from err
    return warnings


def nothing_to_load(args: RunConfig) -> bool:
    """Whether ``--load`` names an absent or empty folder (``checkpoint.holds_nothing``), in
    which case the run starts from scratch with a one-line warning (Megatron-LM's behaviour:
    the first launch and every requeue share one command line). All ranks decide together
    (one gather, before any rank's start checks write into the folder). Raises UsageError
    (exit code 1, Megatron-LM's) with ``--exit-on-missing-checkpoint``, and with
    ``--finetune``, whose point is the weights it names."""
    from megatron_nitp.training.checkpoint import holds_nothing

    if not args.checkpoint.load:
        return False
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, holds_nothing(args.checkpoint.load))
    if not all(everyone):
        return False
    c = args.checkpoint
    if c.exit_on_missing_checkpoint or c.finetune:
        why = ("--exit-on-missing-checkpoint is set" if c.exit_on_missing_checkpoint else
               "--finetune needs the weights it names")
        raise UsageError(f"no checkpoint in {c.load} (the folder is absent or empty) and "
                         f"{why}: check the --load path"
                         + (", or drop the flag to start from scratch"
                            if c.exit_on_missing_checkpoint else ""))
    if is_logging_rank():
        print(f"warning: no checkpoint in {args.checkpoint.load}: starting from scratch "
              "(--exit-on-missing-checkpoint stops instead)", flush=True)
    return True


def setup(args: RunConfig, save_dir: str | None = None, run_dir: str | None = None,
          tensorboard_dir: str | None = None) -> Run:
    """Process groups, checks, data, model, optimizer, and ``--load`` weights, in that order:
    every check that can fail runs before the model is built (``save_dir``: the checkpoint
    folder's, :func:`check_checkpoint_folders`; ``run_dir``, ``tensorboard_dir`` and the data
    cache: writable, ``folders.check_output_folders``). ``Run.args`` is the config resolved
    for this world and tokenizer."""
    initialize_distributed(
        args.parallel.tensor_model_parallel_size,
        args.parallel.pipeline_model_parallel_size,
        args.parallel.context_parallel_size,
        args.parallel.distributed_backend,
        args.parallel.expert_model_parallel_size,
        timeout_minutes=args.parallel.distributed_timeout_minutes,
        expert_tensor_parallel_size=args.parallel.expert_tensor_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
    )
    fresh = nothing_to_load(args)
    cache = args.data.data_cache_path if not args.data.mock_data else None
    problem = check_output_folders(run_dir, tensorboard_dir, cache)
    if problem:
        raise UsageError(problem)
    try:
        arguments.validate_data_cache(args)
        shared_cache = args.data.data_cache_path and not args.data.mock_data
        if shared_cache and torch.distributed.get_world_size() > 1:
            from megatron_nitp.data.index_cache import check_shared

            check_shared(args.data.data_cache_path)
        resolve(args, torch.distributed.get_world_size())  # the layout, before data work
        args, tokenizer, train_iter, valid_iter = prepare_data(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        raise UsageError(str(err)) from err
    # the save folder after the data (whose checks write nothing), before the model
    if save_dir is not None:
        for warning in check_checkpoint_folders(args, save_dir):
            if is_logging_rank():
                print(warning, flush=True)

    from megatron.core.distributed import finalize_model_grads

    from megatron_nitp.models.initialization import initialize_weights
    from megatron_nitp.training.checkpoint import CheckpointError, load_checkpoint
    from megatron_nitp.training.model import build_model_chunks, set_schedule_functions, wrap_model
    from megatron_nitp.training.optimizer import build_optimizer

    set_seed(args.training.seed)
    chunks = build_model_chunks(args)  # one per virtual stage under the interleaved schedule
    for chunk in chunks:
        # from the seed and global names: layout-invariant
        initialize_weights(chunk, args.training.seed)
    # a list of DDP-wrapped chunks under interleaving (megatron-core's convention), else one
    model = wrap_model(chunks if len(chunks) > 1 else chunks[0], args)
    optimizer, scheduler = build_optimizer(model, args.training, args.schedule, args.derived,
                                           count_zeros=args.logging.log_num_zeros_in_grad)
    set_schedule_functions(model, TIMERS.wrap(GRAD_REDUCE, finalize_model_grads),
                           optimizer.scale_loss if args.training.fp16 else None)
    start, meta = 0, None
    if args.checkpoint.load and not fresh:
        try:
            meta = load_checkpoint(args.checkpoint.load, model, optimizer, scheduler, args,
                                   weights_only=args.checkpoint.finetune,
                                   fallback=args.checkpoint.load_fallback,
                                   override=args.checkpoint.override_config)
        except CheckpointError as err:
            raise UsageError(str(err)) from err
        if not args.checkpoint.finetune:
            start = meta["iteration"]
            train_iter.consumed_samples = meta["consumed_samples"]
    return Run(args, model, optimizer, scheduler, tokenizer, train_iter, valid_iter, start, meta)


def check_wandb(logging: LoggingConfig) -> None:
    """``--wandb-project`` needs the optional wandb package: said before any work, on every
    rank (only rank 0 imports it later)."""
    import importlib.util

    if logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UsageError("--wandb-project needs the wandb package, which is not installed: "
                         "pip install wandb (WANDB_MODE=offline logs without a network), or "
                         "drop --wandb-project.")


#: Exit code of a run stopped by Ctrl-C (SIGINT), as a shell reports it (128 + 2).
EXIT_INTERRUPTED = 130


@dataclasses.dataclass
class Progress:
    """Where a run is, kept up to date so that Ctrl-C can say what is saved and how to go on."""

    run_dir: str | None = None
    save_dir: str | None = None
    iteration: int = 0
    logger: object = None


def resume_command(argv: list[str], save_dir: str, run_dir: str) -> str:
    """The command that continues this run: its own flags with ``--load SAVE_DIR`` and
    ``--run-dir RUN_DIR`` (so the history, summary.json and training.png continue in the same
    folder), under torchrun when the job has several processes."""
    import shlex

    flags, skip = [], False
    for flag in argv[1:]:
        if skip:
            skip = False
        elif flag in ("--load", "--run-dir"):
            skip = True
        elif not flag.startswith(("--load=", "--run-dir=")):
            flags.append(flag)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", f"--nproc-per-node={world}"] if world > 1 else ["python"]
    return shlex.join(launcher + [argv[0], *flags, "--load", save_dir, "--run-dir", run_dir])


def latest_checkpoint(save_dir: str | None) -> str | None:
    """The checkpoint ``--load SAVE_DIR`` would resume from (the tracker's), None if none."""
    from megatron_nitp.training.checkpoint import TRACKER, checkpoint_dir

    try:
        with open(os.path.join(save_dir, TRACKER)) as f:
            return checkpoint_dir(save_dir, int(f.read().strip()))
    except (OSError, TypeError, ValueError):
        return None


def interrupted(progress: Progress, argv: list[str]) -> int:
    """Ctrl-C: one line naming the last checkpoint and the command that resumes from it (no
    traceback: the interrupt was asked for); returns :data:`EXIT_INTERRUPTED`."""
    import sys

    if progress.logger is not None:
        progress.logger.close()  # the history and TensorBoard events up to the interrupt
    if is_logging_rank():
        where = (f"after iteration {progress.iteration}" if progress.run_dir
                 else "before training started")
        path = latest_checkpoint(progress.save_dir)
        if path is None:
            tail = "no checkpoint was saved (--save-interval N saves during training)"
        else:
            tail = (f"last checkpoint {path}; resume with: "
                    + resume_command(argv, progress.save_dir, progress.run_dir))
        print(f"interrupted (Ctrl-C) {where}: {tail}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def pretrain(args: RunConfig) -> dict:
    """Train; returns the run summary (final metrics). Exits early with a checkpoint and the
    codes of ``training/exits.py`` (a signal, ``--exit-duration-in-mins``,
    ``--exit-interval``), with EXIT_NON_FINITE under ``--nan-policy stop``, and with
    :data:`EXIT_INTERRUPTED` on Ctrl-C (no checkpoint written then: the line names the last)."""
    import sys

    progress = Progress()
    try:
        return _pretrain(args, progress)
    except KeyboardInterrupt:
        raise SystemExit(interrupted(progress, sys.argv)) from None
    finally:
        TIMERS.synchronize = False


def _pretrain(args: RunConfig, progress: Progress) -> dict:
    import signal

    from megatron_nitp.training.checkpoint import AsyncSaves, save_checkpoint
    from megatron_nitp.training.step import NonFiniteError

    from megatron_nitp.training import faults

    start = time.perf_counter()
    try:
        faults.planned()  # a malformed test fault fails before any work
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_wandb(args.logging)
    run_dir = args.logging.run_dir or arguments.default_run_dir(args)
    save_dir = args.checkpoint.save or os.path.join(run_dir, "checkpoints")
    tensorboard_dir = args.logging.tensorboard_dir or os.path.join(run_dir, "tensorboard")
    run = setup(args, save_dir, run_dir, tensorboard_dir)
    args = run.args
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    train_iter, valid_iter = run.train_iter, run.valid_iter
    if is_logging_rank():
        os.makedirs(run_dir, exist_ok=True)
    progress.run_dir, progress.save_dir = run_dir, save_dir
    progress.iteration = run.start_iteration
    async_saves = AsyncSaves() if args.checkpoint.async_save else None
    from megatron_nitp.training.probe import Probe

    # per-layer geometry on a fixed probe batch, at the iterations that measure the geometry
    probe = (Probe.build(args, train_iter, valid_iter) if args.logging.geometry_interval
             else None)

    def save(iteration: int, wait: bool = False) -> str:
        """The checkpoint's path; with --async-save it is complete only once finalized
        (``wait``: before exiting)."""
        with interrupt_deferred():  # Ctrl-C stops the run after the save, not inside it
            finish_saves()  # the one before, if still in flight (save_checkpoint would wait too)
            with params_synced(model):
                path = save_checkpoint(save_dir, iteration, model, optimizer, scheduler, args,
                                       consumed_samples=train_iter.consumed_samples,
                                       keep_last=args.checkpoint.save_keep_last,
                                       async_saves=async_saves,
                                       rank_files=probe.checkpoint_files() if probe else None)
            if wait:
                finish_saves()
        return path

    def finish_saves() -> None:
        if async_saves is not None:
            for path in async_saves.wait():
                logger.print(f"> checkpoint complete {path}")

    memory = MemoryMonitor()
    logger = TrainingLogger(args, tensorboard_dir, memory, run_dir=run_dir,
                            start_iteration=run.start_iteration)
    progress.logger = logger
    times = IntervalTimes(args.logging.timing_log_level, args.logging.log_straggler)
    from megatron_nitp.accounting.memory_plan import planned_memory

    # --dry-run's estimate for this config, printed beside the first interval's measured peak
    planned = planned_memory(args)
    params = sum(p.numel() for chunk in as_chunks(model) for p in chunk.parameters())
    from megatron_nitp.objectives import describe

    what = describe(args.nitp_config, args.mtp)
    logger.print(
        f"> run folder {run_dir} | {what} | parameters on rank 0: {params:,} | vocab "
        f"{run.tokenizer.vocab_size} (padded {args.derived.padded_vocab_size}) | world "
        f"{torch.distributed.get_world_size()} (TP {args.parallel.tensor_model_parallel_size}, PP "
        f"{args.parallel.pipeline_model_parallel_size}"
        + (f" x {args.virtual_pipeline_model_parallel_size} chunks (interleaved)"
           if args.virtual_pipeline_model_parallel_size else "")
        + f", EP {args.parallel.expert_model_parallel_size}, DP "
        f"{args.derived.data_parallel_size}) | micro-batches per step "
        f"{args.derived.num_microbatches} | "
        f"backend {torch.distributed.get_backend()}, device {device()} ({device_name()})"
    )
    kept = arguments.kept_preset_fields(args)
    if kept:
        logger.print(f"> no --preset given: the default preset {args.preset}'s values apply to "
                     f"the settings no flag gave: {', '.join(kept)} (give --preset NAME or the "
                     "flags to choose them)")
    logger.print("> configuration (value, then where it came from):\n"
                 + arguments.describe_sources(args))
    if is_logging_rank():
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(args.to_dict(), f, indent=1)
    from megatron_nitp.training.checkpoint import imported_source

    source = imported_source(run.loaded) if run.loaded else None
    if args.checkpoint.load and args.checkpoint.finetune:
        logger.print(f"> --finetune: weights of {args.checkpoint.load} (saved at iteration "
                     f"{run.loaded['iteration']}"
                     + (f", imported from {source}" if source else "")
                     + "); training starts at iteration 0 with a fresh optimizer, schedule and "
                     "data position")
    if run.start_iteration:
        logger.print(f"> resumed from {args.checkpoint.load} at iteration {run.start_iteration} "
                     f"({train_iter.consumed_samples} samples consumed)"
                     + (f"; imported from {source}: the optimizer starts fresh (Adam moments "
                        "not imported), the LR schedule is this run's at that iteration"
                        if source and not args.checkpoint.finetune else "")
                     + ("; --no-load-optim: the optimizer starts fresh (Adam's moments not "
                        "loaded), the LR schedule is this run's at that iteration"
                        if args.checkpoint.no_load_optim and not source else "")
                     + ("; --no-load-rng: random states as --seed sets them"
                        if args.checkpoint.no_load_rng else ""))
    for chunk in as_chunks(model):
        chunk.train()
    if probe is not None and run.start_iteration:
        # the drift continues from the first probe's states the checkpoint stored
        from megatron_nitp.training.checkpoint import checkpoint_dir

        restart = probe.resume(checkpoint_dir(args.checkpoint.load, run.start_iteration))
        if restart:
            logger.print(restart)
    throughput = Throughput(args.training.global_batch_size * args.model.seq_length)
    iteration = run.start_iteration
    memory.begin()  # the first interval's peak counts from the first step, set-up left out
    exits = ExitConditions(args.training, start)
    exits.install()
    collector = ManualGC(args.training)  # --manual-gc
    collector.start()
    try:
        while iteration < args.training.train_iters:
            iteration += 1
            if faults.due("sigkill", iteration):
                os.kill(os.getpid(), signal.SIGKILL)
            if faults.due("sigterm", iteration):
                os.kill(os.getpid(), signal.SIGTERM)
            geometry = bool(args.logging.geometry_interval) and (
                iteration % args.logging.geometry_interval == 0
                or iteration in (1, args.training.train_iters)
            )
            TIMERS.take()  # what evaluation and saving timed belongs to no step
            try:
                metrics = train_step(model, optimizer, scheduler, train_iter, args,
                                     iteration - 1, geometry)
            except NonFiniteError as err:
                finish_saves()  # the pending checkpoints hold weights from before the NaN
                logger.close()
                if is_logging_rank():
                    path = os.path.join(run_dir, f"non_finite_iter_{iteration:07d}.json")
                    with open(path, "w") as f:
                        json.dump(err.diagnostics, f, indent=2)
                    print(f"error: {err}; diagnostics in {path}; the weights were not updated "
                          f"(last checkpoint in {save_dir}).", flush=True)
                raise SystemExit(EXIT_NON_FINITE)
            progress.iteration = iteration
            collector.after_step(iteration)
            times.add(TIMERS.take())
            logged = logger.is_log_iteration(iteration)
            if logged:
                metrics.update(memory.measure())  # every rank: one all-reduce MAX, then reset
                metrics.update(times.measure())  # --timing-log-level, --log-straggler
            seconds, tokens_per_second = throughput.lap()
            metrics["tokens per second"] = tokens_per_second
            logger.log_train(iteration, metrics, seconds)
            if probe is not None and geometry:
                with params_synced(model):
                    logger.log_probe(iteration, *probe.measure(model, args))
                throughput.lap()
            if logged and planned is not None:
                logger.print(memory.planned_vs_measured(iteration, metrics, planned,
                                                        args.parallel.pipeline_model_parallel_size))
                planned = None  # once per run
            if valid_iter is not None and (
                iteration % args.logging.eval_interval == 0
                or iteration == args.training.train_iters
            ):
                with params_synced(model), collector.validation():
                    logger.log_eval(iteration,
                                    evaluate(model, valid_iter(), args, args.logging.eval_iters))
                throughput.lap()
            saved = None
            if (args.checkpoint.save_interval and iteration % args.checkpoint.save_interval == 0
                    and iteration < args.training.train_iters):
                saved = save(iteration)
                logger.print(f"> {'saving' if async_saves else 'saved'} checkpoint {saved}")
                throughput.lap()
            if async_saves is not None and async_saves.pending():
                for path in async_saves.poll():  # never waits: finalizes the saves written by now
                    logger.print(f"> checkpoint complete {path}")
            decision = exits.decide(iteration, args.training.train_iters)
            if decision is not None:
                code, reason = decision
                finish_saves()  # the interval's checkpoint, if written in the background
                path = saved or save(iteration, wait=True)
                logger.print(f"> exit after iteration {iteration}: {reason}; saved checkpoint "
                             f"{path}; exiting with code {code} (resume with --load "
                             f"{save_dir})")
                logger.close()
                # rank 0 has logged before any rank leaves: srun --kill-on-bad-exit ends the
                # others as soon as one exits with this non-zero code
                _barrier()
                raise SystemExit(code)
    finally:
        exits.restore()
        collector.stop()
    logger.close()

    if args.checkpoint.save_final or args.checkpoint.save:
        logger.print(f"> saved checkpoint {save(args.training.train_iters, wait=True)}")
    finish_saves()
    summary = _summary(args, logger, time.perf_counter() - start)
    if is_logging_rank():
        if args.logging.plot:
            from megatron_nitp.training.plot import plot_run

            title = f"{args.preset}: {describe(args.nitp_config, args.mtp)}"
            png = plot_run(logger.history, os.path.join(run_dir, "training.png"), title)
            print(f"> plot {png}")
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            # the resolved run config: reports and tools read the run's facts from it
            json.dump({"summary": summary, "config": args.to_dict(),
                       "history": logger.history}, f, indent=1)
        _print_summary(summary, run_dir, logger.interval_span)
    _barrier()
    return summary
