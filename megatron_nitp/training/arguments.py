"""Megatron-style command-line flags, preset defaults, and validation before any work starts.

Flags keep Megatron-LM's names (``--num-layers``, ``--micro-batch-size``, ``--lr-decay-style``, ...)
so that launch scripts read the same; the NITP ones are ``--nitp-*`` and ``--no-nitp``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence

from megatron_nitp.nitp.config import LOSS_KINDS, PROJECTOR_KINDS, NITPConfig
from megatron_nitp.presets import DEFAULT_PRESET, PRESETS, get_preset


def _nitp_help(name: str) -> str:
    """The NITPConfig field's docstring is the flag's help text (``%`` escaped: argparse
    %-formats help strings, and "20% of depth" crashed ``--help``)."""
    import ast
    import inspect

    from megatron_nitp.nitp import config as module

    tree = ast.parse(inspect.getsource(module.NITPConfig))
    body = tree.body[0].body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and node.target.id == name and i + 1 < len(body):
            doc = body[i + 1]
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                return " ".join(str(doc.value.value).split()).replace("%", "%%")
    return ""


MOE_FLAGS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
             "moe_shared_expert_intermediate_size", "moe_layer_freq")


def build_parser(model_type: str = "dense") -> argparse.ArgumentParser:
    """Flags of ``pretrain_gpt_nitp.py`` (``dense``) or ``pretrain_moe_nitp.py`` (``moe``)."""
    kind = "a DeepSeek-V2-style MoE GPT" if model_type == "moe" else "a GPT"
    p = argparse.ArgumentParser(
        description=f"Pretrain {kind} with Next Implicit Token Prediction on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.set_defaults(model_type=model_type)
    default = "tiny-moe" if model_type == "moe" else DEFAULT_PRESET
    p.add_argument("--preset", default=default, help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--list-presets", action="store_true",
                   help="print the presets (parameters, layers, NITP settings) and exit")
    p.add_argument("--json", action="store_true", help="with --list-presets: JSON output")
    p.add_argument("--dry-run", action="store_true",
                   help="parse, build the configuration, check the layout and the memory "
                        "estimate, print the plan and exit (no process group, no model)")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of processes the job will have "
                        "(default: $WORLD_SIZE or TP x PP x CP)")

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, help="number of transformer layers")
    g.add_argument("--hidden-size", type=int, help="transformer hidden size d")
    g.add_argument("--ffn-hidden-size", type=int, help="SwiGLU FFN width (default 4d)")
    g.add_argument("--num-attention-heads", type=int, help="query heads")
    g.add_argument("--num-query-groups", type=int, help="key/value heads (GQA); default = heads")
    g.add_argument("--kv-channels", type=int, help="head dimension (default hidden/heads)")
    g.add_argument("--seq-length", type=int, help="sequence length")
    g.add_argument("--max-position-embeddings", type=int, help="default: --seq-length")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (default: the tokenizer's)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="separate input embedding and output layer")
    g.add_argument("--add-qkv-bias", action="store_true", default=False,
                   help="bias on the QKV projection (Qwen2)")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--norm-epsilon", type=float, default=1e-6)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)

    g = p.add_argument_group("mixture of experts (pretrain_moe_nitp.py)")
    g.add_argument("--num-experts", dest="num_moe_experts", type=int, default=None,
                   help="routed experts per MoE layer")
    g.add_argument("--moe-router-topk", type=int, default=None, help="experts per token")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="routed expert width")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="shared expert width (0 or unset: no shared expert)")
    g.add_argument("--moe-layer-freq", default=None,
                   help="which layers are MoE: an int N (every N-th) or e.g. '[0]*1+[1]*15' "
                        "(DeepSeek-V2: a shallow dense stage first)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2,
                   help="load-balancing auxiliary loss coefficient")
    g.add_argument("--moe-token-dispatcher-type", default="alltoall",
                   choices=["allgather", "alltoall"])
    g.add_argument("--expert-model-parallel-size", type=int, default=1)

    g = p.add_argument_group("NITP (Next Implicit Token Prediction)")
    g.add_argument("--no-nitp", dest="nitp", action="store_false", default=True,
                   help="train the plain next-token-prediction baseline")
    g.add_argument("--nitp-target-layer", type=int, default=1, help=_nitp_help("target_layer"))
    g.add_argument("--nitp-loss-weight", type=float, default=1.0, help=_nitp_help("loss_weight"))
    g.add_argument("--nitp-start-iter", type=int, default=0, help=_nitp_help("start_iter"))
    g.add_argument("--nitp-loss-kind", default="cosine", help=_nitp_help("loss_kind") +
                   f" ({', '.join(LOSS_KINDS)})")
    g.add_argument("--nitp-shift", type=int, default=1, help=_nitp_help("shift"))
    g.add_argument("--nitp-projector", default="swiglu", help=_nitp_help("projector") +
                   f" ({', '.join(PROJECTOR_KINDS)})")
    g.add_argument("--nitp-projector-ffn-ratio", type=int, default=4,
                   help=_nitp_help("projector_ffn_ratio"))
    g.add_argument("--nitp-no-stop-gradient", dest="nitp_stop_gradient", action="store_false",
                   default=True, help="ablation: " + _nitp_help("stop_gradient"))
    g.add_argument("--nitp-objective", default="nitp", help=_nitp_help("objective"))
    g.add_argument("--nitp-hidden-source", default="final_norm",
                   help=_nitp_help("hidden_source"))

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, help="sequences per micro-batch per rank")
    g.add_argument("--global-batch-size", type=int, help="sequences per optimizer step")
    g.add_argument("--train-iters", type=int, help="optimizer steps")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--bf16", action="store_true", help="bf16 params/compute, fp32 main params")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    g.add_argument("--loss-scale", type=float, default=None, help="static loss scale for fp16")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)

    g = p.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="WSD",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-ratio", type=float, default=0.2,
                   help="WSD: fraction of the decay iterations spent decaying (paper: 0.2)")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: decay iterations (overrides --lr-wsd-decay-ratio)")
    g.add_argument("--lr-wsd-decay-style", default="linear",
                   choices=["linear", "cosine", "exponential", "minus_sqrt"])

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="megatron indexed dataset prefix(es), optionally weighted: "
                        "[w1] p1 [w2] p2; default: the built-in corpus, prepared on first run")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model of the data")
    g.add_argument("--data-cache-path", default=None, help="where dataset indices are cached")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="context parallelism (attention needs Transformer Engine: GPU only)")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="interleaved pipeline schedule: not supported with NITP (refused)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="uneven pipeline: layers on the first stage (the other stages share the "
                        "rest evenly); megatron-core's num_layers_in_first_pipeline_stage")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="uneven pipeline: layers on the last stage; megatron-core's "
                        "num_layers_in_last_pipeline_stage")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                   help="default: nccl with CUDA, gloo without")
    g.add_argument("--transformer-impl", default="transformer_engine",
                   choices=["transformer_engine", "local"],
                   help="layer spec: Transformer Engine's (when TE and CUDA are present, else "
                        "megatron-core's local modules) or always the local modules")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="timeout of collectives (init_process_group); a rank that waits longer "
                        "fails with an error instead of hanging")

    g = p.add_argument_group("validation, logging and output")
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--geometry-interval", type=int, default=20,
                   help="log effective rank and pairwise cosine of the last hidden states "
                        "every N iterations (0 = never)")
    g.add_argument("--log-throughput", action="store_true", default=True,
                   help="log model TFLOP/s per device (NITP's FLOPs counted) and, on GPU, MFU")
    g.add_argument("--no-log-throughput", dest="log_throughput", action="store_false")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: known GPUs' bf16 dense peak)")
    g.add_argument("--run-dir", default=None,
                   help="run folder (TensorBoard events, checkpoint, plot, summary); "
                        "default runs/<preset>-<nitp|ntp>-<time>")
    g.add_argument("--tensorboard-dir", default=None, help="default: <run-dir>/tensorboard")
    g.add_argument("--save", default=None, help="checkpoint folder (default <run-dir>/checkpoints)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="write a checkpoint every N iterations (and at the end)")
    g.add_argument("--save-keep-last", type=int, default=None,
                   help="keep only the newest K complete checkpoints")
    g.add_argument("--load", default=None,
                   help="resume from the latest checkpoint in this folder (model, optimizer, "
                        "scheduler, iteration, data position, RNG; any parallel layout)")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: load the model weights only and start at iteration 0")
    g.add_argument("--load-fallback", action="store_true",
                   help="if the latest checkpoint is incomplete or corrupted, load the newest "
                        "intact one before it")
    g.add_argument("--override-config", action="store_true",
                   help="load a checkpoint whose model or NITP config differs from the flags")
    g.add_argument("--nan-policy", default="skip", choices=["skip", "stop"],
                   help="a NaN/Inf loss or gradient: skip the step (and count it) or stop after "
                        "writing diagnostics; the weights are never updated with it")
    g.add_argument("--inject-fault", default=None,
                   help="testing only: KIND@ITER with KIND one of nan-loss, nan-grad, sigterm, "
                        "sigkill, crash-in-save")
    g.add_argument("--no-save", dest="save_final", action="store_false", default=True,
                   help="do not write the final checkpoint")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=True)
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=True)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, model_type: str = "dense"
               ) -> argparse.Namespace:
    """Parse flags over the preset's defaults, fill derived values, and validate shapes.

    ``model_type`` is the entry point's: ``dense`` refuses MoE presets and flags, ``moe``
    requires them."""
    parser = build_parser(model_type)
    known, _ = parser.parse_known_args(argv)
    if known.list_presets:
        from megatron_nitp.preset_table import print_presets

        print_presets(as_json=known.json)
        parser.exit(0)
    try:
        preset = get_preset(known.preset)
    except ValueError as err:
        parser.error(str(err))
    given = {k for k in MOE_FLAGS if getattr(known, k) is not None}
    preset_type = preset.pop("model_type", "dense")
    if model_type == "dense" and (preset_type == "moe" or given):
        what = f"--preset {known.preset}" if preset_type == "moe" else ", ".join(
            "--" + k.replace("_", "-").replace("num-moe-experts", "num-experts") for k in sorted(given))
        parser.exit(2, f"{parser.prog}: error: {what} is for mixture-of-experts models: use "
                       "pretrain_moe_nitp.py (this entry point trains dense GPTs).\n")
    if model_type == "moe" and preset_type != "moe" and known.num_moe_experts is None:
        parser.exit(2, f"{parser.prog}: error: --preset {known.preset} is a dense model: choose "
                       "a MoE preset (--list-presets) or give --num-experts.\n")
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    _fill_derived(args)
    try:
        validate_model_args(args)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return args


def _fill_derived(args: argparse.Namespace) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "micro_batch_size", "global_batch_size", "train_iters", "lr"):
        if getattr(args, name) is None:
            raise SystemExit(f"error: --{name.replace('_', '-')} is required (no preset sets it)")
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.num_query_groups = args.num_query_groups or args.num_attention_heads
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.untie_embeddings_and_output_weights = bool(args.untie_embeddings_and_output_weights)
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.num_moe_experts:
        from megatron_nitp.presets import moe_layer_pattern

        args.moe_router_topk = args.moe_router_topk or 2
        args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.ffn_hidden_size
        freq = args.moe_layer_freq if args.moe_layer_freq is not None else 1
        if isinstance(freq, str) and freq.strip().isdigit():
            freq = int(freq)
        try:
            args.moe_layer_pattern = moe_layer_pattern(freq, args.num_layers)
        except (ValueError, SyntaxError) as err:
            raise SystemExit(f"error: {err}")
    if args.lr_wsd_decay_iters is None:
        args.lr_wsd_decay_iters = max(1, int(round(args.lr_wsd_decay_ratio * args.lr_decay_iters)))
    args.nitp_config = NITPConfig(
        enabled=args.nitp,
        target_layer=args.nitp_target_layer,
        loss_weight=args.nitp_loss_weight,
        start_iter=args.nitp_start_iter,
        loss_kind=args.nitp_loss_kind,
        shift=args.nitp_shift,
        projector=args.nitp_projector,
        projector_ffn_ratio=args.nitp_projector_ffn_ratio,
        stop_gradient=args.nitp_stop_gradient,
        objective=args.nitp_objective,
        hidden_source=args.nitp_hidden_source,
    )


def pipeline_split(args: argparse.Namespace) -> tuple[Optional[int], Optional[int]]:
    """(layers on the first stage, layers on the last stage) of an uneven pipeline split, each
    None when not given (megatron-core's num_layers_in_first/last_pipeline_stage)."""
    return (getattr(args, "decoder_first_pipeline_num_layers", None),
            getattr(args, "decoder_last_pipeline_num_layers", None))


def validate_model_args(args: argparse.Namespace) -> None:
    """Shape and flag checks that need no process group: raise ValueError with the fix."""
    args.nitp_config.validate(args.num_layers, args.hidden_size, args.tensor_model_parallel_size)
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive: choose one.")
    if args.num_attention_heads % args.num_query_groups:
        raise ValueError(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by "
            f"--num-query-groups {args.num_query_groups}."
        )
    tp = args.tensor_model_parallel_size
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(args, name) % tp:
            raise ValueError(
                f"--{name.replace('_', '-')} {getattr(args, name)} is not divisible by "
                f"--tensor-model-parallel-size {tp}."
            )
    if pipeline_split(args) != (None, None):
        from megatron_nitp.nitp.routing import stage_layer_counts

        # ValueError naming the numbers when the layers do not split that way
        stage_layer_counts(args.num_layers, args.pipeline_model_parallel_size,
                           *pipeline_split(args))
    elif args.num_layers % args.pipeline_model_parallel_size:
        raise ValueError(
            f"--num-layers {args.num_layers} is not divisible by "
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size} (or give "
            "--decoder-first/last-pipeline-num-layers)."
        )
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False
    _validate_layout(args)
    _validate_moe(args)
    if args.micro_batch_size <= 0 or args.global_batch_size <= 0 or args.train_iters <= 0:
        raise ValueError("--micro-batch-size, --global-batch-size and --train-iters must be > 0.")
    if args.lr_warmup_iters > args.lr_decay_iters:
        raise ValueError(
            f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --lr-decay-iters "
            f"{args.lr_decay_iters}."
        )
    if args.lr_decay_style == "WSD" and args.lr_warmup_iters + args.lr_wsd_decay_iters > args.lr_decay_iters:
        raise ValueError(
            f"WSD: warm-up ({args.lr_warmup_iters}) + decay ({args.lr_wsd_decay_iters}) iterations "
            f"exceed --lr-decay-iters {args.lr_decay_iters}; lower --lr-warmup-iters or "
            "--lr-wsd-decay-ratio."
        )


def _validate_moe(args: argparse.Namespace) -> None:
    if not args.num_moe_experts:
        if args.expert_model_parallel_size > 1:
            raise ValueError("--expert-model-parallel-size needs a MoE model (--num-experts).")
        return
    experts, ep = args.num_moe_experts, args.expert_model_parallel_size
    if experts % ep:
        raise ValueError(
            f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}: "
            f"choose an expert-parallel size that divides {experts}."
        )
    if not 1 <= args.moe_router_topk <= experts:
        raise ValueError(
            f"--moe-router-topk {args.moe_router_topk} must be between 1 and --num-experts "
            f"{experts}."
        )
    if args.moe_ffn_hidden_size % args.tensor_model_parallel_size:
        raise ValueError(
            f"--moe-ffn-hidden-size {args.moe_ffn_hidden_size} is not divisible by "
            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}."
        )


def _validate_layout(args: argparse.Namespace) -> None:
    """Parallel layouts the code cannot run are refused by name, never run silently wrong."""
    from megatron_nitp.device import has_cuda
    from megatron_nitp.nitp.routing import target_stage

    nitp, pp = args.nitp_config, args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size not in (None, 1):
        raise ValueError(
            "--virtual-pipeline-model-parallel-size: the interleaved pipeline schedule is not "
            "supported (the NITP target is routed per micro-batch in 1F1B order, which the "
            "interleaved schedule does not keep); use a plain --pipeline-model-parallel-size."
        )
    if args.context_parallel_size > 1 and not args.dry_run:
        from megatron_nitp.training.model import use_transformer_engine

        if not use_transformer_engine(args.transformer_impl):
            where = ("this machine has no CUDA" if not has_cuda() else
                     "Transformer Engine is not importable here" if args.transformer_impl ==
                     "transformer_engine" else "--transformer-impl local was given")
            raise ValueError(
                f"--context-parallel-size {args.context_parallel_size} needs Transformer "
                f"Engine's context-parallel attention on a GPU, and {where}; use "
                "--context-parallel-size 1, or run in an image with TE (the Dockerfile's). "
                "(NITP's context-parallel shift itself is tested on CPU.)"
            )
    if args.seq_length % (2 * args.context_parallel_size * (
            args.tensor_model_parallel_size if args.sequence_parallel else 1)):
        raise ValueError(
            f"--seq-length {args.seq_length} must be divisible by 2 x context-parallel size "
            "(x tensor-parallel size with --sequence-parallel)."
        )
    if (nitp.enabled and not nitp.stop_gradient and pp > 1
            and target_stage(nitp.target_layer, args.num_layers, pp, *pipeline_split(args))
            != pp - 1):
        raise ValueError(
            "--nitp-no-stop-gradient with the target layer on an earlier pipeline stage is not "
            "supported: the routed target carries no gradient back across stages. Use "
            "--pipeline-model-parallel-size 1 for this ablation."
        )
    if nitp.enabled and nitp.objective == "cosine_reg" and (
            args.sequence_parallel or args.context_parallel_size > 1):
        raise ValueError("--nitp-objective cosine_reg needs whole sequences on a rank: drop "
                         "--sequence-parallel / --context-parallel-size.")
    if nitp.enabled and nitp.projector == "linear" and args.sequence_parallel:
        raise ValueError("--nitp-projector linear does not support --sequence-parallel; use "
                         "swiglu (the paper's) or drop --sequence-parallel.")


def multi_node_launch(environ=None) -> str | None:
    """Why this process looks like one rank of a job on several nodes (None if it does not):
    torchrun's ``WORLD_SIZE > LOCAL_WORLD_SIZE``, or, for ranks started by srun directly (one
    task per rank, no LOCAL_WORLD_SIZE), ``SLURM_STEP_NUM_NODES > 1``."""
    environ = os.environ if environ is None else environ

    def number(name):
        try:
            return int(environ.get(name, ""))
        except ValueError:
            return None

    world, local = number("WORLD_SIZE"), number("LOCAL_WORLD_SIZE")
    if world is not None and local is not None:
        return f"WORLD_SIZE {world} > LOCAL_WORLD_SIZE {local}" if world > local else None
    nodes = number("SLURM_STEP_NUM_NODES")
    if nodes is not None and nodes > 1 and (world or number("SLURM_NTASKS") or 1) > 1:
        return f"SLURM_STEP_NUM_NODES {nodes}"
    return None


def validate_data_cache(args: argparse.Namespace, environ=None) -> None:
    """A job on several nodes needs ``--data-cache-path`` on a shared file system.

    megatron-core builds the dataset index cache on global rank 0 only; the other ranks then
    read it. The default folder (``$MEGATRON_NITP_CACHE/dataset-index``, inside each node's
    container in the Docker image, or ``~/.cache``) is local to a node, so every rank on the
    other nodes would fail with FileNotFoundError after the first node built its cache."""
    if args.data_cache_path or getattr(args, "dry_run", False):
        return
    why = multi_node_launch(environ)
    if why:
        raise ValueError(
            f"this job runs on several nodes ({why}) and --data-cache-path is not set: "
            "megatron-core builds the dataset index cache on global rank 0 only, and the "
            "default cache folder ($MEGATRON_NITP_CACHE/dataset-index, e.g. inside each "
            "node's container) is not shared, so the ranks on the other nodes would fail with "
            "FileNotFoundError. Pass --data-cache-path DIR on a file system every node sees "
            "(the examples use $RUN_DIR/data-cache)."
        )


def validate_world_args(args: argparse.Namespace, world_size: int) -> None:
    """Checks that need the world size or the launch: the data-parallel size, the batch
    arithmetic, and a shared dataset cache on several nodes."""
    validate_data_cache(args)
    model_parallel = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                      * args.context_parallel_size)
    expert_ranks = args.expert_model_parallel_size * args.tensor_model_parallel_size
    if args.expert_model_parallel_size > 1 and (world_size // args.pipeline_model_parallel_size) % expert_ranks:
        raise ValueError(
            f"--expert-model-parallel-size {args.expert_model_parallel_size} x TP "
            f"{args.tensor_model_parallel_size} does not divide the {world_size // args.pipeline_model_parallel_size} "
            "ranks of a pipeline stage: launch more processes or lower the EP size."
        )
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by TP x PP x CP = {model_parallel}: "
            "launch a multiple of that many processes."
        )
    args.data_parallel_size = world_size // model_parallel
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size "
            f"{args.data_parallel_size} = {per_step}: choose a global batch that is a multiple "
            f"of {per_step}."
        )
    args.num_microbatches = args.global_batch_size // per_step


def validate_vocab(args: argparse.Namespace, tokenizer_vocab_size: int) -> None:
    """The model's vocabulary must cover every token id the tokenizer can emit."""
    if args.vocab_size is None:
        args.vocab_size = tokenizer_vocab_size
    elif tokenizer_vocab_size > args.vocab_size:
        raise ValueError(
            f"the tokenizer's vocabulary ({tokenizer_vocab_size}) is larger than --vocab-size "
            f"{args.vocab_size}: raise --vocab-size or omit it to use the tokenizer's."
        )
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    args.padded_vocab_size = -(-args.vocab_size // multiple) * multiple


def default_run_dir(args: argparse.Namespace) -> str:
    import time

    kind = "nitp" if args.nitp else "ntp"
    return os.path.join("runs", f"{args.preset}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def nitp_config_dict(args: argparse.Namespace) -> dict:
    return dataclasses.asdict(args.nitp_config)
