"""Import a Hugging Face Llama or Qwen2 checkpoint as a megatron-nitp checkpoint, to continue
pretraining it with NITP.

    python tools/import_checkpoint.py --hf hf/qwen2-0.5b --save ckpt/qwen2-0.5b \\
        [--nitp-target-layer 5 --tensor-model-parallel-size 2 ...]

The folder needs config.json and *.safetensors. The model's shape comes from config.json; any
other ``pretrain_gpt_nitp.py`` flag after the tool's own (NITP, layout, precision, ...) goes into
the stored run config. The decoder's weights are translated (``megatron_nitp/hf.py``), the NITP
projector is freshly initialized, and the checkpoint (iteration 0, any TP/PP layout can load
it) continues with ``pretrain_gpt_nitp.py --load CKPT --finetune`` and the model flags the tool
prints. Rope scaling, sliding windows, biases other than Qwen2's QKV and MoE checkpoints are
refused with the reason.
"""

import shlex

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)
from megatron_nitp.cli import ArgumentParser


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="other flags: as for pretrain_gpt_nitp.py")
    p.add_argument("--hf", required=True, help="Hugging Face model folder (config.json, "
                                               "*.safetensors)")
    p.add_argument("--save", required=True, help="checkpoint folder to write")
    args, flags = p.parse_known_args(argv)
    from megatron_nitp.hf import (HFFormatError, continue_flags, import_checkpoint,
                                  tokenizer_flags)

    try:
        path, config = import_checkpoint(args.hf, args.save, flags)
    except (HFFormatError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    print(f"> imported {args.hf} -> {path} (iteration 0, NITP projector freshly initialized)")
    if config.padded_vocab_size > config.vocab_size:
        print(f"> vocabulary {config.vocab_size} padded to {config.padded_vocab_size} rows "
              "(zeros; TP does not divide it): never targets, they add to the softmax's sum "
              "until trained down")
    tokenizer = tokenizer_flags(args.hf, flags)
    print("> continue pretraining with:\n  python pretrain_gpt_nitp.py --load "
          f"{shlex.quote(args.save)} --finetune "
          f"{shlex.join(continue_flags(config) + flags + tokenizer)} --data-path DATA_PREFIX ...")
    if "MODEL" in tokenizer:
        print(f"  ({args.hf} holds no tokenizer.json or tokenizer.model: give the model's own "
              "tokenizer as TYPE and MODEL)")
    print("  (DATA_PREFIX: data tokenized with that tokenizer by tools/preprocess_data.py)")


if __name__ == "__main__":
    main()
