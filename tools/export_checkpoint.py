"""Export a megatron-nitp checkpoint (any TP/PP layout) as a Hugging Face model directory, or
as a Megatron-LM torch_dist checkpoint folder.

    python tools/export_checkpoint.py --load runs/x/checkpoints --output hf/x [--keep-projector]
    python tools/export_checkpoint.py --load runs/x/checkpoints --format megatron --output mlm/x

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained("hf/x")``: a
Llama-style model (Qwen2-style with QKV bias) without the NITP projector; ``--keep-projector``
writes the projector apart for analysis. The run's tokenizer is copied beside it (a
SentencePiece ``tokenizer.model``, a Hugging Face ``tokenizer.json``, a tiktoken
``tiktoken.json``) and named in ``nitp_tokenizer.json``.

``--format megatron`` (``megatron_nitp/megatron_lm.py``) writes what Megatron-LM's
``pretrain_gpt.py --ckpt-format torch_dist`` loads: the tracker, ``iter_%07d/`` with the decoder
(projector dropped), and ``args`` / ``iteration`` in common.pt; no optimizer or RNG state
(resume there with ``--no-load-optim --no-load-rng``, or ``--finetune``).
"""


import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)
from megatron_nitp.cli import ArgumentParser


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (with the tracker file)")
    p.add_argument("--output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--format", choices=("hf", "megatron"), default="hf",
                   help="hf: Hugging Face model directory; megatron: Megatron-LM torch_dist "
                        "checkpoint folder")
    p.add_argument("--keep-projector", action="store_true",
                   help="also write the NITP projector (nitp_projector.safetensors; hf only)")
    args = p.parse_args(argv)
    if args.format == "megatron":
        export_megatron(args.load, args.output)
        return
    from megatron_nitp.export import EXPORT_ERRORS, export_checkpoint

    try:
        written, total = export_checkpoint(args.load, args.output, args.keep_projector)
    except EXPORT_ERRORS as err:
        raise SystemExit(f"error: {err}")
    kept = "kept apart" if args.keep_projector else "dropped"
    print(f"> exported {args.load} -> {args.output}: {', '.join(written)} "
          f"({total:,} parameters in fp32, projector {kept})")



def export_megatron(load, output):
    from megatron_nitp.export import EXPORT_ERRORS
    from megatron_nitp.megatron_lm import MegatronFormatError, export_checkpoint

    try:
        path, iteration, total = export_checkpoint(load, output)
    except EXPORT_ERRORS + (MegatronFormatError,) as err:
        raise SystemExit(f"error: {err}")
    print(f"> exported {load} -> {path} (Megatron-LM torch_dist, iteration {iteration}, "
          f"{total:,} parameters, projector dropped, no optimizer or RNG state)")
    print(f"> in Megatron-LM: pretrain_gpt.py <the same model flags> --load {output} "
          "--ckpt-format torch_dist --no-load-optim --no-load-rng (continues at iteration "
          f"{iteration}; --finetune starts at 0)")


if __name__ == "__main__":
    main()
