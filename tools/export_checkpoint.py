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
    """Builds the single-process model of a checkpoint from its stored run config and loads its
    weights (resharded from any training layout)."""
    from megatron_nitp.training.checkpointing import (config_from_meta, find_checkpoint,
                                                      load_model_weights, read_meta)
    from megatron_nitp.training.initialize import initialize_distributed, set_seed
    from megatron_nitp.training.model import build_model

    meta = read_meta(find_checkpoint(checkpoint_root))
    if meta["model"].get("num_moe_experts"):
        raise SystemExit("error: Hugging Face export supports dense models only (this "
                         "checkpoint is a mixture-of-experts model).")
    args = config_from_meta(meta)
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
