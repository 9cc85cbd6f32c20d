"""Checks of a run configuration and the one computation of every derived value.

``validate(config)`` runs at parse time (no world, no tokenizer): shapes, flag combinations,
parallel layouts the code cannot run. ``resolve(config, world_size, tokenizer_vocab_size)`` is
pure: it returns a new config whose ``derived`` holds the data-parallel size, micro-batches per
step, the (padded) vocabulary, the MoE layer pattern and the schedule's iterations. Training
(``training/loop.py``) and ``--dry-run`` (``accounting/dry_run.py``) both call it, so the plan is
computed exactly as the run will be. Both raise :class:`ConfigError` naming the setting and the
fix.
"""

from __future__ import annotations

import signal
from typing import Optional

from megatron_nitp.config.ranges import check_ranges
from megatron_nitp.config.schema import Derived, ParallelConfig, RunConfig

#: vocabulary assumed when neither --vocab-size nor a tokenizer gives one (the built-in corpus's
#: SentencePiece model): ``--dry-run`` and the FLOPs tool
DEFAULT_VOCAB_SIZE = 4096


class ConfigError(ValueError):
    """A setting (or a combination) that cannot run; the message names it and the fix."""


def padded_vocab(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """The embedding/output rows: ``vocab_size`` rounded up to ``divisible_by x TP`` (Megatron's
    ``_vocab_size_with_padding``)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def moe_pattern(config: RunConfig) -> Optional[tuple]:
    """The per-layer 0/1 MoE pattern of ``--moe-layer-freq`` (None for a dense model)."""
    from megatron_nitp.config.presets import moe_layer_pattern

    if not config.moe.num_moe_experts:
        return None
    freq = config.moe.moe_layer_freq if config.moe.moe_layer_freq is not None else 1
    try:
        return tuple(moe_layer_pattern(freq, config.model.num_layers))
    except (ValueError, SyntaxError) as err:
        raise ConfigError(str(err) + _origin(config, "moe_layer_freq", "num_layers")) from None


def pipeline_split(parallel: ParallelConfig) -> tuple[Optional[int], Optional[int]]:
    """(layers on the first stage, layers on the last stage) of an uneven pipeline split, each
    None when not given (megatron-core's num_layers_in_first/last_pipeline_stage)."""
    return (parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers)


def signal_number(name: str) -> signal.Signals:
    """``SIGUSR1``, ``USR1`` or ``usr1`` (or a number) as a signal; ValueError naming the
    choices otherwise. The value of ``--exit-signal``: checked here at parse time, installed by
    ``training/exits.py``."""
    text = str(name).strip()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            pass
    else:
        upper = text.upper()
        upper = upper if upper.startswith("SIG") else "SIG" + upper
        if hasattr(signal.Signals, upper) and upper not in ("SIGKILL", "SIGSTOP"):
            return signal.Signals[upper]
    raise ValueError(f"--exit-signal {name!r} is not a signal that can be caught: give a name "
                     "such as SIGTERM, SIGUSR1 or SIGUSR2.")


def schedule_iters(config: RunConfig) -> tuple[int, int]:
    """(decay iterations, WSD decay iterations): ``--lr-decay-iters`` defaults to the run's
    length, the WSD decay to ``--lr-wsd-decay-ratio`` of it."""
    s = config.schedule
    decay = s.lr_decay_iters or config.training.train_iters
    wsd = s.lr_wsd_decay_iters
    if wsd is None:
        wsd = max(1, int(round(s.lr_wsd_decay_ratio * decay)))
    return decay, wsd


def complete(config: RunConfig) -> RunConfig:
    """Settings whose default is another setting, filled: FFN 4d, key/value heads = heads,
    positions = sequence, decay over the whole run, top-2 experts of the dense FFN's width;
    sequence parallelism off without TP (what megatron-core does); NITP targets masked at
    document boundaries when the attention is (``--reset-attention-mask``). Idempotent.
    A number outside its range is refused first (``config/ranges.py``): the arithmetic here
    and in :func:`validate` would divide by it."""
    problem = check_ranges(config)
    if problem:
        raise ConfigError(problem)
    m, moe = config.model, config.moe
    fill = {}
    if m.hidden_size is not None and m.ffn_hidden_size is None:
        fill["ffn_hidden_size"] = 4 * m.hidden_size
    if m.num_query_groups is None and m.num_attention_heads is not None:
        fill["num_query_groups"] = m.num_attention_heads
    if m.max_position_embeddings is None and m.seq_length is not None:
        fill["max_position_embeddings"] = m.seq_length
    if moe.num_moe_experts:
        if moe.moe_router_topk is None:
            fill["moe_router_topk"] = 2
        if moe.moe_ffn_hidden_size is None:
            fill["moe_ffn_hidden_size"] = fill.get("ffn_hidden_size", m.ffn_hidden_size)
    if config.parallel.sequence_parallel and config.parallel.tensor_model_parallel_size == 1:
        fill["sequence_parallel"] = False
    fill.update(_schedule_in_iterations(config))
    d = config.data
    if d.tokenizer_type == "GPT2BPETokenizer" and d.tokenizer_model is None and d.vocab_file:
        fill["tokenizer_model"] = d.vocab_file  # GPT-2's tokenizer is named by its vocabulary
    if config.nitp_config.document_boundary is None:
        fill["nitp_document_boundary"] = "mask" if config.data.reset_attention_mask else "allow"
    if not fill:
        return config
    keep = config.derived
    done = config.replace(**fill)
    return done.replace(derived=keep) if keep is not None else done


def _schedule_in_iterations(config: RunConfig) -> dict:
    """Megatron-LM's sample-based lengths and ``--lr-warmup-fraction`` as the iterations they
    mean (flat names -> values, only those that differ).

    Megatron-LM counts a sample-based schedule in samples and steps it by the global batch;
    its learning rate at iteration i depends only on the ratios of those counts, so the same
    counts divided by the global batch give the same schedule here, exactly when they are
    multiples of it (rounded to whole iterations otherwise: the learning rate then differs by
    less than one iteration's share). ``--train-samples`` is cut as Megatron-LM cuts it
    (``train_samples // global_batch_size``)."""
    t, s = config.training, config.schedule
    gbs = t.global_batch_size
    out = {}
    if gbs:
        if t.train_samples is not None:
            out["train_iters"] = t.train_samples // gbs
        for samples, iters in (("lr_warmup_samples", "lr_warmup_iters"),
                               ("lr_decay_samples", "lr_decay_iters"),
                               ("lr_wsd_decay_samples", "lr_wsd_decay_iters")):
            if getattr(s, samples) is not None:
                out[iters] = int(round(getattr(s, samples) / gbs))
    if s.lr_warmup_fraction is not None:
        decay = out.get("lr_decay_iters", s.lr_decay_iters) or out.get("train_iters",
                                                                        t.train_iters)
        if decay:
            out["lr_warmup_iters"] = int(round(s.lr_warmup_fraction * decay))
    return {name: value for name, value in out.items() if config.setting(name) != value}


def _validate_megatron_lm_schedule(config: RunConfig) -> None:
    """Megatron-LM's rule: a length is given in iterations or in samples, a warm-up in one of
    iterations, samples or a fraction; both at once is refused rather than one winning."""
    t, s = config.training, config.schedule
    pairs = (("train_samples", t.train_samples, "train_iters"),
             ("lr_warmup_samples", s.lr_warmup_samples, "lr_warmup_iters"),
             ("lr_warmup_fraction", s.lr_warmup_fraction, "lr_warmup_iters"),
             ("lr_decay_samples", s.lr_decay_samples, "lr_decay_iters"),
             ("lr_wsd_decay_samples", s.lr_wsd_decay_samples, "lr_wsd_decay_iters"))
    for name, value, iters in pairs:
        if value is not None and config.source(iters) == "flag":
            raise ConfigError(f"--{name.replace('_', '-')} and --{iters.replace('_', '-')} both "
                              "set it: give one of them.")
    if s.lr_warmup_fraction is not None and s.lr_warmup_samples is not None:
        raise ConfigError("--lr-warmup-fraction and --lr-warmup-samples both set the warm-up: "
                          "give one of them.")
    if s.lr_warmup_fraction is not None and not 0.0 <= s.lr_warmup_fraction <= 1.0:
        raise ConfigError(f"--lr-warmup-fraction {s.lr_warmup_fraction} must be between 0 and 1.")
    for name, value in (("train_samples", t.train_samples),
                        ("lr_decay_samples", s.lr_decay_samples)):
        if value is not None and t.global_batch_size and value < t.global_batch_size:
            raise ConfigError(f"--{name.replace('_', '-')} {value} is less than one global batch "
                              f"(--global-batch-size {t.global_batch_size}).")


def validate(config: RunConfig) -> None:
    """Checks that need no world size and no tokenizer; raise ConfigError with the fix."""
    config = complete(config)
    m, t, p = config.model, config.training, config.parallel
    for name, value in (("num_layers", m.num_layers), ("hidden_size", m.hidden_size),
                        ("num_attention_heads", m.num_attention_heads),
                        ("seq_length", m.seq_length), ("micro_batch_size", t.micro_batch_size),
                        ("global_batch_size", t.global_batch_size),
                        ("train_iters", t.train_iters), ("lr", config.schedule.lr)):
        if value is None:
            raise ConfigError(f"--{name.replace('_', '-')} is required (no preset sets it).")
    _validate_megatron_lm_schedule(config)
    try:
        config.nitp_config.validate(m.num_layers, m.hidden_size, p.tensor_model_parallel_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if t.bf16 and t.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive: choose one.")
    _validate_exit(config)
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"--num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--num-query-groups {m.num_query_groups}"
            + _origin(config, "num_query_groups", "num_attention_heads") + "."
        )
    tp = p.tensor_model_parallel_size
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(m, name) % tp:
            raise ConfigError(
                f"--{name.replace('_', '-')} {getattr(m, name)} is not divisible by "
                f"--tensor-model-parallel-size {tp}" + _origin(config, name) + "."
            )
    if pipeline_split(config.parallel) != (None, None):
        from megatron_nitp.layout import stage_layer_counts

        try:  # ValueError naming the numbers when the layers do not split that way
            stage_layer_counts(m.num_layers, p.pipeline_model_parallel_size,
                               *pipeline_split(config.parallel))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif m.num_layers % p.pipeline_model_parallel_size:
        raise ConfigError(
            f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size "
            f"{p.pipeline_model_parallel_size} (or give --decoder-first/last-pipeline-num-layers)."
        )
    _validate_layout(config)
    _validate_checkpoint(config)
    _validate_moe(config)
    _validate_performance(config)
    _validate_data(config)
    if config.mtp.mtp_num_layers is not None and config.mtp.mtp_num_layers < 1:
        raise ConfigError(f"--mtp-num-layers {config.mtp.mtp_num_layers} must be >= 1 (omit it "
                          "to train without multi-token prediction).")
    if (config.mtp.mtp_num_layers and p.pipeline_model_parallel_size > 1
            and not m.untie_embeddings_and_output_weights):
        raise ConfigError(
            "--mtp-num-layers with --pipeline-model-parallel-size > 1 needs "
            "--untie-embeddings-and-output-weights: with tied embeddings megatron-core (0.16 to "
            "0.19) keeps an output-layer weight beside the embedding copy on the MTP stage and "
            "cannot build that stage's checkpoint state "
            "(LanguageModule.tie_embeddings_and_output_weights_state_dict asserts). Untie the "
            "embeddings (the MoE presets do) or use one pipeline stage.")
    if t.micro_batch_size <= 0 or t.global_batch_size <= 0 or t.train_iters <= 0:
        raise ConfigError("--micro-batch-size, --global-batch-size and --train-iters must be > 0.")
    decay, wsd = schedule_iters(config)
    warmup = config.schedule.lr_warmup_iters
    if warmup > decay:
        raise ConfigError(
            f"--lr-warmup-iters {warmup} exceeds --lr-decay-iters {decay}"
            + (" (= --train-iters)" if config.schedule.lr_decay_iters is None else "")
            + f": lower it, e.g. --lr-warmup-iters {max(0, decay // 10)} for a short run"
            + _origin(config, "lr_warmup_iters") + "."
        )
    if config.schedule.lr_decay_style == "WSD" and warmup + wsd > decay:
        raise ConfigError(
            f"WSD: warm-up ({warmup}) + decay ({wsd}) iterations exceed --lr-decay-iters "
            f"{decay}; lower --lr-warmup-iters or --lr-wsd-decay-ratio"
            + _origin(config, "lr_warmup_iters", "lr_wsd_decay_ratio") + "."
        )


def _validate_exit(config: RunConfig) -> None:
    t = config.training
    if t.exit_duration_in_mins is not None and t.exit_duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins {t.exit_duration_in_mins} must be > 0 (omit "
                          "it to train until --train-iters).")
    if t.exit_interval is not None and t.exit_interval <= 0:
        raise ConfigError(f"--exit-interval {t.exit_interval} must be > 0 (omit it to train "
                          "until --train-iters).")
    try:
        signal_number(t.exit_signal)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate_checkpoint(config: RunConfig) -> None:
    """--async-save runs megatron-core's writer in a process forked from the trainer (the
    fork's copy-on-write snapshot is what keeps the saved state consistent on CPU, and what
    megatron-core's TemporalAsyncCaller uses on GPU): refuse it where fork does not exist."""
    import multiprocessing

    c = config.checkpoint
    if c.async_save and "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigError("--async-save needs the 'fork' process start method (Linux), which "
                          "this platform lacks: drop --async-save to save synchronously.")
    if c.dist_ckpt_optim_fully_reshardable and not config.training.use_distributed_optimizer:
        raise ConfigError("--dist-ckpt-optim-fully-reshardable applies to the distributed "
                          "optimizer's state only (the plain optimizer's is always fully "
                          "reshardable): add --use-distributed-optimizer or drop the flag.")
    if c.override_opt_param_scheduler and c.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                          "are exclusive: keep this command line's schedule or the "
                          "checkpoint's, not both.")
    if c.async_save and not c.save_final and not c.save_interval:
        raise ConfigError("--async-save with --no-save and no --save-interval has nothing to "
                          "write: give --save-interval N or drop --async-save.")


def _validate_performance(config: RunConfig) -> None:
    from megatron_nitp.config.performance import validate_performance
    from megatron_nitp.layout import stage_layer_counts

    stages = stage_layer_counts(config.model.num_layers,
                                config.parallel.pipeline_model_parallel_size,
                                *pipeline_split(config.parallel))
    try:
        validate_performance(config, stages)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate_data(config: RunConfig) -> None:
    d = config.data
    per_split = (d.train_data_path, d.valid_data_path, d.test_data_path)
    if any(p is not None for p in per_split):
        if d.data_path is not None:
            raise ConfigError("--data-path and --train/valid/test-data-path are exclusive: give "
                              "one blend split by --split, or each split's own prefixes.")
        if not d.train_data_path:
            raise ConfigError("--valid-data-path / --test-data-path need --train-data-path.")
        if d.tokenizer_model is None and d.tokenizer_type != "NullTokenizer":
            raise ConfigError("--train-data-path needs --tokenizer-model (the tokenizer the "
                              "data was preprocessed with, of --tokenizer-type "
                              f"{d.tokenizer_type}).")
    if d.mock_data and (d.data_path is not None or any(p is not None for p in per_split)):
        raise ConfigError("--mock-data generates its tokens: drop --data-path / "
                          "--train-data-path, or drop --mock-data to train on that data.")
    if d.tokenizer_type == "NullTokenizer" and not config.model.vocab_size:
        raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size (its ids are "
                          "0..vocab-size-1, the last one EOD).")
    if d.tokenizer_type == "GPT2BPETokenizer" and not (d.tokenizer_model and d.merge_file):
        raise ConfigError("--tokenizer-type GPT2BPETokenizer needs --vocab-file (GPT-2's "
                          "vocab.json) and --merge-file (its merges.txt): local files, nothing "
                          "is downloaded.")
    if (d.vocab_file or d.merge_file) and d.tokenizer_type != "GPT2BPETokenizer":
        raise ConfigError(f"--vocab-file / --merge-file are GPT2BPETokenizer's files, and "
                          f"--tokenizer-type is {d.tokenizer_type}: add --tokenizer-type "
                          "GPT2BPETokenizer, or drop them.")
    if d.tokenizer_type in ("HuggingFaceTokenizer", "TikTokenizer") and d.tokenizer_model is None:
        raise ConfigError(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model (a "
                          "local file or folder: nothing is downloaded).")
    if d.reset_attention_mask:
        _validate_document_mask(config)
    if (d.tokenizer_type != "SentencePieceTokenizer" and not d.mock_data
            and d.data_path is None and not d.train_data_path):
        raise ConfigError(f"--tokenizer-type {d.tokenizer_type} needs --data-path (data "
                          "preprocessed with that tokenizer: tools/preprocess_data.py "
                          "--tokenizer-type ...), or --mock-data; the built-in corpus is "
                          "tokenized with its own SentencePiece model.")


def _validate_document_mask(config: RunConfig) -> None:
    """--reset-attention-mask needs an attention that applies the batch's arbitrary
    ``[b, 1, s, s]`` mask: torch's SDPA or megatron-core's unfused attention. TE's layers are
    built with a causal mask type and ignore it, and context parallelism (TE's only) slices
    the sequence in a way its mask cannot follow."""
    from megatron_nitp.config.performance import attention_path

    p = config.parallel
    if p.context_parallel_size > 1:
        raise ConfigError(f"--reset-attention-mask with --context-parallel-size "
                          f"{p.context_parallel_size}: context-parallel attention cannot take "
                          "a per-document mask; use --context-parallel-size 1 or drop "
                          "--reset-attention-mask.")
    if attention_path(config.performance, p.transformer_impl) == "te":
        raise ConfigError(f"--reset-attention-mask with Transformer Engine's attention "
                          f"(--attention-backend {config.performance.attention_backend}), which "
                          "would ignore the per-document mask: use --attention-backend sdpa or "
                          "unfused.")


#: where a data path read from a file came from, in ``RunConfig.sources``
DATA_FILE_SOURCES = {"data_args_path": "file --data-args-path",
                     "per_split_data_args_path": "file --per-split-data-args-path"}
_SPLITS = ("train", "valid", "test")


def read_data_files(config: RunConfig) -> RunConfig:
    """``--data-args-path`` / ``--per-split-data-args-path`` (Megatron-LM's) read into
    ``--data-path`` / ``--train/valid/test-data-path``, so every later check (missing
    ``.bin``/``.idx``, tokenizer, split) sees the prefixes they list and the checkpoint records
    what was trained on. Called once, on the command line's config (before :func:`validate`):
    a flag given beside the file that replaces it is refused here. Raises ConfigError naming
    the file and the expected format."""
    d = config.data
    if d.data_args_path is None and d.per_split_data_args_path is None:
        return config
    given = [f"--{n.replace('_', '-')}" for n in ("data_path", "train_data_path",
                                                  "valid_data_path", "test_data_path",
                                                  "data_args_path", "per_split_data_args_path")
             if getattr(d, n) is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} are exclusive: give the data one way (a file "
                          "holding the paths replaces the path flags).")
    if d.mock_data:
        raise ConfigError(f"--mock-data generates its tokens: drop {given[0]}, or drop "
                          "--mock-data to train on that data.")
    if d.data_args_path is not None:
        name, path = "data_args_path", d.data_args_path
        expected = "the --data-path value ([w1] p1 [w2] p2, whitespace-separated)"
        text = _read_text(path, "--data-args-path", expected)
        if not text.split():
            raise ConfigError(f"--data-args-path {path} is empty: it must hold {expected}.")
        values = {"data_path": tuple(text.split())}
    else:
        import json

        name, path = "per_split_data_args_path", d.per_split_data_args_path
        expected = ('a JSON object {"train": [...], "valid": [...], "test": [...]}, each split '
                    "in --data-path form ([w1, p1, w2, p2, ...] or one whitespace-separated "
                    "string; valid/test may be null)")
        text = _read_text(path, "--per-split-data-args-path", expected)
        try:
            blob = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"--per-split-data-args-path {path} is not valid JSON ({err}): "
                              f"expected {expected}.") from None
        if not isinstance(blob, dict) or set(blob) - set(_SPLITS) or not blob.get("train"):
            what = (f"keys {sorted(set(blob) - set(_SPLITS))} are not splits"
                    if isinstance(blob, dict) and set(blob) - set(_SPLITS)
                    else "no \"train\" split" if isinstance(blob, dict) else "not an object")
            raise ConfigError(f"--per-split-data-args-path {path}: {what}; expected {expected}.")
        values = {}
        for split in _SPLITS:
            entry = blob.get(split)
            if isinstance(entry, str):
                entry = entry.split()
            if entry is not None and (not isinstance(entry, list) or not all(
                    isinstance(e, (str, int, float)) and not isinstance(e, bool)
                    for e in entry)):
                raise ConfigError(f"--per-split-data-args-path {path}: \"{split}\" is "
                                  f"{type(entry).__name__}, not a list of weights and prefixes; "
                                  f"expected {expected}.")
            values[f"{split}_data_path"] = (tuple(str(e) for e in entry) if entry else None)
    sources = dict(config.sources)
    sources.update({k: DATA_FILE_SOURCES[name] for k in values})
    return config.replace(**values, sources=tuple(sorted(sources.items())))


def _read_text(path: str, flag_name: str, expected: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"{flag_name} {path} cannot be read ({why}): it must be a file "
                          f"holding {expected}.") from None


def _origin(config: RunConfig, *names: str) -> str:
    """For an error message: which of ``names`` no flag gave (a preset's value), so the user
    sees why a value they never typed is involved."""
    unsaid = [(n, config.source(n)) for n in names if config.source(n).startswith("preset ")]
    return "".join(f" (--{n.replace('_', '-')} {config.setting(n)} is the {where}'s value, not "
                   f"a flag you gave: give --{n.replace('_', '-')} or choose a --preset)"
                   for n, where in unsaid)


def _validate_moe(config: RunConfig) -> None:
    moe, p = config.moe, config.parallel
    if not moe.num_moe_experts:
        if p.expert_model_parallel_size > 1:
            raise ConfigError("--expert-model-parallel-size needs a MoE model (--num-experts).")
        return
    experts, ep = moe.num_moe_experts, p.expert_model_parallel_size
    if experts % ep:
        raise ConfigError(
            f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}: "
            f"choose an expert-parallel size that divides {experts}."
        )
    if not 1 <= moe.moe_router_topk <= experts:
        raise ConfigError(
            f"--moe-router-topk {moe.moe_router_topk} must be between 1 and --num-experts "
            f"{experts}."
        )
    if moe.moe_ffn_hidden_size % p.tensor_model_parallel_size:
        raise ConfigError(
            f"--moe-ffn-hidden-size {moe.moe_ffn_hidden_size} is not divisible by "
            f"--tensor-model-parallel-size {p.tensor_model_parallel_size}."
        )
    moe_pattern(config)


def _validate_layout(config: RunConfig) -> None:
    """Parallel layouts the code cannot run are refused by name, never run silently wrong."""
    from megatron_nitp import kernels
    from megatron_nitp.layout import target_stage

    nitp, p, m = config.nitp_config, config.parallel, config.model
    pp, tp = p.pipeline_model_parallel_size, p.tensor_model_parallel_size
    _validate_virtual_pipeline(config)
    if p.context_parallel_size > 1 and not config.dry_run:
        if not kernels.use_transformer_engine(p.transformer_impl):
            raise ConfigError(
                f"--context-parallel-size {p.context_parallel_size} needs Transformer "
                f"Engine's context-parallel attention on a GPU, and "
                f"{kernels.why_not_te(p.transformer_impl)}; use "
                "--context-parallel-size 1, or run in an image with TE (the Dockerfile's). "
                "(NITP's context-parallel shift itself is tested on CPU.)"
            )
    if m.seq_length % (2 * p.context_parallel_size * (tp if p.sequence_parallel else 1)):
        raise ConfigError(
            f"--seq-length {m.seq_length} must be divisible by 2 x context-parallel size "
            "(x tensor-parallel size with --sequence-parallel)."
        )
    if (nitp.enabled and not nitp.stop_gradient and pp > 1
            and target_stage(nitp.target_layer, m.num_layers, pp, *pipeline_split(config.parallel))
            != pp - 1):
        raise ConfigError(
            "--nitp-no-stop-gradient with the target layer on an earlier pipeline stage is not "
            "supported: the routed target carries no gradient back across stages. Use "
            "--pipeline-model-parallel-size 1 for this ablation."
        )
    if nitp.enabled and nitp.objective == "cosine_reg" and (
            p.sequence_parallel or p.context_parallel_size > 1):
        raise ConfigError("--nitp-objective cosine_reg needs whole sequences on a rank: drop "
                          "--sequence-parallel / --context-parallel-size.")
    if nitp.enabled and nitp.projector == "linear" and p.sequence_parallel:
        raise ConfigError("--nitp-projector linear does not support --sequence-parallel; use "
                          "swiglu (the paper's) or drop --sequence-parallel.")


def _validate_virtual_pipeline(config: RunConfig) -> None:
    """The interleaved schedule's flags (Megatron-LM's checks, and megatron-core's where it
    would assert): PP >= 2, and each stage's layers split evenly over its chunks. MTP needs
    nothing more here: its blocks go on the last rank's last chunk (``objectives/mtp.py``), and
    its PP > 1 condition (untied embeddings) is checked with the other MTP flags."""
    from megatron_nitp.layout import chunk_layer_ranges

    p, m = config.parallel, config.model
    per_stage, chunks = (p.num_layers_per_virtual_pipeline_stage,
                         p.num_virtual_stages_per_pipeline_rank)
    if per_stage is None and chunks is None:
        return
    pp = p.pipeline_model_parallel_size
    if per_stage is not None and chunks is not None:
        raise ConfigError("--num-layers-per-virtual-pipeline-stage and "
                          "--num-virtual-stages-per-pipeline-rank are exclusive: give one.")
    for flag, value in (("--num-layers-per-virtual-pipeline-stage", per_stage),
                        ("--num-virtual-stages-per-pipeline-rank", chunks)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1.")
    if pp < 2:
        raise ConfigError("the interleaved pipeline schedule (--num-layers-per-virtual-pipeline-"
                          "stage / --num-virtual-stages-per-pipeline-rank) needs "
                          f"--pipeline-model-parallel-size >= 2 (got {pp}).")
    if per_stage is not None:
        if pipeline_split(config.parallel) != (None, None):
            raise ConfigError("with --decoder-first/last-pipeline-num-layers give the chunks "
                              "per rank with --num-virtual-stages-per-pipeline-rank (as "
                              "Megatron-LM), not --num-layers-per-virtual-pipeline-stage.")
        if (m.num_layers // pp) % per_stage:
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {per_stage} does not divide the "
                f"{m.num_layers // pp} layers of a pipeline stage ({m.num_layers} layers / PP "
                f"{pp}): choose a divisor.")
    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        return  # one chunk per rank: the plain schedule
    if pp == 2 and None not in pipeline_split(config.parallel):
        # megatron-core (0.16 to 0.19) divides by the count of middle stages to place the
        # chunks of an uneven split (get_transformer_layer_offset): with none it fails
        raise ConfigError("with the interleaved schedule at PP 2, give only one of "
                          "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-"
                          "layers (megatron-core places uneven chunks through the middle "
                          "stages, and PP 2 has none).")
    try:
        chunk_layer_ranges(m.num_layers, pp, vpp, *pipeline_split(config.parallel))
    except ValueError as err:
        raise ConfigError(f"{err} (--num-virtual-stages-per-pipeline-rank {vpp}).") from None


def _layout(config: RunConfig, world_size: int) -> tuple[int, int]:
    """(data-parallel size, micro-batches per step) of ``world_size`` processes."""
    p, t = config.parallel, config.training
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size, p.expert_model_parallel_size)
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1.")
    etp = tp if p.expert_tensor_parallel_size is None else p.expert_tensor_parallel_size
    if (ep > 1 or etp != tp) and (world_size // pp) % (ep * etp):
        raise ConfigError(
            f"--expert-model-parallel-size {ep} x expert TP {etp} does not divide the "
            f"{world_size // pp} ranks of a pipeline stage: launch more processes or lower the "
            "EP size."
        )
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp * pp * cp}: "
            "launch a multiple of that many processes."
        )
    dp = world_size // (tp * pp * cp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp} = {per_step}: choose a global batch "
            f"that is a multiple of {per_step}."
        )
    micro = t.global_batch_size // per_step
    if config.virtual_pipeline_model_parallel_size and micro % pp:
        raise ConfigError(
            f"the interleaved pipeline schedule runs micro-batches in groups of PP {pp}: "
            f"{micro} micro-batches per step (--global-batch-size {t.global_batch_size} / "
            f"{per_step}) must be a multiple of {pp}.")
    return dp, micro


def resolve(config: RunConfig, world_size: int,
            tokenizer_vocab_size: Optional[int] = None) -> RunConfig:
    """``config`` with every derived value computed for a job of ``world_size`` processes.

    ``tokenizer_vocab_size``: the tokenizer's vocabulary, which ``--vocab-size`` must cover
    (None in a dry run: ``--vocab-size``, else :data:`DEFAULT_VOCAB_SIZE`)."""
    config = complete(config)
    validate(config)
    dp, micro = _layout(config, world_size)
    given = config.model.vocab_size
    if tokenizer_vocab_size is not None and given is not None and tokenizer_vocab_size > given:
        raise ConfigError(
            f"the tokenizer's vocabulary ({tokenizer_vocab_size}) is larger than --vocab-size "
            f"{given}: raise --vocab-size or omit it to use the tokenizer's."
        )
    vocab = given or tokenizer_vocab_size or DEFAULT_VOCAB_SIZE
    decay, wsd = schedule_iters(config)
    derived = Derived(
        world_size=world_size,
        data_parallel_size=dp,
        num_microbatches=micro,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab, config.model.make_vocab_size_divisible_by,
                                       config.parallel.tensor_model_parallel_size),
        moe_layer_pattern=moe_pattern(config),
        lr_decay_iters=decay,
        lr_wsd_decay_iters=wsd,
    )
    return config.replace(derived=derived)
