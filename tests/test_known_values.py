"""Known values of the geometry metrics and of the NITP distances (issue 12, item 3).

Every expected value is either exact by construction or written out here from the formula in
the docstring, independently of the code under test.
"""

import math

import pytest
import torch

from megatron_nitp.geometry import effective_rank, mean_pairwise_cosine
from megatron_nitp.nitp.loss import token_distance


def _orthonormal(h, k, seed=0):
    """k orthonormal directions of R^h (columns), generic rather than axis-aligned."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=torch.float64))
    return q[:, :k]


# ---- effective_rank: exp(entropy) of the normalized covariance spectrum -------------------------


def test_effective_rank_of_isotropic_gaussian_is_close_to_h():
    # n >> h: the sample covariance eigenvalues spread by about +-2 sqrt(h/n) (Marchenko-Pastur),
    # which costs exp(H) only ~ h * (h/n)/2 = 0.03 here; 2% of h is a generous bound.
    n, h = 4000, 16
    states = torch.randn(n, h, generator=torch.Generator().manual_seed(0))
    rank = effective_rank(states)
    assert rank.dtype == torch.float64
    assert 0.98 * h < float(rank) <= h + 1e-9


def test_effective_rank_of_rank_one_data_is_one():
    h = 12
    direction = _orthonormal(h, 1)[:, 0]
    g = torch.Generator().manual_seed(1)
    coefficients = torch.randn(200, 1, generator=g, dtype=torch.float64)
    offset = torch.randn(h, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    states = coefficients * direction + offset  # the mean is removed before the spectrum
    assert float(effective_rank(states)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_effective_rank_of_k_equal_variance_orthogonal_directions_is_k(k):
    # rows +-a*u_i for each of k orthonormal u_i (plus a common offset): the centred matrix has k
    # equal singular values sqrt(2) a, so p is uniform over k and exp(H(p)) = k.
    h, a = 10, 3.0
    u = _orthonormal(h, k).T  # [k, h]
    states = torch.cat([a * u, -a * u]) + 7.0
    assert float(effective_rank(states.float())) == pytest.approx(k, rel=1e-6)
    assert float(effective_rank(states)) == pytest.approx(k, rel=1e-12)


def test_effective_rank_of_constant_states_is_one():
    assert float(effective_rank(torch.ones(5, 4))) == 1.0


# ---- mean_pairwise_cosine: mean cos of sampled pairs of distinct states -------------------------


def test_mean_pairwise_cosine_of_parallel_states_is_one():
    direction = torch.tensor([1.0, -2.0, 0.5, 3.0])
    scales = torch.tensor([[0.1], [1.0], [2.0], [50.0], [7.0]])  # norms differ: cosine ignores them
    value = mean_pairwise_cosine(scales * direction, generator=torch.Generator().manual_seed(0))
    assert float(value) == pytest.approx(1.0, abs=1e-12)


def test_mean_pairwise_cosine_of_an_orthonormal_set_is_zero():
    states = _orthonormal(8, 8).T  # 8 states, pairwise orthogonal; pairs are always distinct
    value = mean_pairwise_cosine(states, generator=torch.Generator().manual_seed(0))
    assert float(value) == pytest.approx(0.0, abs=1e-12)


def test_mean_pairwise_cosine_of_two_antipodal_states_is_minus_one():
    states = torch.tensor([[1.0, 2.0, 3.0], [-2.0, -4.0, -6.0]])
    assert float(mean_pairwise_cosine(states, num_pairs=64)) == pytest.approx(-1.0, abs=1e-12)


def test_mean_pairwise_cosine_of_two_antipodal_groups():
    # m copies of v and m of -v: a distinct pair is in the same group with probability
    # (m - 1) / (2m - 1) (cos 1), else cos -1, so the mean is -1 / (2m - 1) = -1/7 for m = 4.
    # With 200k sampled pairs the standard error is ~ 1/sqrt(2e5) = 0.0022.
    m = 4
    v = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.5])
    states = torch.cat([v.expand(m, -1) * torch.arange(1, m + 1).unsqueeze(1),
                        -v.expand(m, -1) * 2.0])
    value = mean_pairwise_cosine(states, num_pairs=200_000,
                                 generator=torch.Generator().manual_seed(3))
    assert float(value) == pytest.approx(-1.0 / (2 * m - 1), abs=0.01)


def test_mean_pairwise_cosine_needs_two_states():
    with pytest.raises(ValueError, match="at least two"):
        mean_pairwise_cosine(torch.ones(1, 4))


# ---- token_distance: mse, smooth_l1 and kl against their formulas --------------------------------

# [s=3, b=1, h=3] predictions P(h) and targets z, small hand-made values
PREDICTIONS = [[0.0, 2.0, -0.5], [3.0, -3.0, 0.1], [0.4, -0.2, 1.0]]
TARGETS = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.4, -0.2, 1.0]]


def _as_tensor(rows):
    return torch.tensor(rows, dtype=torch.float64).unsqueeze(1)  # [s, 1, h]


def _mse(p, z):
    return sum((a - b) ** 2 for a, b in zip(p, z)) / len(p)


def _smooth_l1(p, z, beta=1.0):
    # Huber with beta = 1: 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta; mean over h
    def one(d):
        return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta
    return sum(one(a - b) for a, b in zip(p, z)) / len(p)


def _kl(p, z):
    # KL(softmax(z) || softmax(p)) = sum_i q_i (log q_i - log r_i), q = softmax(z), r = softmax(p)
    def softmax(x):
        e = [math.exp(v) for v in x]
        return [v / sum(e) for v in e]
    q, r = softmax(z), softmax(p)
    return sum(qi * (math.log(qi) - math.log(ri)) for qi, ri in zip(q, r))


def test_hand_values_of_the_formulas():
    # the reimplementations themselves, on values worked out by hand
    assert _mse(PREDICTIONS[0], TARGETS[0]) == pytest.approx((1 + 4 + 0.25) / 3)
    assert _mse(PREDICTIONS[1], TARGETS[1]) == pytest.approx((9 + 9 + 0.01) / 3)
    assert _smooth_l1(PREDICTIONS[0], TARGETS[0]) == pytest.approx((0.5 + 1.5 + 0.125) / 3)
    assert _smooth_l1(PREDICTIONS[1], TARGETS[1]) == pytest.approx((2.5 + 2.5 + 0.005) / 3)
    # z uniform: KL(u || softmax(p)) = -log 3 - mean(p) + logsumexp(p)
    p = PREDICTIONS[1]
    expected = -math.log(3) - sum(p) / 3 + math.log(sum(math.exp(v) for v in p))
    assert _kl(p, TARGETS[1]) == pytest.approx(expected)


@pytest.mark.parametrize("kind, formula", [("mse", _mse), ("smooth_l1", _smooth_l1), ("kl", _kl)])
def test_token_distance_matches_the_formula(kind, formula):
    expected = torch.tensor([[formula(p, z)] for p, z in zip(PREDICTIONS, TARGETS)],
                            dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        got = token_distance(_as_tensor(PREDICTIONS).to(dtype), _as_tensor(TARGETS).to(dtype), kind)
        assert got.shape == (3, 1) and got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    assert float(expected[2, 0]) == 0.0  # identical rows: distance 0


def test_kl_direction_is_target_to_prediction():
    # KL is asymmetric: swapping prediction and target must change the value
    p, z = PREDICTIONS[0], TARGETS[0]
    assert _kl(p, z) != pytest.approx(_kl(z, p), rel=1e-3)
    got = token_distance(_as_tensor([p]), _as_tensor([z]), "kl")
    assert float(got) == pytest.approx(_kl(p, z), rel=1e-12)
