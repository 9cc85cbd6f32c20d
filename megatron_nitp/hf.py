"""Hugging Face <-> megatron-core: one weight mapping and one config translation, used both ways.

Export (``megatron_nitp/export.py``) reads our model's state dict through :func:`to_hf`; import
(:func:`import_checkpoint`, ``tools/import_checkpoint.py``) builds it back through
:func:`from_hf`. Both walk the same list of :class:`Rule` s, so a layout is written down once.

Tensor layouts (megatron-core, local spec names; Transformer Engine's fused pre-linear norms
``*.layer_norm_weight`` are translated to them by :func:`canonical_names`):

- ``linear_qkv.weight`` ``[groups * (q_per_group + 2) * head_dim, h]`` is grouped by key/value
  head: for each group its query heads, then its key, then its value. Hugging Face keeps
  ``q_proj`` ``[heads * head_dim, h]``, ``k_proj`` and ``v_proj`` ``[groups * head_dim, h]``
  (the same for Qwen2's biases, without the ``h`` axis).
- ``linear_fc1.weight`` ``[2 * ffn, h]`` is ``[gate; up]`` (SwiGLU): ``gate_proj``, ``up_proj``.
- MoE layers (Qwen2-MoE, export only): the router ``mlp.router.weight`` ``[E, h]`` is
  ``mlp.gate.weight``; the routed experts' ``local_experts.{j}.linear_fc1`` ``[2 * f, h]`` and
  ``linear_fc2`` ``[h, f]`` stack into ``mlp.experts.gate_up_proj`` ``[E, 2 * f, h]`` (the
  same ``[gate; up]`` order) and ``mlp.experts.down_proj`` ``[E, h, f]``; the shared expert
  is ``mlp.shared_expert.{gate,up,down}_proj``. Qwen2-MoE multiplies the shared expert's output
  by ``sigmoid(shared_expert_gate(x))``; ours has no such gate (megatron-core's
  ``moe_shared_expert_gate`` is off), so the gate's weight is written as zeros (sigmoid(0) =
  0.5 exactly) and the shared ``down_proj`` doubled: 0.5 * (2 W) x = W x, exact in floating
  point (scaling by a power of two rounds nowhere).

Why Qwen2-MoE for the MoE presets rather than DeepSeek-V2/V3 (whose dense first layers and
shared experts the presets follow): transformers' DeepSeek-V2/V3 always use multi-head latent
attention, which cannot hold our GQA attention; Qwen2-MoE has GQA attention (with optional QKV
bias), a shared expert, dense layers where we have them (``mlp_only_layers``), and its routing
is ours exactly: megatron-core (``moe_router_pre_softmax`` False, no scaling factor) takes the
top-k logits and a softmax over those k; Qwen2-MoE with ``norm_topk_prob`` takes a softmax
over all experts, its top k, and renormalizes them to sum to one: the same probabilities
(softmax restricted to a subset and renormalized is the softmax of that subset) and the same
experts (softmax is monotone). Other routing settings are refused (:func:`check_moe_exportable`).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_nitp.config.schema import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM"}

#: Transformer Engine's fused pre-linear norm names -> the local spec's (megatron-core's own
#: ``sharded_state_dict_keys_map`` of the local spec, the other way round).
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


class HFFormatError(ValueError):
    """A Hugging Face checkpoint or model this mapping cannot translate; the message says
    which feature and why."""


@dataclass(frozen=True)
class Rule:
    """Tensors ``ours`` (megatron-core names) <-> tensors ``theirs`` (Hugging Face names):
    ``to_hf`` maps the list of ours to the list of theirs, ``from_hf`` back."""

    ours: tuple
    theirs: tuple
    to_hf: Callable = lambda ts: ts
    from_hf: Callable = lambda ts: ts


def _shape(m: ModelConfig) -> tuple[int, int, int, int]:
    """(heads, key/value groups, head dim, hidden)."""
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    return heads, groups, m.kv_channels or m.hidden_size // heads, m.hidden_size


def _qkv_rule(ours: str, theirs: tuple, args) -> Rule:
    """The fused, per-group interleaved QKV (weight ``[.., h]`` or bias) <-> q, k, v."""
    heads, groups, head_dim, _ = _shape(args.model)
    per_group = heads // groups

    def split(ts):
        qkv = ts[0]
        grouped = qkv.view(groups, per_group + 2, head_dim, *qkv.shape[1:])
        rest = qkv.shape[1:]
        return [grouped[:, :per_group].reshape(-1, *rest),
                grouped[:, per_group].reshape(-1, *rest),
                grouped[:, per_group + 1].reshape(-1, *rest)]

    def merge(ts):
        q, k, v = ts
        rest = q.shape[1:]
        grouped = torch.cat([q.reshape(groups, per_group, head_dim, *rest),
                             k.reshape(groups, 1, head_dim, *rest),
                             v.reshape(groups, 1, head_dim, *rest)], dim=1)
        return [grouped.reshape(-1, *rest)]

    return Rule((ours,), theirs, split, merge)


def _glu_rule(ours: str, gate: str, up: str) -> Rule:
    return Rule((ours,), (gate, up), lambda ts: list(ts[0].chunk(2, dim=0)),
                lambda ts: [torch.cat(ts, dim=0)])


def _stack_rule(ours: list, theirs: str) -> Rule:
    """Per-expert tensors <-> one ``[E, ...]`` tensor."""
    return Rule(tuple(ours), (theirs,), lambda ts: [torch.stack(ts)],
                lambda ts: list(ts[0].unbind(0)))


def rules(args) -> list[Rule]:
    """Every tensor of the decoder (no NITP projector, no MTP block) with its counterpart."""
    out = [Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",))]
    pattern = args.derived.moe_layer_pattern or [0] * args.model.num_layers
    for i in range(args.model.num_layers):
        p, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = [hf + f"self_attn.{x}_proj" for x in "qkv"]
        out += [
            Rule((p + "input_layernorm.weight",), (hf + "input_layernorm.weight",)),
            _qkv_rule(p + "self_attention.linear_qkv.weight", tuple(a + ".weight" for a in attn),
                      args),
            Rule((p + "self_attention.linear_proj.weight",), (hf + "self_attn.o_proj.weight",)),
            Rule((p + "pre_mlp_layernorm.weight",), (hf + "post_attention_layernorm.weight",)),
        ]
        if args.model.add_qkv_bias:
            out.append(_qkv_rule(p + "self_attention.linear_qkv.bias",
                                 tuple(a + ".bias" for a in attn), args))
        if not pattern[i]:
            out += [_glu_rule(p + "mlp.linear_fc1.weight", hf + "mlp.gate_proj.weight",
                              hf + "mlp.up_proj.weight"),
                    Rule((p + "mlp.linear_fc2.weight",), (hf + "mlp.down_proj.weight",))]
            continue
        experts = [p + f"mlp.experts.local_experts.{j}." for j in range(args.moe.num_moe_experts)]
        out += [
            Rule((p + "mlp.router.weight",), (hf + "mlp.gate.weight",)),
            _stack_rule([e + "linear_fc1.weight" for e in experts],
                        hf + "mlp.experts.gate_up_proj"),
            _stack_rule([e + "linear_fc2.weight" for e in experts], hf + "mlp.experts.down_proj"),
        ]
        if args.moe.moe_shared_expert_intermediate_size:
            shared = hf + "mlp.shared_expert."
            out += [
                _glu_rule(p + "mlp.shared_experts.linear_fc1.weight", shared + "gate_proj.weight",
                          shared + "up_proj.weight"),
                # the always-open gate: sigmoid(0) * (2 W) x = W x (module docstring)
                Rule((p + "mlp.shared_experts.linear_fc2.weight",),
                     (shared + "down_proj.weight", hf + "mlp.shared_expert_gate.weight"),
                     lambda ts: [ts[0] * 2, ts[0].new_zeros(1, ts[0].shape[0])],
                     lambda ts: [ts[0] / 2]),
            ]
    out.append(Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",)))
    if args.model.untie_embeddings_and_output_weights:
        out.append(Rule(("output_layer.weight",), ("lm_head.weight",)))
    return out


def canonical_name(key: str) -> str:
    """A parameter's local-spec name (Transformer Engine's fused norm names translated)."""
    for te, local in _TE_NORMS.items():
        if key.endswith(te):
            return key[: -len(te)] + local
    return key


def canonical_names(state: dict) -> dict:
    """A model state dict under local-spec names, without ``_extra_state`` entries."""
    return {canonical_name(k): v for k, v in state.items()
            if not k.endswith("_extra_state") and v is not None}


def to_hf(model, args) -> dict[str, torch.Tensor]:
    """The decoder's weights under Hugging Face names (fp32, contiguous copies)."""
    state = canonical_names(model.state_dict())
    out = {}
    for rule in rules(args):
        out.update(zip(rule.theirs, rule.to_hf([state[k] for k in rule.ours])))
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_hf(hf_state: dict, args) -> dict[str, torch.Tensor]:
    """Hugging Face weights as our decoder's state dict (local spec names; see
    :func:`load_into`). A tied model's missing ``lm_head.weight`` is not needed; any other
    missing tensor raises HFFormatError naming it."""
    out = {}
    for rule in rules(args):
        missing = [k for k in rule.theirs if k not in hf_state]
        if missing:
            raise HFFormatError(f"the Hugging Face checkpoint has no {', '.join(missing)}")
        out.update(zip(rule.ours, rule.from_hf([hf_state[k] for k in rule.theirs])))
    return out


def load_into(model, state: dict) -> None:
    """Copies ``state`` (local spec names, any float dtype) into ``model``'s parameters, under
    Transformer Engine's names where the model has them. The vocabulary may be padded: the
    embedding and output rows past the checkpoint's are set to zero. Every decoder parameter
    must be covered (the NITP projector and MTP blocks keep their initialization)."""
    params = dict(model.named_parameters())
    local = {canonical_name(name): name for name in params}
    for key, value in state.items():
        if key not in local:
            raise HFFormatError(f"our model has no tensor {key} (mapping and model disagree)")
        param = params[local[key]]
        with torch.no_grad():
            if key in ("embedding.word_embeddings.weight", "output_layer.weight") \
                    and value.shape[0] < param.shape[0]:
                param.zero_()
                param[: value.shape[0]].copy_(value)
            elif value.shape != param.shape:
                raise HFFormatError(f"{key}: the checkpoint's shape {tuple(value.shape)} is not "
                                    f"the model's {tuple(param.shape)}")
            else:
                param.copy_(value)
    left = [n for c, n in local.items() if c not in state
            and not n.startswith(("projector.", "mtp."))]
    if left:
        raise HFFormatError(f"not in the Hugging Face checkpoint: {', '.join(left)}")


# ------------------------------------------------------------------------------- config.json

def check_moe_exportable(model_config) -> None:
    """Refuses MoE routing Qwen2-MoE cannot reproduce (module docstring)."""
    required = {
        "moe_router_pre_softmax": False, "moe_router_topk_scaling_factor": None,
        "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
        "moe_shared_expert_gate": False, "moe_router_num_groups": None,
    }
    for name, expected in required.items():
        value = getattr(model_config, name)  # megatron-core TransformerConfig fields
        if value != expected:
            raise HFFormatError(f"Qwen2-MoE export: {name}={value!r} is not representable "
                                f"(only {expected!r}: top-k logits, softmax over the k)")


def hf_config(args) -> dict:
    """config.json of the equivalent ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` (QKV bias) or,
    for a MoE model, ``Qwen2MoeForCausalLM``."""
    heads, groups, head_dim, hidden = _shape(args.model)
    moe = bool(args.moe.num_moe_experts)
    model_type = "qwen2_moe" if moe else "qwen2" if args.model.add_qkv_bias else "llama"
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": args.model.ffn_hidden_size,
        "num_hidden_layers": args.model.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.model.max_position_embeddings,
        "rms_norm_eps": args.model.norm_epsilon,
        "rope_theta": float(args.model.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.model.rotary_base)},
        "vocab_size": args.derived.padded_vocab_size,
        "tie_word_embeddings": not args.model.untie_embeddings_and_output_weights,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if moe:
        pattern = list(args.derived.moe_layer_pattern)
        config.update({
            "qkv_bias": bool(args.model.add_qkv_bias),
            "num_experts": args.moe.num_moe_experts,
            "num_experts_per_tok": args.moe.moe_router_topk,
            "moe_intermediate_size": args.moe.moe_ffn_hidden_size,
            "shared_expert_intermediate_size": args.moe.moe_shared_expert_intermediate_size or 0,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, is_moe in enumerate(pattern) if not is_moe],
            "use_sliding_window": False,
            "output_router_logits": False,
        })
        if not args.moe.moe_shared_expert_intermediate_size:
            raise HFFormatError("Qwen2-MoE export needs the shared expert (every Qwen2-MoE "
                                "layer has one); this model has none.")
    return config


def run_settings(config: dict) -> dict:
    """Our model settings (flat names) of a Hugging Face Llama or Qwen2 ``config.json``;
    HFFormatError for anything our blocks do not compute the same way."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen2"):
        what = ("mixture-of-experts import is not supported (export only)"
                if "moe" in str(model_type) else "only llama and qwen2 are supported")
        raise HFFormatError(f"model_type {model_type!r}: {what}")
    refuse = []
    if config.get("hidden_act", "silu") != "silu":
        refuse.append(f"hidden_act {config['hidden_act']!r} (SwiGLU with silu only)")
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        refuse.append(f"rope scaling {config.get('rope_scaling') or rope} (plain RoPE only)")
    if config.get("use_sliding_window") or (
            model_type == "llama" and config.get("sliding_window")):
        refuse.append("sliding-window attention")
    if config.get("mlp_bias"):
        refuse.append("mlp_bias (no biases but Qwen2's QKV)")
    if model_type == "llama" and config.get("attention_bias"):
        refuse.append("attention_bias on Llama (bias on o_proj too; only Qwen2's QKV bias)")
    if refuse:
        raise HFFormatError(f"{model_type} checkpoint not supported: " + "; ".join(refuse))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise HFFormatError(f"rope_theta {theta} is not an integer (--rotary-base is)")
    return dict(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings"),
        rotary_base=int(theta),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        add_qkv_bias=model_type == "qwen2",
    )


def vocab_divisor(vocab: int, tensor_parallel: int) -> int:
    """The largest ``--make-vocab-size-divisible-by`` (128 at most, a power of two) under which
    ``vocab`` needs no padding at this TP size; 1 when TP does not divide it (then rows are
    padded)."""
    divisor = 128
    while divisor > 1 and vocab % (divisor * tensor_parallel):
        divisor //= 2
    return divisor


def read_hf_state(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's ``*.safetensors`` files (one or sharded)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(hf_dir, "*.bin"))
        raise HFFormatError(f"no *.safetensors in {hf_dir}" + (
            " (it holds PyTorch .bin weights: save them with safe_serialization=True)"
            if bins else ""))
    state = {}
    for path in files:
        state.update(load_file(path))
    return state


# -------------------------------------------------------------------------------- the import

#: model flags an import sets from config.json; giving one of them as well is refused
IMPORT_SETTINGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings",
                   "rotary_base", "norm_epsilon", "untie_embeddings_and_output_weights",
                   "add_qkv_bias", "make_vocab_size_divisible_by")


def import_model(argv: list[str], vocab_size: int):
    """What an import (Hugging Face or Megatron-LM) writes: the run config of ``argv`` with the
    vocabulary padding for its TP (:func:`vocab_divisor`), resolved for its model-parallel
    layout; the one-process config; and the one-process model, built and initialized as a fresh
    run (the NITP projector keeps that draw; the caller loads the imported weights).
    Raises ConfigError / ValueError for flags that cannot run."""
    from megatron_nitp.config import resolve
    from megatron_nitp.config.stored import config_from_meta
    from megatron_nitp.models.initialization import initialize_weights
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.initialize import initialize_distributed, set_seed
    from megatron_nitp.training.model import build_model

    args = parse_args(argv)
    tp = args.parallel.tensor_model_parallel_size
    args = args.replace(make_vocab_size_divisible_by=vocab_divisor(vocab_size, tp))
    p = args.parallel
    target = resolve(args, tp * p.pipeline_model_parallel_size * p.context_parallel_size)
    one = config_from_meta({"config": target.to_dict()})
    initialize_distributed()
    set_seed(one.training.seed)
    model = build_model(one, pre_process=True, post_process=True)
    initialize_weights(model, one.training.seed)
    return target, one, model


def given_shape_flags(flags, settings=IMPORT_SETTINGS) -> list[str]:
    """The flags among ``flags`` that set one of ``settings``: an import takes the model's shape
    from the checkpoint it reads, so giving them is refused (the caller names the source)."""
    return [f for f in flags
            if f.startswith("--") and f[2:].replace("-", "_").split("=")[0] in settings]


def as_flags(settings: dict) -> list[str]:
    """Flat settings as command-line flags (a boolean is its flag when true)."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            if value:
                flags.append("--" + name.replace("_", "-"))
        elif value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def continue_flags(config) -> list[str]:
    """The model flags a run gives to ``--load`` an imported checkpoint: what the import took
    from config.json (the checkpoint's model settings must match the run's)."""
    return as_flags({name: getattr(config.model, name) for name in IMPORT_SETTINGS})


def tokenizer_flags(hf_dir: str, flags: list[str] = ()) -> list[str]:
    """The tokenizer flags a run on the imported checkpoint needs (its data must be tokenized
    with the model's own tokenizer): none when ``flags`` name one; the folder's
    ``tokenizer.json`` (HuggingFaceTokenizer) or ``tokenizer.model`` (SentencePieceTokenizer;
    Llama2Tokenizer where ``tokenizer_config.json`` says ``"add_bos_token": true``, as Llama 2's
    does: its documents start with BOS); else placeholders to fill in."""
    if any(f.split("=")[0] in ("--tokenizer-model", "--tokenizer-type") for f in flags):
        return []
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir]
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        settings = {}
        try:
            with open(os.path.join(hf_dir, "tokenizer_config.json")) as f:
                settings = json.load(f)
        except (OSError, ValueError):  # none, or unreadable: the plain kind
            pass
        bos = isinstance(settings, dict) and settings.get("add_bos_token") is True
        kind = "Llama2Tokenizer" if bos else "SentencePieceTokenizer"
        return ["--tokenizer-type", kind, "--tokenizer-model",
                os.path.join(hf_dir, "tokenizer.model")]
    return ["--tokenizer-type", "TYPE", "--tokenizer-model", "MODEL"]


def import_checkpoint(hf_dir: str, save: str, flags: list[str] = ()) -> tuple[str, object]:
    """Converts a Hugging Face Llama/Qwen2 folder into our checkpoint at iteration 0: the run
    config from ``flags`` (training, NITP and layout flags as for ``pretrain_gpt_nitp.py``)
    with the model settings from ``config.json``, the decoder's weights from the safetensors,
    the NITP projector initialized as a fresh run's (``models/initialization.py``). Returns
    (checkpoint folder, the resolved run config). Single process: the checkpoint is
    dist_checkpointing's and loads under any TP/PP layout; ``--tensor-model-parallel-size``
    only chooses the vocabulary padding (none where TP divides it)."""
    from megatron_nitp.config import ConfigError
    from megatron_nitp.training.checkpoint import save_checkpoint

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    settings = run_settings(hf)
    flags = list(flags)
    given = given_shape_flags(flags)
    if given:
        raise HFFormatError(f"{', '.join(given)}: the import takes the model's shape from "
                            f"{hf_dir}/config.json; drop these flags")
    try:
        target, one, model = import_model(flags + as_flags(settings), settings["vocab_size"])
    except (ConfigError, ValueError) as err:
        raise HFFormatError(str(err)) from err
    load_into(model, from_hf(read_hf_state(hf_dir), one))
    path = save_checkpoint(save, 0, model, None, None, target,
                           imported_from=os.path.abspath(hf_dir))
    return path, target

