"""Export a megatron-nitp checkpoint (any TP/PP layout) as a Hugging Face model directory.

    python tools/export_checkpoint.py --load runs/x/checkpoints --output hf/x [--keep-projector]

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained("hf/x")``: a
Llama-style model (Qwen2-style with QKV bias) without the NITP projector; ``--keep-projector``
writes the projector apart for analysis. The SentencePiece tokenizer is copied beside it.
"""

import argparse
import os
import shutil

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)
from megatron_nitp.export import load_checkpoint_model as load_for_export


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
