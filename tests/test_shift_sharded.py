"""The SP / CP shift on gloo groups of 2 and 4 ranks equals the unsharded shift and loss."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_nitp.nitp.loss import implicit_token_loss, token_distance
from megatron_nitp.nitp.shift import local_positions, shift_targets, shift_targets_sharded
from tests.helpers import free_port

SEQ, BATCH, HIDDEN = 16, 2, 6


def _worker(rank, world, port, tp, cp, mask_kind):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        states = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
        predictions = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
        mask = torch.ones(BATCH, SEQ)
        cp_rank, tp_rank = divmod(rank, tp)  # Megatron's order: TP fastest
        positions = local_positions(SEQ, cp_rank, cp, tp_rank, tp)
        if mask_kind == "one-rank":
            # only the positions held by rank 0 count: every other rank has no valid position
            mask = torch.zeros(BATCH, SEQ)
            mask[:, local_positions(SEQ, 0, cp, 0, tp)] = 1.0

        targets, valid = shift_targets_sharded(states[positions], positions, SEQ, 1, group=None)
        ref_targets, ref_valid = shift_targets(states, 1)
        torch.testing.assert_close(targets, ref_targets[positions], rtol=0, atol=0)
        assert torch.equal(valid, ref_valid[positions])

        distance = token_distance(predictions[positions], targets, "cosine") * valid[:, None]
        local = (distance.t() * mask[:, positions]).sum()
        assert torch.isfinite(local)
        total = local.clone()
        dist.all_reduce(total)
        reference = implicit_token_loss(predictions, states, mask).sum()
        torch.testing.assert_close(total, reference, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world,tp,cp,mask_kind",
    [
        (2, 2, 1, "all"),       # sequence parallel, 2 shards
        (2, 1, 2, "all"),       # context parallel, 4 load-balanced chunks
        (4, 4, 1, "all"),
        (4, 1, 4, "all"),       # 8 chunks: rank r holds chunks r and 7 - r
        (4, 2, 2, "all"),       # SP inside CP
        (4, 1, 4, "one-rank"),  # valid positions all on one rank: no NaN elsewhere
        (2, 2, 1, "one-rank"),
    ],
)
def test_sharded_shift_equals_unsharded(world, tp, cp, mask_kind):
    mp.spawn(_worker, args=(world, free_port(), tp, cp, mask_kind), nprocs=world, join=True)


def test_local_positions_follow_megatron_cp_chunking():
    # CP=2: chunks of 4 positions, rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert local_positions(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert local_positions(16, 0, 1, 1, 2).tolist() == list(range(8, 16))
