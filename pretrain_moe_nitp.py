"""Pretrain a DeepSeek-V2-style mixture-of-experts GPT with NITP on megatron-core.

    python pretrain_moe_nitp.py                                   # tiny MoE on CPU
    python pretrain_moe_nitp.py --list-presets                    # the paper's models
    torchrun --nproc-per-node 2 pretrain_moe_nitp.py --expert-model-parallel-size 2
"""

from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.initialize import destroy_distributed
from megatron_nitp.training.loop import UsageError, pretrain


def main(argv=None):
    args = parse_args(argv, model_type="moe")
    if args.dry_run:
        from megatron_nitp.training.plan import dry_run

        raise SystemExit(dry_run(args))
    try:
        pretrain(args)
    except UsageError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
