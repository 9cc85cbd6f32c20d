"""Context-parallel batch slicing (`training/step.py: _cp_slice`) in a launched gloo job.

World 4 with CP = 2, once with TP = 2 and once with DP = 2: every rank must get exactly chunks r
and 2CP-1-r of every sequence, r being its context-parallel rank (computed here from the global
rank and megatron's rank order, TP fastest, then CP, then DP). megatron-core 0.19's
``get_batch_on_this_cp_rank`` slices by the whole world when it is not given the CP group
(rank 0 got chunks 0 and 7 of 8). CP attention needs Transformer Engine, so only the slicing
runs on CPU. Runs under both megatron-core versions (scripts/test_019.sh).
"""

import os
import sys

import pytest
import torch

SEQ, BATCH, CP = 16, 2, 2
LAYOUTS = (("tp2-cp2", 2), ("cp2-dp2", 1))  # (name, tensor-parallel size); DP = 4 / (TP x CP)


def _expected_positions(cp_rank: int) -> list[int]:
    chunk = SEQ // (2 * CP)
    first, second = cp_rank, 2 * CP - 1 - cp_rank
    return (list(range(first * chunk, (first + 1) * chunk))
            + list(range(second * chunk, (second + 1) * chunk)))


def _worker() -> None:
    from megatron.core import parallel_state

    from megatron_nitp.data.datasets import CONTINUES_DOCUMENT
    from megatron_nitp.training.initialize import destroy_distributed, initialize_distributed
    from megatron_nitp.training.step import _cp_slice

    rank = int(os.environ["RANK"])
    positions = torch.arange(SEQ)
    rows = torch.arange(BATCH)[:, None] * 1000
    for name, tp in LAYOUTS:
        initialize_distributed(tp, 1, CP)
        cp_rank = (rank // tp) % CP
        assert parallel_state.get_context_parallel_rank() == cp_rank, name
        batch = {
            "tokens": rows + positions,
            "labels": rows + positions + 1,
            "loss_mask": (positions % 3 != 0).float().expand(BATCH, -1).clone(),
            "position_ids": positions.expand(BATCH, -1).clone(),
            # --nitp-document-boundary mask: sliced like the tokens it was computed from
            CONTINUES_DOCUMENT: (positions % 5 != 4).float().expand(BATCH, -1).clone(),
        }
        local = _cp_slice(dict(batch))
        want = _expected_positions(cp_rank)
        for key, value in batch.items():
            assert local[key].shape == (BATCH, SEQ // CP), (name, key, local[key].shape)
            assert torch.equal(local[key], value[:, want]), (
                f"{name}: rank {rank} (CP rank {cp_rank}) got {key} "
                f"{local[key][0].tolist()}, expected positions {want}")
        parallel_state.destroy_model_parallel()
    print(f"rank {rank} ok", flush=True)
    destroy_distributed()


@pytest.mark.distributed
@pytest.mark.slow
def test_every_rank_gets_chunks_r_and_2cp_minus_1_minus_r():
    from tests.helpers import torchrun_file

    proc = torchrun_file(__file__, 4)
    assert proc.stdout.count(" ok") == 4, proc.stdout


def test_expected_chunks_are_megatrons_load_balanced_ones():
    from megatron_nitp.nitp.shift import local_positions

    for r in range(CP):
        assert _expected_positions(r) == local_positions(SEQ, r, CP).tolist()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import megatron_nitp  # noqa: F401  (CPU import stubs before megatron-core loads)

    _worker()
