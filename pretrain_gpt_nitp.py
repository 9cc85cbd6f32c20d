"""Pretrain a dense GPT with Next Implicit Token Prediction (NITP) on megatron-core.

    python pretrain_gpt_nitp.py                      # tiny model on CPU, built-in corpus
    python pretrain_gpt_nitp.py --no-nitp            # the NTP baseline, same data and seed
    torchrun --nproc-per-node 2 pretrain_gpt_nitp.py --tensor-model-parallel-size 2
"""

from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.initialize import destroy_distributed
from megatron_nitp.training.loop import UsageError, pretrain


def main(argv=None):
    args = parse_args(argv)
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
