"""The body of the ``pretrain_*.py`` entry scripts: parse, dry-run or train, clean up."""

from __future__ import annotations

from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.initialize import destroy_distributed
from megatron_nitp.training.loop import UsageError, pretrain


def main(argv=None, model_type: str = "dense") -> None:
    args = parse_args(argv, model_type=model_type)
    if args.dry_run:
        from megatron_nitp.accounting.dry_run import dry_run

        raise SystemExit(dry_run(args))
    from megatron_nitp.training.checkpoint import CheckpointError

    try:
        pretrain(args)
    except (UsageError, CheckpointError) as err:  # a failed save too: one line, every rank
        raise SystemExit(f"error: {err}") from None
    finally:
        destroy_distributed()
