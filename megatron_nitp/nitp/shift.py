"""The temporal shift t -> t+d (d = 1 in the paper), on a whole sequence or on a sharded one.

Unsharded, the target of row t is row t+1 and the last row has none. When the sequence is split
across ranks - contiguous shards under sequence parallelism, Megatron's load-balanced 2*CP chunks
under context parallelism (rank r holds chunks r and 2CP-1-r), or both - the last row of every
local run of positions needs the first row of the run that follows it, wherever that lives. Each
rank all-gathers the first row of each of its (at most two) runs: 2 x [b, h] per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MAX_RUNS = 2


def shift_targets(states: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row t of the result is ``states[t + shift]``; rows past the end are zeros, not valid.

    Args:
        states: ``[s, b, h]``.
        shift: d: 1 (t -> t+1, the paper), 0 (same position, an ablation), or d > 1 (a
            longer horizon).

    Returns:
        ``([s, b, h] targets, [s] bool valid)``.
    """
    seq = states.shape[0]
    if shift == 0:
        return states, torch.ones(seq, dtype=torch.bool, device=states.device)
    targets = torch.cat([states[shift:], torch.zeros_like(states[:shift])], dim=0)
    valid = torch.arange(seq, device=states.device) < seq - shift
    return targets, valid


def local_positions(
    seq_length: int, cp_rank: int = 0, cp_size: int = 1, tp_rank: int = 0, tp_size: int = 1
) -> torch.Tensor:
    """Global positions ``[L]`` of the rows this rank holds.

    Context parallelism splits the sequence into ``2 * cp_size`` chunks and gives rank r chunks r
    and ``2 * cp_size - 1 - r`` (Megatron's load balancing for causal attention); sequence
    parallelism (``tp_size > 1``) then splits that local sequence contiguously across TP ranks.
    """
    positions = torch.arange(seq_length, device="cpu")  # bookkeeping, never communicated
    if cp_size > 1:
        chunks = positions.chunk(2 * cp_size)
        positions = torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])
    if tp_size > 1:
        positions = positions.chunk(tp_size)[tp_rank]
    return positions


def _runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """``[begin, end)`` local index ranges over which positions are consecutive."""
    breaks = (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    bounds = [0] + breaks + [positions.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    if tensor.requires_grad:
        import torch.distributed.nn.functional as dist_nn

        return list(dist_nn.all_gather(tensor, group=group))
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def shift_targets_sharded(
    states: torch.Tensor, positions: torch.Tensor, seq_length: int, shift: int, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shift_targets` for a rank that holds the rows at ``positions`` of a longer sequence.

    Args:
        states: ``[L, b, h]`` local rows (e.g. layer-k states under SP and/or CP).
        positions: ``[L]`` their global positions (`local_positions`).
        seq_length: the full sequence length s.
        shift: d >= 0; d > 1 (a longer horizon) needs every local run of positions to be at
            least d long (the first d rows of each run are what the other ranks need).
        group: the process group over which the sequence is split (TP, CP, or TP x CP).

    Returns:
        ``([L, b, h] targets, [L] bool valid)``: row i's target is the state at global position
        ``positions[i] + shift``; the sequence's last ``shift`` positions have none. Every rank
        of ``group`` must call this (it is a collective), even one whose rows carry no loss.
    """
    if shift == 0:
        return shift_targets(states, 0)
    runs = _runs(positions)
    if len(runs) > MAX_RUNS:
        raise ValueError(f"a rank holds {len(runs)} runs of positions; at most {MAX_RUNS}")
    if any(end - begin < shift for begin, end in runs):
        raise ValueError(f"a shift of {shift} needs local runs of at least {shift} positions; "
                         f"this rank holds runs of {[end - begin for begin, end in runs]}: use "
                         "a shorter horizon or fewer sequence shards")
    # Fixed shapes on every rank (all_gather needs them): pad to MAX_RUNS runs.
    starts = torch.full((MAX_RUNS,), -1, dtype=torch.long, device=states.device)
    for i, (begin, _) in enumerate(runs):
        starts[i] = positions[begin]
    pad = torch.zeros((shift, *states.shape[1:]), dtype=torch.float32, device=states.device)
    firsts = torch.stack([states[b:b + shift].float() for b, _ in runs]
                         + [pad] * (MAX_RUNS - len(runs)))  # [MAX_RUNS, shift, b, h]
    all_starts = torch.cat(_all_gather(starts, group)).tolist()
    all_firsts = torch.cat(_all_gather(firsts, group))
    row_at = {start + j: all_firsts[i, j] for i, start in enumerate(all_starts) if start >= 0
              for j in range(shift)}

    pieces, valid = [], []
    for begin, end in runs:
        pieces.append(states[begin + shift:end])
        valid += [True] * (end - begin - shift)
        for j in range(shift):
            following = int(positions[end - 1]) + 1 + j
            if following < seq_length:
                pieces.append(row_at[following].to(states.dtype).unsqueeze(0))
                valid.append(True)
            else:
                pieces.append(torch.zeros_like(states[:1]))
                valid.append(False)
    return torch.cat(pieces), torch.tensor(valid, dtype=torch.bool, device=states.device)
