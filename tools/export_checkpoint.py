"""Export a megatron-nitp checkpoint (any TP/PP layout) as a Hugging Face model directory.

    python tools/export_checkpoint.py --load runs/x/checkpoints --output hf/x [--keep-projector]

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained("hf/x")``: a
Llama-style model (Qwen2-style with QKV bias) without the NITP projector; ``--keep-projector``
writes the projector apart for analysis. The run's tokenizer is copied beside it (a
SentencePiece ``tokenizer.model``, a Hugging Face ``tokenizer.json``, a tiktoken
``tiktoken.json``) and named in ``nitp_tokenizer.json``.
"""


import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)
from megatron_nitp.cli import ArgumentParser


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (with the tracker file)")
    p.add_argument("--output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--keep-projector", action="store_true",
                   help="also write the NITP projector (nitp_projector.safetensors)")
    args = p.parse_args(argv)
    from megatron_nitp.export import EXPORT_ERRORS, export_checkpoint

    try:
        written, total = export_checkpoint(args.load, args.output, args.keep_projector)
    except EXPORT_ERRORS as err:
        raise SystemExit(f"error: {err}")
    kept = "kept apart" if args.keep_projector else "dropped"
    print(f"> exported {args.load} -> {args.output}: {', '.join(written)} "
          f"({total:,} parameters in fp32, projector {kept})")


if __name__ == "__main__":
    main()
