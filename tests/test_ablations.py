"""Every ablation switch of the paper, tested for its defining property."""

import math

import pytest
import torch

from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.nitp.loss import cosine_regularization, implicit_token_loss, token_distance
from megatron_nitp.training.initialize import set_seed
from megatron_nitp.training.model import build_model
from tests.helpers import tiny_args, nitp_terms


def _inputs(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (2, args.model.seq_length), generator=g)
    return tokens, torch.arange(args.model.seq_length).expand(2, -1), torch.ones(2, args.model.seq_length)


def _model(args, **nitp):
    set_seed(5)
    return build_model(args, NITPConfig(**nitp), True, True)


def test_stop_gradient_off_sends_gradient_through_the_target(dist):
    args = tiny_args("--num-layers", "3")
    grads = {}
    for stop in (True, False):
        model = _model(args, target_layer=1, stop_gradient=stop)
        tokens, positions, mask = _inputs(args)
        _, nitp, _, _ = nitp_terms(model(tokens, positions, None, labels=tokens, loss_mask=mask))
        nitp.sum().backward()
        grads[stop] = model.decoder.layers[0].mlp.linear_fc2.weight.grad.clone()
        # layer 2 and 3 are above the target: their gradient comes through P(h) alone
        grads[(stop, "top")] = model.decoder.layers[2].mlp.linear_fc2.weight.grad.clone()
    assert not torch.allclose(grads[True], grads[False])
    torch.testing.assert_close(grads[(True, "top")], grads[(False, "top")])


def test_same_position_target_pairs_t_with_t(dist):
    args = tiny_args()
    model = _model(args, target_layer=1, shift=0)
    seen = {}
    model.decoder.layers[0].register_forward_hook(lambda m, i, o: seen.update(z=o[0].detach()) or None)
    tokens, positions, mask = _inputs(args)
    _, nitp, nitp_mask, hidden = nitp_terms(model(tokens, positions, None, labels=tokens,
                                       loss_mask=mask, return_hidden=True))
    with torch.no_grad():
        expected = implicit_token_loss(model.projector(hidden), seen["z"], mask, shift=0)[0]
    torch.testing.assert_close(nitp, expected)
    assert nitp_mask.sum() == mask.sum()  # the last position has a target too
    assert (nitp[:, -1] > 0).all()


@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
def test_loss_kinds_use_their_distance(dist, kind):
    args = tiny_args()
    model = _model(args, target_layer=1, loss_kind=kind)
    seen = {}
    model.decoder.layers[0].register_forward_hook(lambda m, i, o: seen.update(z=o[0].detach()) or None)
    tokens, positions, mask = _inputs(args)
    _, nitp, _, hidden = nitp_terms(model(tokens, positions, None, labels=tokens,
                               loss_mask=mask, return_hidden=True))
    with torch.no_grad():
        predictions = model.projector(hidden)
        d = token_distance(predictions[:-1], seen["z"][1:], kind).t()
    torch.testing.assert_close(nitp[:, :-1], d)


def test_projector_kinds(dist):
    args = tiny_args()
    d = args.model.hidden_size
    assert sum(p.numel() for p in _model(args, projector="linear").projector.parameters()) == d * d
    none = _model(args, projector="none")
    assert sum(p.numel() for p in none.projector.parameters()) == 0
    tokens, positions, mask = _inputs(args)
    seen = {}
    none.decoder.layers[0].register_forward_hook(lambda m, i, o: seen.update(z=o[0].detach()) or None)
    _, nitp, _, hidden = nitp_terms(none(tokens, positions, None, labels=tokens,
                              loss_mask=mask, return_hidden=True))
    torch.testing.assert_close(nitp, implicit_token_loss(hidden, seen["z"], mask)[0])


def test_cosine_regularization_baseline(dist):
    torch.manual_seed(3)
    hidden = torch.randn(5, 2, 8)
    mask = torch.tensor([[1.0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    loss = cosine_regularization(hidden, mask)
    unit = torch.nn.functional.normalize(hidden, dim=-1)
    for b in range(2):
        counted = [t for t in range(5) if mask[b, t]]
        for t in range(5):
            if not mask[b, t]:
                assert loss[b, t] == 0
                continue
            ref = sum(float(unit[t, b] @ unit[j, b]) for j in counted if j != t) / (len(counted) - 1)
            assert loss[b, t].item() == pytest.approx(ref, abs=1e-6)
    args = tiny_args()
    model = _model(args, objective="cosine_reg")
    assert model.projector is None
    tokens, positions, mask = _inputs(args)
    _, reg, _, hidden = nitp_terms(model(tokens, positions, None, labels=tokens,
                              loss_mask=mask, return_hidden=True), "cosine reg loss")
    torch.testing.assert_close(reg, cosine_regularization(hidden, mask))
    reg.sum().backward()
    assert model.decoder.final_layernorm.weight.grad.abs().sum() > 0


def test_hidden_source_before_the_final_norm(dist):
    args = tiny_args()
    model = _model(args, target_layer=1, hidden_source="last_layer")
    seen = {}
    model.decoder.layers[0].register_forward_hook(lambda m, i, o: seen.update(z=o[0].detach()) or None)
    model.decoder.layers[-1].register_forward_hook(lambda m, i, o: seen.update(h=o[0].detach()) or None)
    model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: seen.update(n=o.detach()) or None)
    tokens, positions, mask = _inputs(args)
    _, nitp, _, hidden = nitp_terms(model(tokens, positions, None, labels=tokens,
                               loss_mask=mask, return_hidden=True))
    torch.testing.assert_close(hidden, seen["h"])
    assert not torch.allclose(seen["h"], seen["n"])
    with torch.no_grad():
        expected = implicit_token_loss(model.projector(seen["h"]), seen["z"], mask)[0]
    torch.testing.assert_close(nitp, expected)


def test_ablation_flags_parse_and_bad_values_are_refused(capsys):
    from megatron_nitp.training.arguments import parse_args

    args = parse_args(["--nitp-objective", "cosine_reg", "--nitp-hidden-source", "last_layer",
                       "--nitp-shift", "0", "--nitp-loss-kind", "kl", "--nitp-projector", "none",
                       "--nitp-no-stop-gradient", "--nitp-start-iter", "5", "--nitp-target-layer", "0"])
    c = args.nitp_config
    assert (c.objective, c.hidden_source, c.shift, c.loss_kind, c.projector, c.stop_gradient,
            c.start_iter, c.target_layer) == ("cosine_reg", "last_layer", 0, "kl", "none", False, 5, 0)
    with pytest.raises(SystemExit):
        parse_args(["--nitp-objective", "contrastive"])
    assert "unknown --nitp-objective 'contrastive'" in capsys.readouterr().err
    assert math.isfinite(c.weight_at(5)) and c.weight_at(4) == 0.0
