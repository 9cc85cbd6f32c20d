"""The arms of a step-time comparison (``tools/flops_overhead.py --measure``,
``tools/moe_benchmark.py``): one config built as NTP, NITP or MTP, side by side in one process,
and one training step timed.

Every arm goes through ``training.loop.setup`` with the same seed (the same initial backbone)
and reads the same batches, so that the arms differ only in their objective; the tools
interleave the arms' steps (A B A B ...) so that a drift in the machine hits every arm.
"""

from __future__ import annotations

import time


def build_arm(arm: str, config):
    """One arm's Run (data, model, optimizer): ``ntp`` with NITP off, ``nitp`` as given, ``mtp``
    = ``ntp`` plus megatron-core's MTP at depth 1 (the MTP objective of
    ``megatron_nitp/objectives/``, megatron-core's default factor 0.1)."""
    from megatron_nitp.config import validate
    from megatron_nitp.training import loop

    args = {"nitp": config, "ntp": config.replace(nitp=False),
            "mtp": config.replace(nitp=False, mtp_num_layers=1)}[arm]
    validate(args)
    return loop.setup(args)


def timed_step(run, iteration: int) -> float:
    """Seconds of one ``train_step`` of ``run``, the device synchronized before and after."""
    from megatron_nitp.device import synchronize
    from megatron_nitp.training.model import clear_moe_tracker
    from megatron_nitp.training.step import train_step

    # megatron-core's MoE aux-loss logging tracker is process-global and sized by the first
    # model that logs into it; the MTP arm has one layer more. It only feeds logs: start empty.
    clear_moe_tracker()

    synchronize()
    start = time.perf_counter()
    train_step(run.model, run.optimizer, run.scheduler, run.train_iter, run.args, iteration, False)
    synchronize()
    return time.perf_counter() - start
