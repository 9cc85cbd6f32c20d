"""Export a trained NITP model as a Hugging Face checkpoint, without the projector, with its
tokenizer.

The NITP projector is used in training only, so the exported model is the plain decoder: the
same parameters as the NTP baseline. Dense models become ``LlamaForCausalLM`` (``Qwen2ForCausalLM``
with QKV bias), the MoE presets ``Qwen2MoeForCausalLM``; the weight layouts, and why these
architectures, are in ``megatron_nitp/hf.py`` (the same mapping imports).
"""

from __future__ import annotations

import json
import os

from megatron_nitp.data.tokenizer import SENTENCEPIECE_TYPES
from megatron_nitp.hf import HFFormatError, hf_config, to_hf  # noqa: F401  (hf_config: API)
from megatron_nitp.training.checkpoint import CheckpointError

#: What export and evaluation report as one line (``error: ...``) instead of a traceback: a
#: checkpoint that is missing, damaged or not rebuildable here, or not expressible in Hugging
#: Face's format.
EXPORT_ERRORS = (CheckpointError, HFFormatError)


def load_checkpoint_model(checkpoint_root: str, bf16: bool = False):
    """(model, config): the single-process model of a checkpoint, built from the run config it
    stores (``config.stored.config_from_meta``) and loaded with its weights (resharded from any
    training layout). Export, the evaluation tools and the lm-eval bridge start here. Raises
    CheckpointError (one line) for a checkpoint that cannot be used.

    The model computes in fp32 whatever precision it was trained in (a ``--bf16`` run's
    weights, already bf16-rounded, are held in fp32), so that evaluations of bf16 and fp32 runs
    compare like with like; ``bf16=True`` builds it in bf16 instead (``config.training.bf16`` says
    which)."""
    from megatron_nitp.config import ConfigError
    from megatron_nitp.config.stored import config_from_meta
    from megatron_nitp.training.checkpoint import (find_checkpoint, load_model_weights,
                                                   read_meta)
    from megatron_nitp.training.initialize import initialize_distributed, set_seed
    from megatron_nitp.training.model import build_model

    path = find_checkpoint(checkpoint_root)
    meta = read_meta(path)
    try:
        config = config_from_meta(meta)
    except ConfigError as err:
        raise CheckpointError(f"{path}: the run config it stores cannot be rebuilt here: "
                              f"{err}") from err
    config = config.replace(bf16=bf16, fp16=False, derived=config.derived)  # shapes unchanged
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
    """Writes the checkpoint's tokenizer (``config.data.tokenizer_type`` / ``tokenizer_model``, as
    the stored config records them; a config without the type is SentencePiece) into the export,
    so that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (and lm-eval's own ``hf``
    model) encodes as training did, and records it in :data:`TOKENIZER_RECORD`: SentencePiece as
    ``tokenizer.model`` converted to a transformers tokenizer (:func:`_sentencepiece_tokenizer`),
    GPT-2's BPE (``--vocab-file``/``--merge-file``) as the Hugging Face tokenizer it is read as,
    Hugging Face as its ``tokenizer.json`` (and config) at the top of the folder, tiktoken as
    ``tiktoken.json``; NullTokenizer has no file. A tokenizer file missing on this machine is
    skipped (the record says none). Returns the files written."""
    import shutil

    kind, source = config.data.tokenizer_type, config.data.tokenizer_model
    copied: list[str] = []
    merge_file = config.data.merge_file
    if kind == "GPT2BPETokenizer" and source and merge_file and os.path.exists(source) \
            and os.path.exists(merge_file):
        from megatron_nitp.data.tokenizer import gpt2_bpe_folder

        # GPT-2's vocab.json + merges.txt, as the Hugging Face tokenizer training read them
        kind, source = "HuggingFaceTokenizer", gpt2_bpe_folder(source, merge_file)
    if source and os.path.exists(source):
        if kind == "HuggingFaceTokenizer":
            folder = source if os.path.isdir(source) else os.path.dirname(source)
            for name in _HF_TOKENIZER_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copy(os.path.join(folder, name), os.path.join(out_dir, name))
                    copied.append(name)
        elif kind in SENTENCEPIECE_TYPES:
            copied += _sentencepiece_tokenizer(source, out_dir,
                                               add_bos=kind == "Llama2Tokenizer")
        elif kind == "TikTokenizer":
            shutil.copy(source, os.path.join(out_dir, "tiktoken.json"))
            copied.append("tiktoken.json")
    model = {"HuggingFaceTokenizer": ".", "TikTokenizer": "tiktoken.json",
             **{t: "tokenizer.model" for t in SENTENCEPIECE_TYPES}}.get(kind) if copied else None
    record = {"tokenizer_type": kind, "tokenizer_model": model,
              "vocab_size": config.model.vocab_size}
    with open(os.path.join(out_dir, TOKENIZER_RECORD), "w") as f:
        json.dump(record, f, indent=2)
    return copied + [TOKENIZER_RECORD]


def _sentencepiece_tokenizer(tokenizer_model: str, out_dir: str,
                             add_bos: bool = False) -> list[str]:
    """A SentencePiece ``.model`` as a transformers tokenizer in ``out_dir``: copied as
    ``tokenizer.model`` and converted by ``LlamaTokenizer`` (its BPE pieces, byte fallback and
    "▁" prefix) into ``tokenizer.json``, adding no EOS and no BOS (our documents have none but
    the EOD between them) unless ``add_bos`` (Llama2Tokenizer: BOS first, as in training), with
    the model's unk/bos/eos/pad pieces. Returns the names of the files written."""
    import shutil

    import sentencepiece
    import transformers

    shutil.copy(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(tokenizer_model)
    special = {name: sp.IdToPiece(i) for name, i in (
        ("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
        ("pad_token", sp.pad_id())) if i >= 0}
    tokenizer = transformers.LlamaTokenizer.from_pretrained(
        out_dir, add_bos_token=add_bos, add_eos_token=False, legacy=False, **special)
    saved = {os.path.basename(f) for f in tokenizer.save_pretrained(out_dir)}
    return ["tokenizer.model"] + sorted(saved - {"tokenizer.model"})


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


def export_hf(model, args, out_dir: str, keep_projector: bool = False) -> list[str]:
    """Writes ``config.json`` and ``model.safetensors`` (and, with ``keep_projector``, the NITP
    projector apart in ``nitp_projector.safetensors`` + ``nitp_projector.json``)."""
    from safetensors.torch import save_file

    from megatron_nitp.hf import check_moe_exportable

    if args.moe.num_moe_experts:
        check_moe_exportable(model.config)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(args), f, indent=2)
    written.append("config.json")
    save_file(to_hf(model, args), os.path.join(out_dir, "model.safetensors"),
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
