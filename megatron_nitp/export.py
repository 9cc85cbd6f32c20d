"""Export a trained NITP model as a Hugging Face Llama / Qwen2 checkpoint, without the projector.

The NITP projector is used in training only, so the exported model is the plain decoder: the
same parameters as the NTP baseline. Tensor layouts translated from megatron-core:

- ``linear_qkv.weight`` ``[groups * (q_per_group + 2) * head_dim, h]`` is grouped by key/value
  head: for each group, its query heads, then its key, then its value. Split into
  ``q_proj`` ``[heads * head_dim, h]``, ``k_proj`` and ``v_proj`` ``[groups * head_dim, h]``
  (the same for the bias of Qwen2).
- ``linear_fc1.weight`` ``[2 * ffn, h]`` is ``[gate; up]`` (SwiGLU): ``gate_proj``, ``up_proj``.
- norms: the local spec's ``input_layernorm`` / ``pre_mlp_layernorm``, or TE's fused
  ``layer_norm_weight`` on the following linear.
"""

from __future__ import annotations

import json
import os

import torch


def load_checkpoint_model(checkpoint_root: str):
    """(model, config): the single-process model of a checkpoint, built from the run config it
    stores and loaded with its weights (resharded from any training layout). Export, the
    evaluation tools and the lm-eval bridge start here."""
    from megatron_nitp.training.checkpointing import (config_from_meta, find_checkpoint,
                                                      load_model_weights, read_meta)
    from megatron_nitp.training.initialize import initialize_distributed, set_seed
    from megatron_nitp.training.model import build_model

    meta = read_meta(find_checkpoint(checkpoint_root))
    if meta["model"].get("num_moe_experts"):
        raise SystemExit("error: Hugging Face export supports dense models only (this "
                         "checkpoint is a mixture-of-experts model).")
    config = config_from_meta(meta)
    initialize_distributed()
    set_seed(0)
    net = build_model(config, pre_process=True, post_process=True)
    load_model_weights(checkpoint_root, net)
    return net, config


def export_checkpoint(checkpoint_root: str, out_dir: str, keep_projector: bool = False
                      ) -> tuple[list[str], int]:
    """A checkpoint (any layout) as a Hugging Face model folder with its tokenizer: (files
    written, parameters exported). ``tools/export_checkpoint.py`` and the lm-eval bridge."""

    model, config = load_checkpoint_model(checkpoint_root)
    written = export_hf(model, config, out_dir, keep_projector=keep_projector)
    written += export_tokenizer(config, out_dir)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("projector."))
    return written, total


#: Written beside an export: which tokenizer the model was trained with, for the lm-eval bridge
#: (``{"tokenizer_type": ..., "tokenizer_model": file or folder relative to the export, or
#: null, "vocab_size": ...}``). Exports without it hold a SentencePiece ``tokenizer.model``.
TOKENIZER_RECORD = "nitp_tokenizer.json"

#: The files of a Hugging Face tokenizer folder that an export copies (the ones that exist).
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "chat_template.jinja")


def export_tokenizer(config, out_dir: str) -> list[str]:
    """Copies the checkpoint's tokenizer (``config.tokenizer_type`` / ``tokenizer_model``, as
    the stored config records them; a config without the type is SentencePiece) into the export
    and records it in :data:`TOKENIZER_RECORD`: SentencePiece as ``tokenizer.model``, Hugging
    Face as its ``tokenizer.json`` (and config) at the top of the folder, where
    ``transformers.AutoTokenizer`` looks, tiktoken as ``tiktoken.json``; NullTokenizer has no
    file. A tokenizer file missing on this machine is skipped (the record says none). Returns
    the files written."""
    import shutil

    kind, source = config.tokenizer_type, config.tokenizer_model
    copied: list[str] = []
    if source and os.path.exists(source):
        if kind == "HuggingFaceTokenizer":
            folder = source if os.path.isdir(source) else os.path.dirname(source)
            for name in _HF_TOKENIZER_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copy(os.path.join(folder, name), os.path.join(out_dir, name))
                    copied.append(name)
        elif kind in ("SentencePieceTokenizer", "TikTokenizer"):
            name = "tokenizer.model" if kind == "SentencePieceTokenizer" else "tiktoken.json"
            shutil.copy(source, os.path.join(out_dir, name))
            copied.append(name)
    model = {"HuggingFaceTokenizer": ".", "SentencePieceTokenizer": "tokenizer.model",
             "TikTokenizer": "tiktoken.json"}.get(kind) if copied else None
    record = {"tokenizer_type": kind, "tokenizer_model": model,
              "vocab_size": config.model.vocab_size}
    with open(os.path.join(out_dir, TOKENIZER_RECORD), "w") as f:
        json.dump(record, f, indent=2)
    return copied + [TOKENIZER_RECORD]


def exported_tokenizer(model_dir: str, tokenizer_type: str | None = None,
                       tokenizer_model: str | None = None):
    """The tokenizer of an export (:func:`export_tokenizer`'s record; an export without one
    has a SentencePiece ``tokenizer.model``), or the ``tokenizer_type``/``tokenizer_model``
    given instead, built by ``build_tokenizer``. Raises FileNotFoundError / ValueError naming
    the fix."""
    from megatron_nitp.data.tokenizer import DEFAULT_TOKENIZER_TYPE, build_tokenizer

    record = {"tokenizer_type": DEFAULT_TOKENIZER_TYPE, "tokenizer_model": "tokenizer.model",
              "vocab_size": None}
    path = os.path.join(model_dir, TOKENIZER_RECORD)
    if os.path.exists(path):
        with open(path) as f:
            record.update(json.load(f))
    kind = tokenizer_type or record["tokenizer_type"]
    model = tokenizer_model
    if model is None and record["tokenizer_model"] is not None:
        model = os.path.join(model_dir, record["tokenizer_model"])
    if model is None and kind != "NullTokenizer":
        raise FileNotFoundError(f"no tokenizer in {model_dir} (the checkpoint's {kind} was not "
                                "found at export): pass --tokenizer-model")
    return build_tokenizer(kind, model, record.get("vocab_size"))


def _get(state: dict, *names: str) -> torch.Tensor:
    for name in names:
        if name in state and state[name] is not None:
            return state[name]
    raise KeyError(f"none of {names} in the model state")


def hf_config(args) -> dict:
    """config.json of the equivalent ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM`` with QKV
    bias)."""
    head_dim = args.kv_channels or args.hidden_size // args.num_attention_heads
    qwen = bool(args.add_qkv_bias)
    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_query_groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.norm_epsilon,
        "rope_theta": float(args.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rotary_base)},
        "vocab_size": args.padded_vocab_size,
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    return config


def hf_state_dict(model, args) -> dict[str, torch.Tensor]:
    """The decoder's weights under Hugging Face Llama/Qwen2 names (no projector)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    heads, groups = args.num_attention_heads, args.num_query_groups
    head_dim = args.kv_channels or args.hidden_size // heads
    per_group = heads // groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"]}
    for i in range(args.num_layers):
        p = f"decoder.layers.{i}."
        hf = f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = _get(
            state, p + "input_layernorm.weight", p + "self_attention.linear_qkv.layer_norm_weight")
        qkv = state[p + "self_attention.linear_qkv.weight"].view(
            groups, per_group + 2, head_dim, args.hidden_size)
        out[hf + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(-1, args.hidden_size)
        out[hf + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(-1, args.hidden_size)
        out[hf + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(-1, args.hidden_size)
        if args.add_qkv_bias:
            bias = state[p + "self_attention.linear_qkv.bias"].view(groups, per_group + 2, head_dim)
            out[hf + "self_attn.q_proj.bias"] = bias[:, :per_group].reshape(-1)
            out[hf + "self_attn.k_proj.bias"] = bias[:, per_group].reshape(-1)
            out[hf + "self_attn.v_proj.bias"] = bias[:, per_group + 1].reshape(-1)
        out[hf + "self_attn.o_proj.weight"] = state[p + "self_attention.linear_proj.weight"]
        out[hf + "post_attention_layernorm.weight"] = _get(
            state, p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.layer_norm_weight")
        gate, up = state[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate
        out[hf + "mlp.up_proj.weight"] = up
        out[hf + "mlp.down_proj.weight"] = state[p + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    if args.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_hf(model, args, out_dir: str, keep_projector: bool = False) -> list[str]:
    """Writes ``config.json`` and ``model.safetensors`` (and, with ``keep_projector``, the NITP
    projector apart in ``nitp_projector.safetensors`` + ``nitp_projector.json``)."""
    from safetensors.torch import save_file

    if getattr(args, "num_moe_experts", None):
        raise ValueError("Hugging Face export supports the dense presets' block type only; "
                         "this checkpoint is a mixture-of-experts model.")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(args), f, indent=2)
    written.append("config.json")
    save_file(hf_state_dict(model, args), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    written.append("model.safetensors")
    if keep_projector and model.projector is not None:
        projector = {k: v.detach().float().contiguous().clone()
                     for k, v in model.projector.state_dict().items()
                     if not k.endswith("_extra_state")}
        save_file(projector, os.path.join(out_dir, "nitp_projector.safetensors"))
        with open(os.path.join(out_dir, "nitp_projector.json"), "w") as f:
            json.dump({"nitp": dict(args.nitp_config.__dict__),
                       "layout": "gate/up: [ratio*d, d], down: [d, ratio*d]; "
                                 "P(h) = down(silu(gate h) * up h)"}, f, indent=2)
        written += ["nitp_projector.safetensors", "nitp_projector.json"]
    return written
