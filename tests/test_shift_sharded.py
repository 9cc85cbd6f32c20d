"""The SP / CP shift on gloo groups of 2 and 4 ranks equals the unsharded shift and loss.

Which rows a rank holds is written out here by hand (:func:`hand_positions`, megatron-core's
load-balanced CP split followed by the contiguous SP split), never taken from
``local_positions``: the package's mapping is checked against it, so a wrong mapping cannot
pass on both sides.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_nitp.nitp.loss import implicit_token_loss, token_distance
from megatron_nitp.nitp.shift import local_positions, shift_targets, shift_targets_sharded
from tests.helpers import free_port

SEQ, BATCH, HIDDEN = 16, 2, 6


def hand_positions(seq: int, cp_rank: int, cp: int, tp_rank: int, tp: int) -> list[int]:
    """Global positions held by (cp_rank, tp_rank): the sequence cut into 2*cp equal chunks,
    chunks cp_rank and 2*cp-1-cp_rank in that order (megatron-core's
    ``get_batch_on_this_cp_rank``), then that local sequence cut into tp equal contiguous
    pieces, piece tp_rank (sequence parallelism)."""
    chunk = seq // (2 * cp)
    local = []
    for c in (cp_rank, 2 * cp - 1 - cp_rank) if cp > 1 else (0,):
        start = c * chunk if cp > 1 else 0
        local += list(range(start, start + (chunk if cp > 1 else seq)))
    piece = len(local) // tp
    return local[tp_rank * piece:(tp_rank + 1) * piece]


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
        positions = torch.tensor(hand_positions(SEQ, cp_rank, cp, tp_rank, tp))
        assert torch.equal(local_positions(SEQ, cp_rank, cp, tp_rank, tp), positions)
        if mask_kind == "one-rank":
            # only the positions held by rank 0 count: every other rank has no valid position
            mask = torch.zeros(BATCH, SEQ)
            mask[:, hand_positions(SEQ, 0, cp, 0, tp)] = 1.0

        targets, valid = shift_targets_sharded(states[positions], positions, SEQ, 1, group=None)
        ref_targets, ref_valid = shift_targets(states, 1)
        torch.testing.assert_close(targets, ref_targets[positions], rtol=0, atol=0)
        assert torch.equal(valid, ref_valid[positions])

        distance = token_distance(predictions[positions], targets, "cosine") * valid[:, None]
        local = (distance.t() * mask[:, positions]).sum()
        assert torch.isfinite(local)
        total = local.clone()
        dist.all_reduce(total)
        reference = implicit_token_loss(predictions, states, mask)[0].sum()
        torch.testing.assert_close(total, reference, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
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


@pytest.mark.parametrize("seq,cp,tp", [(16, 1, 2), (16, 2, 1), (16, 2, 2), (32, 4, 1),
                                        (32, 4, 2), (48, 3, 2), (64, 2, 4)])
def test_local_positions_equal_the_hand_written_mapping(seq, cp, tp):
    """Every rank of the layout: the hand mapping, and together the ranks hold each position
    exactly once."""
    held = []
    for cp_rank in range(cp):
        for tp_rank in range(tp):
            want = hand_positions(seq, cp_rank, cp, tp_rank, tp)
            assert local_positions(seq, cp_rank, cp, tp_rank, tp).tolist() == want
            held += want
    assert sorted(held) == list(range(seq))


def test_local_positions_follow_megatron_cp_chunking():
    # CP=2: chunks of 4 positions, rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert local_positions(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert local_positions(16, 0, 1, 1, 2).tolist() == list(range(8, 16))
