"""The public loss contract: implicit_token_loss(predictions, shallow_states, loss_mask)[0]."""

import math

import pytest
import torch

from megatron_nitp.nitp.loss import implicit_token_loss, num_contributing_positions


def _hand_case():
    # s=3 positions, b=1, h=2; [s, b, h]
    predictions = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    shallow = torch.tensor([[[5.0, 5.0]], [[0.0, 2.0]], [[-1.0, -1.0]]])
    return predictions, shallow


def test_hand_computed_shift_and_last_position():
    predictions, shallow = _hand_case()
    loss = implicit_token_loss(predictions, shallow, torch.ones(1, 3))[0]
    # t=0: 1 - cos([1,0],[0,2]) = 1;  t=1: 1 - cos([0,1],[-1,-1]) = 1 + 1/sqrt(2);  t=2: no target
    expected = torch.tensor([[1.0, 1.0 + 1.0 / math.sqrt(2.0), 0.0]])
    assert loss.shape == (1, 3)
    torch.testing.assert_close(loss, expected)


def test_mask_of_label_t_masks_position_t():
    predictions, shallow = _hand_case()
    loss = implicit_token_loss(predictions, shallow, torch.tensor([[1.0, 0.0, 1.0]]))[0]
    torch.testing.assert_close(loss, torch.tensor([[1.0, 0.0, 0.0]]))
    assert num_contributing_positions(torch.tensor([[1.0, 0.0, 1.0]])).item() == 1
    assert num_contributing_positions(torch.ones(4, 10)).item() == 36


def test_same_position_ablation_pairs_t_with_t():
    predictions, shallow = _hand_case()
    loss = implicit_token_loss(predictions, shallow, torch.ones(1, 3), shift=0)[0]
    # t=0: cos([1,0],[5,5]) = 1/sqrt2; t=1: cos([0,1],[0,2]) = 1; t=2: cos([1,1],[-1,-1]) = -1
    expected = torch.tensor([[1.0 - 1.0 / math.sqrt(2.0), 0.0, 2.0]])
    torch.testing.assert_close(loss, expected)


def test_matches_per_position_reference_on_random_input():
    torch.manual_seed(0)
    s, b, h = 7, 3, 16
    predictions, shallow = torch.randn(s, b, h), torch.randn(s, b, h)
    mask = (torch.rand(b, s) > 0.3).float()
    loss = implicit_token_loss(predictions, shallow, mask)[0]
    for i in range(b):
        for t in range(s):
            if t == s - 1:
                ref = 0.0
            else:
                cos = torch.dot(predictions[t, i], shallow[t + 1, i]) / (
                    predictions[t, i].norm() * shallow[t + 1, i].norm()
                )
                ref = mask[i, t].item() * (1.0 - cos.item())
            assert loss[i, t].item() == pytest.approx(ref, abs=1e-6)
    # the cosine distance lives in [0, 2]
    assert loss.min() >= 0 and loss.max() <= 2


def test_no_gradient_reaches_shallow_states():
    torch.manual_seed(1)
    predictions = torch.randn(5, 2, 8, requires_grad=True)
    shallow = torch.randn(5, 2, 8, requires_grad=True)
    implicit_token_loss(predictions, shallow, torch.ones(2, 5))[0].sum().backward()
    assert shallow.grad is None
    assert predictions.grad is not None and predictions.grad[:-1].abs().sum() > 0
    # the last position has no target: no gradient from it
    assert predictions.grad[-1].abs().sum() == 0


def test_stop_gradient_off_lets_gradient_reach_targets():
    torch.manual_seed(1)
    predictions = torch.randn(5, 2, 8, requires_grad=True)
    shallow = torch.randn(5, 2, 8, requires_grad=True)
    implicit_token_loss(predictions, shallow, torch.ones(2, 5), stop_gradient=False)[0].sum().backward()
    assert shallow.grad is not None
    assert shallow.grad[0].abs().sum() == 0  # z_1 is never a target
    assert shallow.grad[1:].abs().sum() > 0


def _cosine_loss_reference(predictions, shallow):
    """``[b, s]`` 1 - cos(predictions[t], shallow[t+1]) in float64, 0 at the last position."""
    p, z = predictions.double(), shallow.double()
    dot = (p[:-1] * z[1:]).sum(-1)
    cos = dot / (p[:-1].norm(dim=-1) * z[1:].norm(dim=-1))
    return torch.cat([1.0 - cos, torch.zeros_like(cos[:1])]).transpose(0, 1)


def test_computed_in_fp32_from_bf16():
    torch.manual_seed(2)
    predictions = torch.randn(6, 2, 32).bfloat16()
    shallow = torch.randn(6, 2, 32).bfloat16()
    mask = torch.ones(2, 6)
    # float64 reference from the same bf16 inputs: what an fp32 computation must match closely
    reference = _cosine_loss_reference(predictions, shallow).float()
    tolerance = dict(atol=1e-5, rtol=0)
    loss = implicit_token_loss(predictions, shallow, mask)[0]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, **tolerance)
    # the tolerance is tight enough to reject the same loss computed in bf16
    in_bf16 = 1.0 - torch.nn.functional.cosine_similarity(predictions[:-1], shallow[1:], dim=-1)
    assert in_bf16.dtype == torch.bfloat16
    in_bf16 = torch.cat([in_bf16.float(), torch.zeros(1, 2)]).transpose(0, 1)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(in_bf16, reference, **tolerance)


@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
def test_other_loss_kinds_are_zero_on_identical_targets(kind):
    shallow = torch.randn(4, 1, 8)
    predictions = torch.cat([shallow[1:], torch.randn(1, 1, 8)])  # P(h_t) == z_{t+1}
    loss = implicit_token_loss(predictions, shallow, torch.ones(1, 4), kind=kind)[0]
    torch.testing.assert_close(loss, torch.zeros(1, 4), atol=1e-6, rtol=0)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[b, s\]"):
        implicit_token_loss(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.ones(4, 2))[0]
    with pytest.raises(ValueError, match="unknown NITP loss kind"):
        implicit_token_loss(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.ones(2, 4), kind="l3")[0]


def test_training_forward_computes_the_distance_in_fp32_under_bf16(dist):
    """The path training runs (``NITPGPTModel.forward`` inside Float16Module, as ``wrap_model``
    builds it under ``--bf16``), not ``implicit_token_loss``: the projector's output P(h)
    ``[s, b, h]`` and layer k's z ``[s, b, h]`` are bf16, the ``[b, s]`` NITP loss must be their
    1 - cos computed in fp32 (a float64 reference from the same bf16 tensors, to 1e-5), which
    the same distance computed in bf16 misses."""
    from megatron.core.transformer.module import Float16Module

    from megatron_nitp.models.initialization import initialize_weights
    from megatron_nitp.training.initialize import set_seed
    from megatron_nitp.training.model import build_model
    from tests.helpers import tiny_args, nitp_terms

    args = tiny_args("--bf16", "--seq-length", "32")
    set_seed(3)
    net = build_model(args)
    initialize_weights(net, 3)
    model = Float16Module(net.config, net)
    seen = {}
    layer = next(m for m in net.decoder.layers if m.layer_number == args.nitp_config.target_layer)
    hooks = [net.projector.register_forward_hook(lambda m, i, out: seen.__setitem__("p", out)),
             layer.register_forward_hook(lambda m, i, out: seen.__setitem__(
                 "z", out[0] if isinstance(out, tuple) else out))]
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 128, (2, 32), generator=g)
    mask = torch.ones(2, 32)
    with torch.no_grad():
        _, nitp, nitp_mask, _ = nitp_terms(model(tokens, torch.arange(32).expand(2, -1), None,
                                      labels=tokens, loss_mask=mask))
    for hook in hooks:
        hook.remove()
    p, z = seen["p"], seen["z"]
    assert p.dtype == z.dtype == torch.bfloat16 and p.shape == z.shape == (32, 2, 32)
    reference = _cosine_loss_reference(p, z).float()  # [b, s]
    tolerance = dict(atol=1e-5, rtol=0)
    assert nitp.dtype == torch.float32 and torch.equal(nitp_mask[:, -1], torch.zeros(2))
    torch.testing.assert_close(nitp.float(), reference, **tolerance)
    in_bf16 = (1.0 - torch.nn.functional.cosine_similarity(p[:-1], z[1:], dim=-1)).float()
    in_bf16 = torch.cat([in_bf16, torch.zeros(1, 2)]).transpose(0, 1)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(in_bf16, reference, **tolerance)
