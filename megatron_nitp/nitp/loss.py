"""The NITP per-token loss, in Megatron's sequence-first layout.

For a sequence of s positions, the prediction at position t is ``P(h_t)`` and its target is
the layer-k state of the next token, ``z_{t+1}``. The last position's target (the state of the
token after the sequence) was never computed, so that position contributes 0.

``loss_mask[:, t]`` is the NTP mask of label t, i.e. of token t+1, which is exactly the token
whose shallow state is the target: the NTP mask is the NITP mask, with no shift of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_nitp.nitp.shift import shift_targets, shift_targets_sharded


def token_distance(predictions: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position distance ``[s, b]`` between ``[s, b, h]`` predictions and targets.

    cosine: 1 - cos, in [0, 2] (the paper). mse / smooth_l1: mean over h. kl: KL(softmax(z) ||
    softmax(P(h))) over the hidden dimension (the paper's KL ablation).
    """
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(predictions, targets, dim=-1, eps=1e-8)
    if kind == "mse":
        return (predictions - targets).pow(2).mean(dim=-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(predictions, targets, reduction="none").mean(dim=-1)
    if kind == "kl":
        log_p = F.log_softmax(predictions, dim=-1)
        log_q = F.log_softmax(targets, dim=-1)
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    raise ValueError(f"unknown NITP loss kind {kind!r}: choose cosine, mse, smooth_l1 or kl.")


@dataclass(frozen=True)
class SequenceShards:
    """Where this rank's rows sit in the sequence when it is split (sequence and/or context
    parallelism): the shift then fetches rows held by other ranks (``nitp.shift``).

    ``positions``: ``[L]`` global positions of the local rows; ``seq_length``: the whole s;
    ``group``: the ranks the sequence is split over; ``gather``: ``[L, b] -> [L * tp, b]``, the
    per-position distances gathered over TP under sequence parallelism (so the loss is ``[b,
    s/cp]`` like the lm loss), None without it."""

    positions: torch.Tensor
    seq_length: int
    group: object
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def implicit_token_loss(
    predictions: torch.Tensor,
    shallow_states: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    shift: int = 1,
    kind: str = "cosine",
    stop_gradient: bool = True,
    document_mask: Optional[torch.Tensor] = None,
    shards: Optional[SequenceShards] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NITP loss and the mask of the positions that carry it; the model computes its
    NITP terms with this function.

    Args:
        predictions: ``[s, b, h]``, P(h_t) - the projector applied to the final hidden states
            (``[L, b, h]``, this rank's rows, under ``shards``).
        shallow_states: ``[s, b, h]``, z - the layer-k output of the same forward pass
            (``[L, b, h]`` under ``shards``).
        loss_mask: ``[b, s]``, 1 where the NTP loss of label t counts.
        shift: target offset d (1 = paper; 2.. = a longer horizon; 0 = the same position).
        kind: distance (``cosine`` = paper).
        stop_gradient: detach the target (paper). With the default, no gradient reaches
            ``shallow_states``.
        document_mask: ``[b, s]``, 0 where position t + d lies in another document than t (no
            pair across documents); None: no document boundaries.
        shards: the sequence is split over ranks (``SequenceShards``); None: whole sequences.

    Returns:
        ``(loss [b, s], mask [b, s])`` float32: ``mask[:, t] = loss_mask[:, t]`` where position
        t has a target (t < s - d, and in the same document) else 0, and ``loss[:, t] =
        mask[:, t] * (1 - cos(predictions[t], shallow_states[t + d]))``. Computed in fp32
        whatever the training dtype. The batch mean is ``loss.sum() / mask.sum()``.
    """
    if predictions.shape != shallow_states.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and shallow_states "
            f"{tuple(shallow_states.shape)} must both be [s, b, h]"
        )
    if shards is None and loss_mask.shape != predictions.shape[1::-1]:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must be [b, s] = {tuple(predictions.shape[1::-1])}"
        )
    targets = shallow_states.detach() if stop_gradient else shallow_states
    if shards is None:
        targets, valid = shift_targets(targets, shift)
    else:
        targets, valid = shift_targets_sharded(targets, shards.positions, shards.seq_length,
                                               shift, shards.group)
    distance = token_distance(predictions.float(), targets.float(), kind)  # [L, b]
    distance = distance * valid.unsqueeze(1)
    valid = valid.float()
    if shards is not None and shards.gather is not None:
        # Replicated over TP from here on, like the lm loss: the backward only splits.
        distance = shards.gather(distance)
        valid = shards.gather(valid.unsqueeze(1)).squeeze(1)
    mask = loss_mask.float() * valid.unsqueeze(0)
    if document_mask is not None:
        mask = mask * document_mask.float()
    return distance.transpose(0, 1) * mask, mask


def continues_document(document_mask: torch.Tensor, shift: int) -> torch.Tensor:
    """``[b, s]``: 1 where positions t .. t + shift are one document, from the ``[b, s]`` mask
    of "position t + 1 is in the document of t" (whole sequences). Shift 0 pairs a position
    with itself: every position qualifies."""
    if shift == 0:
        return torch.ones_like(document_mask, dtype=torch.float)
    out = document_mask.float()
    for j in range(1, shift):
        out = out * torch.cat([document_mask[:, j:].float(),
                               torch.zeros_like(document_mask[:, :j], dtype=torch.float)], dim=1)
    return out


def num_contributing_positions(loss_mask: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Number of positions of a ``[b, s]`` mask that carry an NITP loss (the last ``shift``
    positions of each sequence have no target)."""
    seq = loss_mask.shape[-1]
    return loss_mask[..., : seq - shift].sum()


def cosine_regularization(hidden: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of the generic baseline (an ablation, not NITP): for each
    counted token t, the mean cosine similarity between its last hidden state and those of the
    other counted tokens of its sequence. Penalizing it spreads the states apart directly.

    Args:
        hidden: ``[s, b, h]`` last hidden states.
        loss_mask: ``[b, s]``.
    """
    mask = loss_mask.float().transpose(0, 1).unsqueeze(-1)  # [s, b, 1]
    unit = F.normalize(hidden.float(), dim=-1) * mask
    total = unit.sum(dim=0, keepdim=True)  # [1, b, h]
    others = mask.sum(dim=0, keepdim=True) - 1.0  # [1, b, 1]
    mean_cos = ((unit * total).sum(-1, keepdim=True) - mask) / others.clamp(min=1.0)
    return (mean_cos * mask).squeeze(-1).transpose(0, 1)
