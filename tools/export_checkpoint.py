"""Export a megatron-nitp checkpoint (any TP/PP layout) as a Hugging Face model directory.

    python tools/export_checkpoint.py --load runs/x/checkpoints --output hf/x [--keep-projector]

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained("hf/x")``: a
Llama-style model (Qwen2-style with QKV bias) without the NITP projector; ``--keep-projector``
writes the projector apart for analysis. The SentencePiece tokenizer is copied beside it.
"""

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_nitp  # noqa: E402,F401


def load_for_export(checkpoint_root: str):
    """Builds the single-process model of a checkpoint and loads its weights (resharded)."""
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.checkpointing import find_checkpoint, load_model_weights, read_meta
    from megatron_nitp.training.initialize import initialize_distributed, set_seed
    from megatron_nitp.training.model import build_model

    meta = read_meta(find_checkpoint(checkpoint_root))
    model, nitp, extra = meta["model"], meta["nitp"], meta.get("export", {})
    flags = ["--num-layers", str(model["num_layers"]), "--hidden-size", str(model["hidden_size"]),
             "--ffn-hidden-size", str(model["ffn_hidden_size"]),
             "--num-attention-heads", str(model["num_attention_heads"]),
             "--num-query-groups", str(model["num_query_groups"]),
             "--seq-length", str(extra.get("seq_length") or 128),
             "--nitp-target-layer", str(nitp["target_layer"]),
             "--nitp-projector", nitp["projector"],
             "--nitp-projector-ffn-ratio", str(nitp["projector_ffn_ratio"]),
             "--train-iters", "1", "--lr-warmup-iters", "0"]
    if model.get("kv_channels"):
        flags += ["--kv-channels", str(model["kv_channels"])]
    if model.get("untie_embeddings_and_output_weights"):
        flags.append("--untie-embeddings-and-output-weights")
    if model.get("add_qkv_bias"):
        flags.append("--add-qkv-bias")
    for key, flag in (("rotary_base", "--rotary-base"), ("norm_epsilon", "--norm-epsilon"),
                      ("max_position_embeddings", "--max-position-embeddings")):
        if extra.get(key) is not None:
            flags += [flag, str(extra[key])]
    if not nitp["enabled"]:
        flags.append("--no-nitp")
    if model.get("num_moe_experts"):
        raise SystemExit("error: Hugging Face export supports dense models only (this "
                         "checkpoint is a mixture-of-experts model).")
    args = parse_args(flags)
    args.vocab_size = args.padded_vocab_size = model["padded_vocab_size"]
    args.tokenizer_model = extra.get("tokenizer_model")
    initialize_distributed()
    set_seed(0)
    net = build_model(args, pre_process=True, post_process=True)
    load_model_weights(checkpoint_root, net)
    return net, args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (with the tracker file)")
    p.add_argument("--output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--keep-projector", action="store_true",
                   help="also write the NITP projector (nitp_projector.safetensors)")
    args = p.parse_args(argv)
    from megatron_nitp.export import export_hf
    from megatron_nitp.training.checkpointing import CheckpointError

    try:
        model, margs = load_for_export(args.load)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    written = export_hf(model, margs, args.output, keep_projector=args.keep_projector)
    if margs.tokenizer_model and os.path.exists(margs.tokenizer_model):
        shutil.copy(margs.tokenizer_model, os.path.join(args.output, "tokenizer.model"))
        written.append("tokenizer.model")
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("projector."))
    print(f"> exported {args.load} -> {args.output}: {', '.join(written)} "
          f"({total:,} parameters, projector {'kept apart' if args.keep_projector else 'dropped'})")


if __name__ == "__main__":
    main()
