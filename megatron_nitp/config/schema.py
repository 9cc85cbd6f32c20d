"""The run configuration: one frozen, typed dataclass per concern, grouped in :class:`RunConfig`.

Every setting is declared once, here: its type, its default and its help text. The command-line
flags (Megatron-LM's names, ``training/arguments.py``), the presets, the checkpoint's stored
configuration and ``--dry-run`` all read these declarations. A field's flag is ``--`` + its
``dest`` with dashes (``dest`` is the field name unless :func:`flag` says otherwise); its help
text is the docstring under the field.

Values derived from settings (padded vocabulary, data-parallel size, micro-batches, the MoE
layer pattern, the schedule's iterations) are not settings: :func:`megatron_nitp.config.resolve`
computes them into :class:`Derived`, for training and ``--dry-run`` alike.

A component reads the sections it uses: ``config.model.hidden_size``, and after ``resolve``
the derived values in ``config.derived`` (``config.derived.vocab_size`` is the tokenizer's
vocabulary when ``--vocab-size`` was not given). There is no flat view; code that works from
flag names (a command line's sources, messages quoting a flag) asks ``config.setting(dest)``.
``config.flat()`` is every value by flag dest, as Megatron-LM's ``vars(args)`` (what is stored
and compared). Nothing can be assigned: a changed setting is a new config
(:meth:`RunConfig.replace`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from megatron_nitp.nitp.config import NITPConfig

#: Megatron-LM's ``--tokenizer-type`` names this project builds (``data/tokenizer.py``: the one
#: list the flags, the tools and the checkpoint readers take them from).
TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "GPT2BPETokenizer", "TikTokenizer", "NullTokenizer")


def flag(default, *, dest: str | None = None, name: str | None = None,
         negative: str | None = None, choices=None, nargs=None, group_help: str | None = None,
         aliases: tuple = ()):
    """A field with its command-line spelling.

    ``dest``: the flat name (and flag) when it differs from the field name; ``name``: the flag
    when it is not ``--`` + dest with dashes (``--num-experts``); ``negative``: a ``--no-...``
    flag that sets a boolean to False (with ``name=""`` it is the only flag); ``aliases``: other
    spellings Megatron-LM also accepts (``--override-opt-param-scheduler``)."""
    meta = {k: v for k, v in dict(dest=dest, name=name, negative=negative, choices=choices,
                                  nargs=nargs, aliases=aliases or None).items()
            if v is not None}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """The transformer's shape (Qwen2/Llama-style blocks)."""

    num_layers: Optional[int] = None
    """number of transformer layers"""
    hidden_size: Optional[int] = None
    """transformer hidden size d"""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU FFN width (default 4d)"""
    num_attention_heads: Optional[int] = None
    """query heads"""
    num_query_groups: Optional[int] = None
    """key/value heads (GQA); default = heads"""
    kv_channels: Optional[int] = None
    """head dimension (default hidden/heads)"""
    seq_length: Optional[int] = None
    """sequence length"""
    max_position_embeddings: Optional[int] = None
    """default: --seq-length"""
    vocab_size: Optional[int] = None
    """vocabulary size (default: the tokenizer's)"""
    make_vocab_size_divisible_by: int = 128
    """pad the vocabulary to a multiple of this x TP (the embedding and output rows)"""
    untie_embeddings_and_output_weights: bool = False
    """separate input embedding and output layer"""
    add_qkv_bias: bool = False
    """bias on the QKV projection (Qwen2)"""
    rotary_base: int = 10000
    """RoPE base"""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon"""
    init_method_std: float = 0.02
    """standard deviation of the weights' normal initialization"""
    hidden_dropout: float = 0.0
    """dropout after attention and FFN"""
    attention_dropout: float = 0.0
    """dropout of the attention probabilities"""


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeek-V2-style mixture of experts (``pretrain_moe_nitp.py``)."""

    num_moe_experts: Optional[int] = flag(None, name="--num-experts")
    """routed experts per MoE layer"""
    moe_router_topk: Optional[int] = None
    """experts per token (default 2)"""
    moe_ffn_hidden_size: Optional[int] = None
    """routed expert width (default: --ffn-hidden-size)"""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """shared expert width (0 or unset: no shared expert)"""
    moe_layer_freq: Union[int, str, None] = None
    """which layers are MoE: an int N (every N-th) or e.g. '[0]*1+[1]*15' (DeepSeek-V2: a
    shallow dense stage first)"""
    moe_aux_loss_coeff: float = 1e-2
    """load-balancing auxiliary loss coefficient"""
    moe_token_dispatcher_type: str = flag("alltoall", choices=("allgather", "alltoall"))
    """how tokens reach their experts' ranks"""
    moe_router_score_function: str = flag("softmax", choices=("softmax", "sigmoid"))
    """the router's score of each expert (DeepSeek-V3: sigmoid)"""
    moe_router_pre_softmax: bool = False
    """softmax over all experts before the top-k (else over the chosen k)"""
    moe_router_enable_expert_bias: bool = False
    """aux-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the scores for
    the top-k choice, updated after each step from the tokens each expert received"""
    moe_router_bias_update_rate: float = 1e-3
    """step size of the expert-bias update"""
    moe_router_load_balancing_type: str = flag("aux_loss",
                                               choices=("aux_loss", "seq_aux_loss", "none"))
    """load-balancing loss: over the micro-batch (aux_loss), per sequence (seq_aux_loss,
    DeepSeek-V2/V3) or none (e.g. with --moe-router-enable-expert-bias)"""
    moe_z_loss_coeff: Optional[float] = None
    """router z-loss coefficient (ST-MoE; e.g. 1e-3; unset: no z-loss)"""
    moe_expert_capacity_factor: Optional[float] = None
    """token dropping: each expert takes at most this factor x its even share of tokens (unset:
    no dropping)"""
    moe_token_drop_policy: str = flag("probs", choices=("probs", "position"))
    """with a capacity factor: drop the tokens of lowest routing probability or the last ones"""
    moe_pad_expert_input_to_capacity: bool = False
    """with a capacity factor: pad each expert's input to its capacity (static shapes)"""


@dataclass(frozen=True)
class MTPConfig:
    """megatron-core's multi-token prediction as a training objective (beside or instead of
    NITP; ``megatron_nitp/objectives/mtp.py``)."""

    mtp_num_layers: Optional[int] = None
    """MTP depth D: extra blocks on the last stage, the d-th predicting token t+1+d (unset: no
    MTP)"""
    mtp_loss_scaling_factor: float = 0.1
    """weight of the MTP loss (the mean cross entropy over the D depths)"""


@dataclass(frozen=True)
class TrainingConfig:
    """Batch, length of the run, precision and the optimizer's numerics."""

    micro_batch_size: Optional[int] = None
    """sequences per micro-batch per rank"""
    global_batch_size: Optional[int] = None
    """sequences per optimizer step"""
    train_iters: Optional[int] = None
    """optimizer steps"""
    train_samples: Optional[int] = None
    """Megatron-LM's sample-based length: --train-iters = train-samples // global-batch-size
    (instead of --train-iters)"""
    seed: int = 1234
    """random seed (initialization, data order)"""
    weight_decay: float = 0.1
    """AdamW weight decay"""
    adam_beta1: float = 0.9
    """Adam beta1"""
    adam_beta2: float = 0.95
    """Adam beta2"""
    adam_eps: float = 1e-8
    """Adam epsilon"""
    clip_grad: float = 1.0
    """gradient clipping by global norm"""
    use_distributed_optimizer: bool = False
    """shard the optimizer states over the data-parallel ranks"""
    bf16: bool = False
    """bf16 params/compute, fp32 main params"""
    fp16: bool = False
    """fp16 with dynamic loss scaling"""
    loss_scale: Optional[float] = None
    """static loss scale for fp16"""
    initial_loss_scale: float = 2.0**32
    """initial dynamic loss scale for fp16"""
    nan_policy: str = flag("skip", choices=("skip", "stop"))
    """a NaN/Inf loss or gradient: skip the step (and count it) or stop after writing
    diagnostics; the weights are never updated with it"""
    exit_duration_in_mins: Optional[float] = None
    """stop after this many minutes of wall-clock time since start (decided by all ranks
    together after a step), write a checkpoint and exit with code 76; set it below the job's
    time limit by the time a checkpoint takes"""
    exit_interval: Optional[int] = None
    """stop after every iteration that is a multiple of N, write a checkpoint and exit with
    code 77"""
    exit_signal_handler: bool = flag(True, negative="--no-exit-signal-handler")
    """on --exit-signal (and SIGTERM) finish the step, write a checkpoint and exit with code 75
    (SLURM: #SBATCH --signal=B:USR1@600 and --exit-signal SIGUSR1)"""
    exit_signal: str = "SIGTERM"
    """the signal --exit-signal-handler catches besides SIGTERM, by name (SIGUSR1, USR1, ...)"""
    manual_gc: bool = False
    """Python's garbage collector at the same points on every rank instead of when its
    thresholds trip on one (as Megatron-LM): at start, every --manual-gc-interval steps and
    around each validation, so that no rank pauses for a collection mid-step while the others
    wait for it in a collective"""
    manual_gc_interval: int = 0
    """with --manual-gc: also collect every N steps (0: only at start and around validation)"""
    manual_gc_eval: bool = flag(True, name="", negative="--no-manual-gc-eval")
    """with --manual-gc: no collection around validation"""


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule."""

    lr: Optional[float] = None
    """peak learning rate"""
    min_lr: float = 0.0
    """learning rate at the end of the decay"""
    lr_decay_style: str = flag("WSD", choices=("constant", "linear", "cosine",
                                               "inverse-square-root", "WSD"))
    """shape of the decay"""
    lr_warmup_iters: int = 0
    """linear warm-up iterations"""
    lr_warmup_fraction: Optional[float] = None
    """warm-up as a fraction of --lr-decay-iters (Megatron-LM's; instead of --lr-warmup-iters),
    rounded to whole iterations"""
    lr_warmup_samples: Optional[int] = None
    """Megatron-LM's sample-based warm-up: --lr-warmup-iters = samples / global-batch-size,
    rounded to whole iterations (with --train-samples)"""
    lr_decay_samples: Optional[int] = None
    """Megatron-LM's sample-based decay length, converted as --lr-warmup-samples"""
    lr_decay_iters: Optional[int] = None
    """default: --train-iters"""
    lr_wsd_decay_ratio: float = 0.2
    """WSD: fraction of the decay iterations spent decaying (paper: 0.2)"""
    lr_wsd_decay_iters: Optional[int] = None
    """WSD: decay iterations (overrides --lr-wsd-decay-ratio)"""
    lr_wsd_decay_samples: Optional[int] = None
    """Megatron-LM's sample-based WSD decay, converted as --lr-warmup-samples"""
    lr_wsd_decay_style: str = flag("linear", choices=("linear", "cosine", "exponential",
                                                      "minus_sqrt"))
    """WSD: shape of the final decay"""


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from."""

    data_path: Optional[tuple] = flag(None, nargs="*")
    """megatron indexed dataset prefix(es), optionally weighted: [w1] p1 [w2] p2; default: the
    built-in corpus, prepared on first run"""
    split: str = "969,30,1"
    """train,valid,test proportions"""
    train_data_path: Optional[tuple] = flag(None, nargs="*")
    """the training split's own prefix(es) (weighted as --data-path), instead of --data-path and
    --split"""
    valid_data_path: Optional[tuple] = flag(None, nargs="*")
    """the validation split's own prefix(es) (with --train-data-path)"""
    test_data_path: Optional[tuple] = flag(None, nargs="*")
    """the test split's own prefix(es) (with --train-data-path)"""
    data_args_path: Optional[str] = None
    """a file holding the --data-path value, whitespace-separated ([w1] p1 [w2] p2 ...), for a
    blend too long for a command line; read at start and recorded as --data-path (the
    checkpoint keeps the prefixes trained on even if the file later changes)"""
    per_split_data_args_path: Optional[str] = None
    """a JSON file {"train": [...], "valid": [...], "test": [...]}, each in --data-path form (a
    list, or one whitespace-separated string; valid/test may be null or absent): the
    --train/valid/test-data-path values, read at start and recorded as those"""
    tokenizer_type: str = flag("SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    """Megatron-LM's tokenizer kinds, built by megatron-core's tokenizer library (the one the
    data was preprocessed with): SentencePieceTokenizer (a .model; without --data-path the
    built-in corpus's), GPTSentencePieceTokenizer (the same here: pieces, EOD = the model's
    eos), Llama2Tokenizer (a .model with BOS before every document), HuggingFaceTokenizer (a local folder holding tokenizer.json, or that
    file), GPT2BPETokenizer (GPT-2's byte-level BPE from --vocab-file and --merge-file),
    TikTokenizer (Megatron's tiktoken .json vocabulary) or NullTokenizer (no file: --vocab-size
    ids, the last one EOD)"""
    tokenizer_model: Optional[str] = None
    """the tokenizer's file or folder (see --tokenizer-type)"""
    vocab_file: Optional[str] = None
    """GPT2BPETokenizer: the vocabulary (GPT-2's vocab.json: token -> id, with <|endoftext|>,
    the end-of-document token)"""
    merge_file: Optional[str] = None
    """GPT2BPETokenizer: the BPE merges (GPT-2's merges.txt)"""
    mock_data: bool = False
    """megatron-core's mock GPT data (MockGPTDataset: synthetic token runs, each ending in
    EOD) instead of a corpus, for benchmarks and smoke tests: no tokenizer training, no corpus
    preparation, no index cache; the vocabulary is --vocab-size (default 4096) unless
    --tokenizer-type/--tokenizer-model name a tokenizer"""
    data_cache_path: Optional[str] = None
    """where dataset indices are cached: global rank 0 builds them, every rank reads them, so on
    several nodes a folder all nodes see (checked at start)"""
    dataset_build_timeout_minutes: float = 120.0
    """how long the other ranks wait for global rank 0's first build of the dataset index (a
    large corpus may take longer than --distributed-timeout-minutes; tools/build_index.py
    builds it before the job)"""
    reset_position_ids: bool = False
    """restart the position ids at 0 after every EOD, so each packed document sees the positions
    it would alone (Megatron-LM's flag; megatron-core's GPTDataset computes them)"""
    reset_attention_mask: bool = False
    """a token attends only to its own document's earlier tokens (the EOD ends a document): the
    dataset builds a [s, s] mask per sample, which the batch carries to the model (needs SDPA or
    unfused attention, no context parallelism; Megatron-LM's flag)"""
    eod_mask_loss: bool = False
    """no loss on the EOD positions (predicting the token after EOD; Megatron-LM's flag)"""


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout and the distributed runtime."""

    tensor_model_parallel_size: int = 1
    """tensor parallelism (TP)"""
    pipeline_model_parallel_size: int = 1
    """pipeline parallelism (PP)"""
    sequence_parallel: bool = False
    """shard the norms' and dropouts' activations over TP (on only with TP > 1)"""
    context_parallel_size: int = 1
    """context parallelism (attention needs Transformer Engine: GPU only)"""
    expert_model_parallel_size: int = 1
    """expert parallelism (EP)"""
    expert_tensor_parallel_size: Optional[int] = None
    """tensor parallelism inside each expert (default: --tensor-model-parallel-size); 1 keeps
    whole experts on a rank, so EP can stay inside a node"""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """interleaved pipeline schedule (virtual stages): transformer layers per model chunk; the
    chunks per rank follow from it (Megatron-LM's flag; exclusive with
    --num-virtual-stages-per-pipeline-rank, which uneven first/last stages need)"""
    num_virtual_stages_per_pipeline_rank: Optional[int] = None
    """interleaved pipeline schedule: model chunks (virtual stages) per pipeline rank, V
    (megatron-core's virtual_pipeline_model_parallel_size; Megatron-LM's flag); the bubble
    shrinks V times, micro-batches per step must be a multiple of PP"""
    decoder_first_pipeline_num_layers: Optional[int] = None
    """uneven pipeline: layers on the first stage (the other stages share the rest evenly);
    megatron-core's num_layers_in_first_pipeline_stage"""
    decoder_last_pipeline_num_layers: Optional[int] = None
    """uneven pipeline: layers on the last stage; megatron-core's
    num_layers_in_last_pipeline_stage"""
    distributed_backend: Optional[str] = flag(None, choices=("nccl", "gloo"))
    """default: nccl with CUDA, gloo without"""
    transformer_impl: str = flag("transformer_engine", choices=("transformer_engine", "local"))
    """layer spec: Transformer Engine's (when TE and CUDA are present, else megatron-core's local
    modules) or always the local modules"""
    distributed_timeout_minutes: int = 10
    """timeout of collectives (init_process_group); a rank that waits longer fails with an
    error instead of hanging"""


@dataclass(frozen=True)
class PerformanceConfig:
    """Speed and memory: megatron-core's fused kernels, communication overlap, FP8 and
    activation recomputation. A GPU feature asked for where it cannot run (no CUDA, no
    Transformer Engine or Apex) is refused with the reason, never silently ignored; the
    ``auto`` ones (neither flag given) are on where their kernel is present
    (``config/performance.py``)."""

    moe_grouped_gemm: bool = False
    """one grouped GEMM for all local experts instead of a loop over them (TE's
    TEGroupedMLP on GPU)"""
    moe_permute_fusion: bool = False
    """fused token permutation for the MoE dispatch (Transformer Engine)"""
    overlap_grad_reduce: bool = False
    """overlap the data-parallel gradient reduction with the backward pass"""
    overlap_param_gather: bool = False
    """with --use-distributed-optimizer: overlap the parameter all-gather with the next
    forward pass"""
    gradient_accumulation_fusion: Optional[bool] = flag(
        None, negative="--no-gradient-accumulation-fusion")
    """fuse the weight-gradient GEMM with the fp32 gradient accumulation (auto: on where TE's
    layers or Apex's fused_weight_gradient_mlp_cuda provide it)"""
    apply_rope_fusion: Optional[bool] = flag(None, negative="--no-rope-fusion")
    """fused RoPE kernel (auto: on where Transformer Engine provides it)"""
    cross_entropy_loss_fusion: bool = False
    """fused vocabulary-parallel cross entropy"""
    cross_entropy_fusion_impl: str = flag("native", choices=("native", "te"))
    """the fused cross entropy's implementation: megatron-core's (native) or TE's"""
    fp8: Optional[str] = flag(None, name="--fp8-format", choices=("e4m3", "hybrid"))
    """FP8 GEMMs through Transformer Engine (hybrid: e4m3 forward, e5m2 gradients); needs
    --bf16 and a GPU with FP8 (Hopper or newer)"""
    fp8_recipe: str = flag("delayed", choices=("tensorwise", "delayed", "mxfp8", "blockwise"))
    """FP8 scaling recipe"""
    attention_backend: str = flag("auto", choices=("auto", "sdpa", "unfused", "flash", "fused"))
    """core attention: auto (Transformer Engine's choice with TE's layers, else sdpa), sdpa
    (torch's scaled_dot_product_attention: flash / memory-efficient kernels without TE),
    unfused (megatron-core's DotProductAttention, or TE's unfused), flash or fused (TE's)"""
    recompute_granularity: Optional[str] = flag(None, choices=("full", "selective"))
    """activation recomputation: whole layers (full) or the memory-heavy parts
    (selective, --recompute-modules); NITP stays exact under both"""
    recompute_method: Optional[str] = flag(None, choices=("uniform", "block"))
    """full recompute: every layer in chunks of --recompute-num-layers (uniform) or only the
    first --recompute-num-layers layers of each pipeline stage (block)"""
    recompute_num_layers: Optional[int] = None
    """full recompute: layers per chunk (uniform) or recomputed layers per stage (block)"""
    recompute_modules: Optional[tuple] = flag(None, nargs="*", choices=(
        "core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts"))
    """selective recompute: the submodules recomputed (default: core_attn)"""


@dataclass(frozen=True)
class LoggingConfig:
    """Validation, logging and the run folder."""

    eval_interval: int = 100
    """validate every N iterations (0 = never)"""
    eval_iters: int = 10
    """global batches per validation"""
    log_interval: int = 10
    """log every N iterations"""
    geometry_interval: int = 20
    """log effective rank and pairwise cosine of the last hidden states, and the per-layer
    geometry of a fixed probe batch (training/probe.py), every N iterations (0 = never)"""
    log_throughput: bool = flag(True, negative="--no-log-throughput")
    """log model TFLOP/s per device (NITP's FLOPs counted) and, on GPU, MFU"""
    peak_tflops: Optional[float] = None
    """device peak TFLOP/s for MFU (default: known GPUs' bf16 dense peak)"""
    run_dir: Optional[str] = None
    """run folder (TensorBoard events, checkpoint, plot, summary); default
    runs/<preset>-<nitp|ntp>-<time>"""
    tensorboard_dir: Optional[str] = None
    """default: <run-dir>/tensorboard"""
    plot: bool = flag(True, name="", negative="--no-plot")
    """do not plot the curves to <run-dir>/training.png"""
    progress_bar: bool = flag(True, name="", negative="--no-progress-bar")
    """no progress bar between log lines (one is shown on a terminal otherwise)"""
    tensorboard_log_interval: int = 1
    """write the training scalars to TensorBoard and W&B every N iterations (the history keeps
    every iteration's; validation and probe values are always written)"""
    tensorboard_queue_size: int = 1000
    """TensorBoard's queue: events held before they are written out"""
    log_validation_ppl_to_tensorboard: bool = False
    """also write the validation lm loss's perplexity (exp, capped at exp(20), as on the
    console) as 'lm loss validation ppl'"""
    log_batch_size_to_tensorboard: bool = False
    """also write the global batch size as 'batch-size' with the training scalars"""
    log_params_norm: bool = False
    """log the L2 norm of the weights after each step ('params norm': every weight counted
    once under any layout; with --overlap-param-gather the step then waits for the gathered
    weights)"""
    log_num_zeros_in_grad: bool = False
    """log how many gradient entries are exactly zero ('num zeros', megatron-core's count)"""
    log_memory_to_tensorboard: bool = False
    """write the memory figures of each console line to TensorBoard (mem-* tags; the console
    and the history keep them either way)"""
    timing_log_level: int = flag(0, choices=(0, 1, 2))
    """per-phase times on the console line and TensorBoard, ms per iteration, max over ranks:
    0 none, 1 data loading, forward-backward and optimizer, 2 also the NITP routing wait and
    the gradient reduction"""
    log_straggler: bool = False
    """each console line names the fastest and slowest rank by compute time (forward-backward
    less the gradient reduction and the NITP routing wait) and the spread; one gather per
    line"""
    wandb_project: Optional[str] = None
    """log the TensorBoard scalars to this Weights & Biases project too (needs the wandb
    package; WANDB_MODE=offline works without a network)"""
    wandb_exp_name: Optional[str] = None
    """the W&B run name (default: the run folder's name)"""
    wandb_save_dir: Optional[str] = None
    """where W&B writes its files (default: <run-dir>/wandb)"""


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving and resuming."""

    save: Optional[str] = None
    """checkpoint folder (default <run-dir>/checkpoints)"""
    save_interval: Optional[int] = None
    """write a checkpoint every N iterations (and at the end)"""
    save_keep_last: Optional[int] = None
    """keep only the newest K complete checkpoints"""
    save_final: bool = flag(True, name="", negative="--no-save")
    """do not write the final checkpoint"""
    async_save: bool = False
    """write checkpoints in the background (megatron-core's asynchronous dist-checkpointing):
    training goes on while the files are written; the checkpoint becomes latest once every
    rank's write has finished"""
    verify: bool = flag(True, name="", negative="--no-verify")
    """skip the CRC32 checksums: at save (each rank checksums the files it wrote) and at load
    (the ranks share the verification); sizes are still checked"""
    dist_ckpt_optim_fully_reshardable: bool = False
    """with --use-distributed-optimizer: save the optimizer state in megatron-core's
    fully_reshardable form (each rank gathers its data-parallel group's whole fp32 parameters
    and Adam moments: about 12 bytes per parameter of host memory at save and at load), which a
    run at another TP/PP/EP can load; without it the per-rank dp_reshardable form (fast, only the
    rank's own shard; resumable at the same TP/PP/EP). Use it for the save before a layout
    change"""
    load: Optional[str] = None
    """resume from the latest checkpoint in this folder (model, optimizer, scheduler,
    iteration, data position, RNG; any parallel layout)"""
    exit_on_missing_checkpoint: bool = False
    """with --load of an absent or empty folder: stop with an error (exit code 1) instead of
    warning and starting from scratch (a folder holding anything is always loaded or refused)"""
    finetune: bool = False
    """with --load: load the model weights only and start at iteration 0"""
    no_load_optim: bool = False
    """with --load: resume the checkpoint's weights, iteration and data position with a fresh
    optimizer (Adam's moments and the loss scale not loaded); the learning rate follows this
    command line's schedule from the checkpoint's iteration (Megatron-LM's scheduler restarts at
    step 0 instead)"""
    no_load_rng: bool = False
    """with --load: do not restore the checkpoint's random-number states (each rank's as
    --seed sets them at a fresh start)"""
    load_fallback: bool = False
    """if the latest checkpoint is incomplete or corrupted, load the newest intact one before
    it"""
    override_config: bool = False
    """load a checkpoint whose model or NITP config differs from the flags"""
    override_opt_param_scheduler: bool = flag(False, name="--override-opt_param-scheduler",
                                              aliases=("--override-opt-param-scheduler",))
    """resume with this command line's learning-rate schedule (--lr, --min-lr, warm-up, decay
    iterations and style, WSD decay, weight decay) where the checkpoint's differs, continuing
    from the checkpoint's iteration (e.g. another decay from a stable-phase checkpoint); without
    it or --use-checkpoint-opt_param-scheduler such a resume is refused (Megatron-LM's)"""
    use_checkpoint_opt_param_scheduler: bool = flag(
        False, name="--use-checkpoint-opt_param-scheduler",
        aliases=("--use-checkpoint-opt-param-scheduler",))
    """resume with the checkpoint's learning-rate schedule where the command line's differs
    (e.g. a shorter --train-iters that stops early on the original schedule)"""


@dataclass(frozen=True)
class Derived:
    """Values computed from the settings by :func:`megatron_nitp.config.resolve`, never given."""

    world_size: int
    data_parallel_size: int
    num_microbatches: int
    vocab_size: int
    """the vocabulary the data uses: --vocab-size, else the tokenizer's"""
    padded_vocab_size: int
    """rows of the embedding and output layer: a multiple of make-vocab-size-divisible-by x TP"""
    moe_layer_pattern: Optional[tuple]
    """per layer 1 (MoE) or 0 (dense); None for a dense model"""
    lr_decay_iters: int
    lr_wsd_decay_iters: int


#: The groups of a RunConfig, in the order the help lists them, with their help titles.
GROUPS = {
    "model": (ModelConfig, "model"),
    "moe": (MoEConfig, "mixture of experts (pretrain_moe_nitp.py)"),
    "nitp_config": (NITPConfig, "NITP (Next Implicit Token Prediction)"),
    "mtp": (MTPConfig, "multi-token prediction (megatron-core)"),
    "training": (TrainingConfig, "training"),
    "schedule": (ScheduleConfig, "learning rate"),
    "data": (DataConfig, "data"),
    "parallel": (ParallelConfig, "parallelism"),
    "performance": (PerformanceConfig, "speed and memory (fused kernels, overlap, FP8, recompute)"),
    "logging": (LoggingConfig, "validation, logging and output"),
    "checkpoint": (CheckpointConfig, "checkpoints"),
}


def field_dest(group_cls, f: dataclasses.Field) -> str:
    """The flat name of a field: its ``dest`` (NITP fields: ``nitp_<name>``, ``enabled`` is
    ``nitp``)."""
    if "dest" in f.metadata:
        return f.metadata["dest"]
    if group_cls is NITPConfig:
        return "nitp" if f.name == "enabled" else f"nitp_{f.name}"
    return f.name


def _index() -> dict[str, tuple[str, str]]:
    index = {}
    for group, (cls, _) in GROUPS.items():
        for f in dataclasses.fields(cls):
            dest = field_dest(cls, f)
            assert dest not in index, f"flat name {dest} declared twice"
            index[dest] = (group, f.name)
    return index


#: flat name (flag dest) -> (group, field)
FLAT = _index()

#: The layout settings of one process (flat names for ``RunConfig.replace``): what export,
#: evaluation and ``tools/build_index.py`` run a multi-process job's config as.
ONE_PROCESS_LAYOUT = dict(
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
    expert_tensor_parallel_size=None, context_parallel_size=1, sequence_parallel=False,
    decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
    num_layers_per_virtual_pipeline_stage=None, num_virtual_stages_per_pipeline_rank=None)
DERIVED = {f.name for f in dataclasses.fields(Derived)}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, by concern; ``derived`` is filled by ``resolve``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    nitp_config: NITPConfig = field(default_factory=NITPConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str = "tiny-dense"
    model_type: str = "dense"
    """dense (pretrain_gpt_nitp.py) or moe (pretrain_moe_nitp.py)"""
    dry_run: bool = False
    """--dry-run: plan the job and exit"""
    planned_world_size: Optional[int] = None
    """--world-size with --dry-run"""
    derived: Optional[Derived] = None
    sources: tuple = field(default=(), compare=False)
    """(flat name, where its value came from: "flag", "preset NAME" or "default") pairs, from
    the command line; not part of the config's identity"""

    def setting(self, name: str):
        """The value of the setting whose flag dest is ``name`` (``"hidden_size"`` is
        ``config.model.hidden_size``): for code that works from flag names (the sources of a
        command line, messages that quote flags). Components read their section instead."""
        if name not in FLAT:
            raise KeyError(f"RunConfig has no setting {name!r}")
        group, attr = FLAT[name]
        return getattr(getattr(self, group), attr)

    @property
    def world_size(self) -> Optional[int]:
        """Megatron's ``args.world_size``: the resolved world, else the planned one."""
        derived = self.__dict__.get("derived")
        return derived.world_size if derived is not None else self.planned_world_size

    @property
    def virtual_pipeline_model_parallel_size(self) -> Optional[int]:
        """Model chunks per pipeline rank under the interleaved schedule (megatron-core's
        ``virtual_pipeline_model_parallel_size``), None for the plain schedule: from
        --num-virtual-stages-per-pipeline-rank, or layers per stage / --num-layers-per-virtual-
        pipeline-stage, as Megatron-LM derives it (1 chunk is the plain schedule)."""
        from megatron_nitp.layout import virtual_pipeline_size

        p = self.parallel
        return virtual_pipeline_size(
            self.model.num_layers, p.pipeline_model_parallel_size,
            p.num_layers_per_virtual_pipeline_stage, p.num_virtual_stages_per_pipeline_rank)

    @property
    def nitp_enabled(self) -> bool:
        return self.nitp_config.enabled

    @classmethod
    def from_flat(cls, values: dict, **top) -> "RunConfig":
        """From flat names (flag dests, preset keys); unknown names raise ``KeyError``."""
        groups: dict[str, dict] = {g: {} for g in GROUPS}
        for name, value in values.items():
            if name not in FLAT:
                raise KeyError(f"unknown setting {name!r}")
            group, attr = FLAT[name]
            groups[group][attr] = value
        return cls(**{g: GROUPS[g][0](**kw) for g, kw in groups.items()}, **top)

    def replace(self, **flat) -> "RunConfig":
        """A copy with some settings changed (flat names); ``derived`` is dropped unless
        nothing it depends on could change (it is recomputed by ``resolve``)."""
        groups: dict[str, dict] = {}
        top = {}
        for name, value in flat.items():
            if name in FLAT:
                group, attr = FLAT[name]
                groups.setdefault(group, {})[attr] = value
            elif name in {f.name for f in dataclasses.fields(RunConfig)}:
                top[name] = value
            else:
                raise KeyError(f"unknown setting {name!r}")
        changes = {g: dataclasses.replace(getattr(self, g), **kw) for g, kw in groups.items()}
        changes.update(top)
        if "derived" not in top:
            changes["derived"] = None
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict:
        """Every setting by flat name (the values training uses: derived ones after
        ``resolve``), like Megatron-LM's ``vars(args)``."""
        out = {name: getattr(self.__dict__[group], attr) for name, (group, attr) in FLAT.items()}
        if self.derived is not None:
            out.update(dataclasses.asdict(self.derived))
        return out

    def source(self, name: str) -> str:
        """Where the setting ``name`` (flat) came from: "flag", "preset NAME", "default", or
        "derived" (after ``resolve``); "" when the config was not built from a command line."""
        if self.derived is not None and name in DERIVED:
            if name not in FLAT or getattr(self.derived, name) != getattr(
                    getattr(self, FLAT[name][0]), FLAT[name][1]):
                return "derived"
        return dict(self.sources).get(name, "")

    def to_dict(self) -> dict:
        """Every setting by group (JSON-safe): what a checkpoint stores."""
        out = {g: dataclasses.asdict(getattr(self, g)) for g in GROUPS}
        for f in dataclasses.fields(RunConfig):
            if f.name not in GROUPS and f.name not in ("derived", "sources"):
                out[f.name] = getattr(self, f.name)
        if self.sources:
            out["sources"] = dict(self.sources)
        if self.derived is not None:
            out["derived"] = dataclasses.asdict(self.derived)
        return _jsonable(out)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The inverse of :meth:`to_dict` (fields unknown to this version are ignored)."""
        kwargs = {}
        for g, (group_cls, _) in GROUPS.items():
            fields = {f.name: f for f in dataclasses.fields(group_cls)}
            values = {k: v for k, v in data.get(g, {}).items() if k in fields}
            for name, value in values.items():  # settings of several values are tuples
                if "nargs" in fields[name].metadata and value is not None:
                    values[name] = tuple(value)
            kwargs[g] = group_cls(**values)
        for f in dataclasses.fields(RunConfig):
            if f.name not in GROUPS and f.name not in ("derived", "sources") and f.name in data:
                kwargs[f.name] = data[f.name]
        if data.get("sources"):
            kwargs["sources"] = tuple(sorted(data["sources"].items()))
        if data.get("derived"):
            derived = dict(data["derived"])
            if derived.get("moe_layer_pattern") is not None:
                derived["moe_layer_pattern"] = tuple(derived["moe_layer_pattern"])
            kwargs["derived"] = Derived(**derived)
        return cls(**kwargs)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
