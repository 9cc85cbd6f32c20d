"""Megatron-LM torch_dist checkpoints <-> ours: continue an NTP run of Megatron-LM's
``pretrain_gpt.py`` with NITP, and go back.

A Megatron-LM ``--ckpt-format torch_dist`` checkpoint is a folder::

    DIR/latest_checkpointed_iteration.txt   the iteration (or "release")
    DIR/iter_0000500/                       megatron-core dist_checkpointing: metadata.json,
                                            .metadata, *.distcp shards, and common.pt with the
                                            non-sharded entries: ``args`` (the run's
                                            argparse.Namespace), ``iteration``,
                                            ``checkpoint_version`` (3.0), ``opt_param_scheduler``,
                                            ``num_floating_point_operations_so_far``, ...

The model's tensors are megatron-core's ``GPTModel.sharded_state_dict()`` under no prefix
(``decoder.layers.self_attention.linear_qkv.weight``, all layers stacked on a first axis), the
same global tensors whatever TP/PP the run used. Our checkpoints hold the same model under
``model.`` (``training/checkpointing.py``), so the import is a dist_checkpointing load of our
model's own sharded state (prefix ``""``, the NITP projector left out) from the Megatron-LM
folder, and the export the matching save: no per-tensor layout is translated here.

Norm names: megatron-core's local layer spec maps its ``input_layernorm.weight`` /
``pre_mlp_layernorm.weight`` to Transformer Engine's fused names
(``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``) in
checkpoints, so TE and local runs write the same keys; a checkpoint of a spec without that map
(local names) is read too (:func:`_match_keys`).

The optimizer state is not imported: Megatron-LM's distributed optimizer stores it in its own
bucket layout (``dp_reshardable``) of parameters that do not include our projector, and its
scheduler counts samples where ours counts iterations. The import keeps the weights, the
iteration and the consumed samples; the continued run starts Adam afresh and takes the LR
schedule from its flags at that iteration (``training/checkpoint/load.py``).
"""

from __future__ import annotations

import argparse
import os

import torch

from megatron_nitp.config.schema import TOKENIZER_TYPES
from megatron_nitp.hf import as_flags, given_shape_flags, import_model
from megatron_nitp.training.megatron_lm_folder import TRACKER, MegatronFormatError, iteration_dir

CHECKPOINT_VERSION = 3.0

#: our model flags an import takes from the Megatron-LM ``args``; giving one of them is refused
IMPORT_SETTINGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "num_query_groups", "kv_channels", "seq_length", "max_position_embeddings",
                   "vocab_size", "rotary_base", "norm_epsilon",
                   "untie_embeddings_and_output_weights", "add_qkv_bias",
                   "make_vocab_size_divisible_by")

#: training settings copied from the Megatron-LM run as defaults (flags given win): the
#: continued run keeps its batch and LR schedule unless told otherwise
TRAINING_SETTINGS = ("global_batch_size", "micro_batch_size", "train_iters", "lr", "min_lr",
                     "lr_warmup_iters", "lr_decay_iters", "lr_decay_style", "lr_wsd_decay_iters",
                     "lr_wsd_decay_style", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                     "clip_grad", "seed", "bf16", "tokenizer_type", "tokenizer_model")

#: our LR decay styles (the others of Megatron-LM are left to the flags)
_DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
_WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
#: Megatron-LM's tokenizer kinds we build the same way (the others are left to the flags)
_TOKENIZERS = tuple(t for t in TOKENIZER_TYPES if t != "GPT2BPETokenizer")

#: Transformer Engine's fused pre-linear norm names <-> the local spec's, both ways
_NORM_NAMES = (("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
               ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."))


def read_common(path: str) -> dict:
    """The non-sharded entries of a Megatron-LM checkpoint (``common.pt``), as Megatron-LM's
    own load reads them (``dist_checkpointing.load_common_state_dict``)."""
    from megatron.core import dist_checkpointing

    if not os.path.exists(os.path.join(path, "metadata.json")):
        legacy = any(name.startswith("mp_rank_") for name in os.listdir(path))
        raise MegatronFormatError(
            f"{path} is not a torch_dist checkpoint (no metadata.json)" + (
                ": it is Megatron-LM's legacy --ckpt-format torch; convert it with Megatron-LM's "
                "tools/checkpoint/convert.py --saver mcore (or resume it once with --ckpt-format "
                "torch_dist --ckpt-convert-format)" if legacy else ""))
    common = dist_checkpointing.load_common_state_dict(path)
    if not isinstance(common.get("args"), argparse.Namespace):
        raise MegatronFormatError(f"{path}/common.pt has no args (the run's architecture): "
                                  "only checkpoints of Megatron-LM's pretrain_gpt.py can be read")
    return common


# ------------------------------------------------------------------------- the architecture

def run_settings(margs: argparse.Namespace) -> dict:
    """Our model settings (flat names) of a Megatron-LM run's ``args``; MegatronFormatError
    for anything our GPT blocks (pre-norm RMSNorm, RoPE, SwiGLU, no biases but QKV's) do not
    compute the same way."""
    def get(name, default=None):
        return getattr(margs, name, default)

    refuse = []
    if get("normalization", "LayerNorm") != "RMSNorm":
        refuse.append(f"normalization {get('normalization', 'LayerNorm')} (RMSNorm only)")
    if get("position_embedding_type", "learned_absolute") != "rope":
        refuse.append(f"position_embedding_type "
                      f"{get('position_embedding_type', 'learned_absolute')} (rope only)")
    if not get("swiglu", False):
        refuse.append("no --swiglu (SwiGLU MLPs only)")
    if get("add_bias_linear", not get("disable_bias_linear", False)):
        refuse.append("biases in the linear layers (only the QKV bias: --disable-bias-linear "
                      "with or without --add-qkv-bias)")
    unsupported = {
        "num_experts": "mixture of experts", "multi_latent_attention": "multi-latent attention",
        "mtp_num_layers": "multi-token prediction blocks", "qk_layernorm": "QK layernorm",
        "qk_l2_norm": "QK L2 norm", "rotary_interleaved": "interleaved RoPE",
        "use_rope_scaling": "RoPE scaling", "rotary_seq_len_interpolation_factor":
        "RoPE interpolation", "apply_layernorm_1p": "layernorm 1p", "window_size":
        "sliding-window attention", "squared_relu": "squared ReLU", "openai_gelu": "GeLU",
        "apply_residual_connection_post_layernorm": "post-layernorm residuals",
        "hybrid_layer_pattern": "a hybrid (Mamba) model", "hybrid_override_pattern":
        "a hybrid (Mamba) model", "heterogeneous_layers_config_path": "heterogeneous layers",
        "attention_output_gate": "gated attention output",
    }
    refuse += [what for name, what in unsupported.items() if get(name)]
    if get("rotary_percent", 1.0) != 1.0:
        refuse.append(f"rotary_percent {get('rotary_percent')} (RoPE on the whole head only)")
    if get("softmax_type", "vanilla") != "vanilla":
        refuse.append(f"softmax_type {get('softmax_type')}")
    if refuse:
        raise MegatronFormatError("Megatron-LM checkpoint not supported: " + "; ".join(refuse))
    heads = margs.num_attention_heads
    padded = get("padded_vocab_size")
    if not padded:
        raise MegatronFormatError("the checkpoint's args have no padded_vocab_size (the "
                                  "embedding's rows): not a Megatron-LM GPT checkpoint")
    return dict(
        num_layers=margs.num_layers,
        hidden_size=margs.hidden_size,
        ffn_hidden_size=get("ffn_hidden_size") or 4 * margs.hidden_size,
        num_attention_heads=heads,
        num_query_groups=(get("num_query_groups") if get("group_query_attention") else heads),
        kv_channels=get("kv_channels") or margs.hidden_size // heads,
        seq_length=get("seq_length"),
        max_position_embeddings=get("max_position_embeddings") or get("seq_length"),
        # the padded rows are softmax classes in Megatron-LM too: ours holds them as vocabulary
        vocab_size=padded,
        rotary_base=int(get("rotary_base", 10000)),
        norm_epsilon=float(get("norm_epsilon", 1e-5)),
        untie_embeddings_and_output_weights=bool(get("untie_embeddings_and_output_weights")),
        add_qkv_bias=bool(get("add_qkv_bias")),
    )


def training_settings(margs: argparse.Namespace) -> dict:
    """The batch, LR schedule and optimizer settings of the Megatron-LM run that have our
    meaning (iteration-based schedules; a sample-based one is left to the flags)."""
    out = {}
    for name in TRAINING_SETTINGS:
        value = getattr(margs, name, None)
        if value is None or (name == "bf16" and not value):
            continue
        if name == "lr_decay_style" and value not in _DECAY_STYLES:
            continue
        if name == "lr_wsd_decay_style" and value not in _WSD_STYLES:
            continue
        if name == "tokenizer_type" and value not in _TOKENIZERS:
            continue
        out[name] = value
    return out


def consumed_samples(margs: argparse.Namespace, iteration: int) -> int:
    """Samples the Megatron-LM run consumed (``args.consumed_train_samples``; else iteration x
    global batch)."""
    consumed = getattr(margs, "consumed_train_samples", None)
    if consumed is None:
        consumed = iteration * (getattr(margs, "global_batch_size", None) or 0)
    return int(consumed)


# ------------------------------------------------------------------------------ the weights

def model_sharded_state(model, extra_state: bool = False) -> dict:
    """Our model's sharded state under Megatron-LM's keys (no prefix), without the NITP
    projector and MTP blocks: what Megatron-LM's GPTModel holds. ``extra_state``: with the
    modules' ``_extra_state`` objects (FP8 metadata; empty in the local spec), which a
    Megatron-LM load asks for; an import leaves them out, so that a TE run's checkpoint loads
    into a local model and back. ``model``: unwrapped, one process."""
    state = model.sharded_state_dict(prefix="")
    return {k: v for k, v in state.items() if not k.startswith(("projector.", "mtp."))
            and (extra_state or not k.endswith("_extra_state"))}


def _alternative(key: str) -> str | None:
    for te, local in _NORM_NAMES:
        if te in key:
            return key.replace(te, local)
        if local in key:
            return key.replace(local, te)
    return None


def _match_keys(state: dict, saved: dict, path: str) -> None:
    """Points each tensor of ``state`` at the checkpoint's key: its own, else the other spec's
    norm name (:data:`_NORM_NAMES`). A tensor the checkpoint lacks, or holds at another shape,
    raises MegatronFormatError naming it."""
    for value in state.values():
        key = value.key
        if key not in saved and _alternative(key) in saved:
            value.key = _alternative(key)
        if value.key not in saved:
            raise MegatronFormatError(f"{path} has no tensor {key} (the args describe a model "
                                      "its weights do not hold)")
        shape = getattr(value, "global_shape", None)
        if shape is not None and tuple(saved[value.key].global_shape) != tuple(shape):
            raise MegatronFormatError(f"{path}: {value.key} has shape "
                                      f"{tuple(saved[value.key].global_shape)}, the model built "
                                      f"from its args {tuple(shape)}")


def load_weights(model, path: str) -> None:
    """Loads the decoder of a Megatron-LM checkpoint folder (``iter_*``) into ``model`` (one
    process, built with the checkpoint's shape); the projector keeps its initialization."""
    from megatron.core import dist_checkpointing

    state = model_sharded_state(model)
    _match_keys(state, dist_checkpointing.load_tensors_metadata(path), path)
    loaded = dist_checkpointing.load(state, path, strict="assume_ok_unexpected")
    # the load returns common.pt's entries (args, iteration, ...) beside the tensors asked for
    missing, unexpected = model.load_state_dict({k: loaded[k] for k in state}, strict=False)
    left = [k for k in missing if not k.startswith(("projector.", "mtp."))
            and not k.endswith("_extra_state")]
    if left or unexpected:
        raise MegatronFormatError(f"{path}: not loaded: {', '.join(left + list(unexpected))}")


# -------------------------------------------------------------------------------- the import

def continue_flags(config) -> list[str]:
    """The model flags a run gives to ``--load`` an imported checkpoint (its model settings
    must match the run's)."""
    return as_flags({name: getattr(config.model, name) for name in IMPORT_SETTINGS})


#: the run settings the continue command repeats beside the model's shape
CONTINUE_SETTINGS = ("global_batch_size", "micro_batch_size", "train_iters", "lr", "min_lr",
                     "lr_warmup_iters", "lr_decay_style", "bf16", "tokenizer_type",
                     "tokenizer_model")


def continue_command(save: str, config, flags: list[str] = (),
                     tokenizer_supported: bool = True) -> list[str]:
    """The ``pretrain_gpt_nitp.py`` arguments (data aside) that resume the import at ``save``:
    ``--load``/``--save`` it, its model flags, the Megatron-LM run's batch, schedule and
    tokenizer (TYPE/MODEL placeholders for a tokenizer kind we lack), the import's ``flags``,
    and ``--nitp-start-iter`` as stored."""
    given = {f.split("=")[0][2:].replace("-", "_") for f in flags if f.startswith("--")}
    settings = config.flat()
    train = {k: settings[k] for k in CONTINUE_SETTINGS
             if k not in given and settings[k] is not None}
    if not tokenizer_supported and "tokenizer_type" not in given:
        train.update(tokenizer_type="TYPE", tokenizer_model="MODEL")
    nitp = [] if "nitp_start_iter" in given else ["--nitp-start-iter",
                                                   str(config.nitp_config.start_iter)]
    return (["--load", save, "--save", save] + continue_flags(config) + as_flags(train)
            + list(flags) + nitp)


def import_checkpoint(root: str, save: str, flags: list[str] = ()) -> tuple[str, object, dict]:
    """Converts the latest checkpoint of a Megatron-LM ``--save`` folder into ours at the same
    iteration: the model settings from its ``args``, its batch and schedule settings as
    defaults under ``flags`` (as for ``pretrain_gpt_nitp.py``; ``--nitp-start-iter`` defaults
    to the checkpoint's iteration: NITP from where the NTP run stopped), its decoder's
    weights, the NITP projector initialized as a fresh run's, the consumed samples; no
    optimizer state (module docstring). Returns (our checkpoint folder, the resolved run
    config, a summary: ``iteration``, ``consumed_samples``, ``source``, the run's
    ``tokenizer_type`` and whether ours builds it: ``tokenizer_supported``)."""
    from megatron_nitp.config import ConfigError
    from megatron_nitp.training.checkpoint import MEGATRON_LM, save_checkpoint

    path, iteration = iteration_dir(root)
    common = read_common(path)
    margs = common["args"]
    iteration = int(common.get("iteration", iteration) or 0)
    settings = run_settings(margs)
    flags = list(flags)
    given = given_shape_flags(flags, IMPORT_SETTINGS)
    if given:
        raise MegatronFormatError(f"{', '.join(given)}: the import takes the model's shape from "
                                  f"the checkpoint's args; drop these flags")
    if not any(f.split("=")[0] == "--nitp-start-iter" for f in flags):
        flags += ["--nitp-start-iter", str(iteration)]  # NTP up to here, then NITP
    try:
        target, one, model = import_model(
            as_flags(training_settings(margs)) + flags + as_flags(settings),
            settings["vocab_size"])
    except (ConfigError, ValueError) as err:
        raise MegatronFormatError(str(err)) from err
    load_weights(model, path)
    consumed = consumed_samples(margs, iteration)
    out = save_checkpoint(save, iteration, model, None, None, target, consumed_samples=consumed,
                          imported_from=os.path.abspath(root), imported_format=MEGATRON_LM)
    tokenizer = getattr(margs, "tokenizer_type", None)
    return out, target, {"iteration": iteration, "consumed_samples": consumed, "source": path,
                         "tokenizer_type": tokenizer,
                         "tokenizer_supported": tokenizer is None or tokenizer in _TOKENIZERS}


# -------------------------------------------------------------------------------- the export

def megatron_args(config, iteration: int, consumed: int, bf16: bool = False
                  ) -> argparse.Namespace:
    """Megatron-LM's ``args`` of our run config: the architecture (what Megatron-LM's
    ``--use-checkpoint-args`` and its checks read), the batch and schedule, the position;
    ``bf16``: the precision the run trained in (``config`` is the one-process fp32 one)."""
    m, t, s = config.model, config.training, config.schedule
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size, num_attention_heads=heads,
        group_query_attention=groups != heads, num_query_groups=groups,
        kv_channels=m.kv_channels or m.hidden_size // heads,
        seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings,
        padded_vocab_size=config.derived.padded_vocab_size, vocab_size=config.derived.vocab_size,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        add_qkv_bias=m.add_qkv_bias, add_bias_linear=False, swiglu=True,
        normalization="RMSNorm", norm_epsilon=m.norm_epsilon,
        position_embedding_type="rope", add_position_embedding=True, rotary_percent=1.0,
        rotary_base=m.rotary_base, rotary_interleaved=False, use_rope_scaling=False,
        qk_layernorm=False, num_experts=None, mtp_num_layers=None,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
        train_iters=t.train_iters, lr=s.lr, min_lr=s.min_lr,
        lr_decay_style=s.lr_decay_style, lr_warmup_iters=s.lr_warmup_iters,
        weight_decay=t.weight_decay, clip_grad=t.clip_grad, bf16=bf16, fp16=False,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        tokenizer_type=config.data.tokenizer_type, tokenizer_model=config.data.tokenizer_model,
        seed=t.seed, iteration=iteration, consumed_train_samples=consumed,
        consumed_valid_samples=0, ckpt_format="torch_dist", use_dist_ckpt=True,
    )


def export_checkpoint(checkpoint_root: str, out_root: str) -> tuple[str, int, int]:
    """Our checkpoint (any layout) as a Megatron-LM torch_dist folder: the decoder under
    Megatron-LM's keys (the projector dropped), ``args`` / ``iteration`` /
    ``checkpoint_version`` in common.pt, the tracker; no optimizer or RNG state (resume it
    with Megatron-LM's ``--no-load-optim --no-load-rng``, or ``--finetune``). Returns
    (iteration folder, iteration, decoder parameters)."""
    from megatron.core import dist_checkpointing

    from megatron_nitp.export import load_checkpoint_model
    from megatron_nitp.training.checkpoint import (find_checkpoint, read_meta,
                                                   saved_consumed_samples, trained_precision)

    model, config = load_checkpoint_model(checkpoint_root)
    if config.moe.num_moe_experts:
        raise MegatronFormatError("MoE checkpoints cannot be exported to Megatron-LM here "
                                  "(dense GPT only): export to Hugging Face instead")
    meta = read_meta(find_checkpoint(checkpoint_root))
    iteration, consumed = meta["iteration"], saved_consumed_samples(meta)
    bf16, _ = trained_precision(meta)
    path = os.path.join(out_root, f"iter_{iteration:07d}")
    if os.path.exists(path) and os.listdir(path):
        raise MegatronFormatError(f"{path} exists already: give another output folder")
    os.makedirs(path, exist_ok=True)
    state = {"model": model_sharded_state(model, extra_state=True),
             "args": megatron_args(config, iteration, consumed, bf16),
             "iteration": iteration,
             "checkpoint_version": CHECKPOINT_VERSION,
             "num_floating_point_operations_so_far": 0}
    dist_checkpointing.save(state, path)
    with open(os.path.join(out_root, TRACKER), "w") as f:
        f.write(str(iteration))
    total = sum(p.numel() for n, p in model.named_parameters()
                if not n.startswith(("projector.", "mtp.")))
    return path, iteration, total
