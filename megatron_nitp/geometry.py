"""Representation geometry of the last hidden states (paper Fig. 1, App. D).

Under NTP the effective rank of the last hidden states collapses and their mean pairwise cosine
similarity rises; NITP is reported to keep the rank higher and the cosine lower.
"""

from __future__ import annotations

import torch


def effective_rank(states: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the normalized covariance spectrum of ``[n, h]`` token states.

    Mean-centre the states, take the eigenvalues of their covariance (the squared singular
    values of the centred matrix), normalize them to a distribution p, return exp(H(p)).
    Ranges from 1 (all variance in one direction) to min(n - 1, h).
    """
    x = states.double()
    x = x - x.mean(dim=0, keepdim=True)
    eig = torch.linalg.svdvals(x).pow(2)
    total = eig.sum()
    if total <= 0:
        return torch.tensor(1.0, dtype=torch.float64, device=states.device)
    p = eig / total
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def mean_pairwise_cosine(
    states: torch.Tensor, num_pairs: int = 4096, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mean cosine similarity of randomly sampled pairs of distinct ``[n, h]`` token states."""
    n = states.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least two token states")
    x = torch.nn.functional.normalize(states.double(), dim=-1)
    # Pairs are drawn on the CPU (a CPU generator), so they are the same on any device.
    first = torch.randint(0, n, (num_pairs,), generator=generator, device="cpu")
    offset = torch.randint(1, n, (num_pairs,), generator=generator, device="cpu")
    second = ((first + offset) % n).to(x.device)  # never equal to first
    first = first.to(x.device)
    return (x[first] * x[second]).sum(dim=-1).mean()


def valid_token_states(hidden: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[s, b, h]`` hidden states and ``[b, s]`` mask -> ``[n, h]`` states of counted tokens."""
    states = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])
    return states[loss_mask.reshape(-1) > 0]
