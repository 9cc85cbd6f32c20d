"""Import a Hugging Face Llama or Qwen2 checkpoint, or a Megatron-LM GPT run's torch_dist
checkpoint, as a megatron-nitp checkpoint, to continue pretraining it with NITP.

    python tools/import_checkpoint.py --hf hf/qwen2-0.5b --save ckpt/qwen2-0.5b \\
        [--nitp-target-layer 5 --tensor-model-parallel-size 2 ...]
    python tools/import_checkpoint.py --megatron mlm/checkpoints --save ckpt/nitp \\
        [--nitp-target-layer 5 ...]

--hf: the folder needs config.json and *.safetensors. The model's shape comes from config.json;
any other ``pretrain_gpt_nitp.py`` flag after the tool's own (NITP, layout, precision, ...) goes
into the stored run config. The decoder's weights are translated (``megatron_nitp/hf.py``), the
NITP projector is freshly initialized, and the checkpoint (iteration 0, any TP/PP layout can
load it) continues with ``pretrain_gpt_nitp.py --load CKPT --finetune`` and the model flags the
tool prints. Rope scaling, sliding windows, biases other than Qwen2's QKV and MoE checkpoints
are refused with the reason.

--megatron: the ``--save`` folder of Megatron-LM's ``pretrain_gpt.py`` (``--ckpt-format
torch_dist``, the default); its latest checkpoint is read (``megatron_nitp/megatron_lm.py``):
the shape from the run's stored args, the weights, the iteration and consumed samples. The
optimizer state is not imported (Adam starts fresh); the checkpoint resumes at that iteration
with ``pretrain_gpt_nitp.py --load CKPT`` (no --finetune), e.g. with ``--nitp-start-iter``
to switch NITP on later. LayerNorm, learned positions, linear biases other than QKV's, MoE and
the other features our blocks lack are refused with the reason.
"""

import shlex

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)
from megatron_nitp.cli import ArgumentParser


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="other flags: as for pretrain_gpt_nitp.py")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face model folder (config.json, *.safetensors)")
    source.add_argument("--megatron", metavar="DIR",
                        help="Megatron-LM checkpoint folder (latest_checkpointed_iteration.txt, "
                             "iter_*/ in torch_dist format)")
    p.add_argument("--save", required=True, help="checkpoint folder to write")
    args, flags = p.parse_known_args(argv)
    if args.megatron:
        import_megatron(args.megatron, args.save, flags)
    else:
        import_hf(args.hf, args.save, flags)


def import_hf(hf_dir, save, flags):
    from megatron_nitp.hf import (HFFormatError, continue_flags, import_checkpoint,
                                  tokenizer_flags)

    try:
        path, config = import_checkpoint(hf_dir, save, flags)
    except (HFFormatError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    print(f"> imported {hf_dir} -> {path} (iteration 0, NITP projector freshly initialized)")
    if config.derived.padded_vocab_size > config.derived.vocab_size:
        print(f"> vocabulary {config.derived.vocab_size} padded to {config.derived.padded_vocab_size} rows "
              "(zeros; TP does not divide it): never targets, they add to the softmax's sum "
              "until trained down")
    tokenizer = tokenizer_flags(hf_dir, flags)
    print("> continue pretraining with:\n  python pretrain_gpt_nitp.py --load "
          f"{shlex.quote(save)} --finetune "
          f"{shlex.join(continue_flags(config) + flags + tokenizer)} --data-path DATA_PREFIX ...")
    if "MODEL" in tokenizer:
        print(f"  ({hf_dir} holds no tokenizer.json or tokenizer.model: give the model's own "
              "tokenizer as TYPE and MODEL)")
    print("  (DATA_PREFIX: data tokenized with that tokenizer by tools/preprocess_data.py)")


def import_megatron(root, save, flags):
    from megatron_nitp.megatron_lm import MegatronFormatError, continue_command, import_checkpoint

    try:
        path, config, summary = import_checkpoint(root, save, flags)
    except (MegatronFormatError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    it = summary["iteration"]
    print(f"> imported {summary['source']} -> {path} (iteration {it}, "
          f"{summary['consumed_samples']} samples consumed; NITP projector freshly initialized)")
    print("> not imported: the optimizer state (Adam moments, fp32 main weights) and the LR "
          "scheduler's state: the continued run starts Adam afresh and takes the LR schedule "
          f"from its flags at iteration {it}")
    command = continue_command(save, config, flags, summary["tokenizer_supported"])
    print("> continue pretraining (NTP until --nitp-start-iter, then NTP + NITP) with:\n"
          f"  python pretrain_gpt_nitp.py {shlex.join(command)} --data-path DATA_PREFIX ...")
    print("  (the same data and tokenizer as the Megatron-LM run; any NITP flags, e.g. a later "
          "--nitp-start-iter, as long as the projector's shape is the import's)")
    if "TYPE" in command:
        print(f"  (the run's {summary['tokenizer_type']} is not a tokenizer kind of ours: give "
              "the same vocabulary as TYPE and MODEL, e.g. HuggingFaceTokenizer and its folder)")

if __name__ == "__main__":
    main()
