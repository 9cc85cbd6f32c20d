"""Objectives are plug-ins: the example objective of docs/design.md runs as written (its term is
the hand-computed value and training it lowers it), and the step's loss - ``sum(lm) + sum_o w_o
N_ntp / N_o sum(aux_o)``, divided by N_ntp as megatron-core does - has exactly the gradient of
the objective written by hand with plain torch: several NITP terms (two target layers, two
horizons) and the cosine regularization, each a mean over its own positions, lambda once."""

import functools
import os
import re

import pytest
import torch
import torch.nn.functional as F

from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.objectives import (CosineRegularization, ImplicitTokenPrediction,
                                      representation_objectives)
from megatron_nitp.training import model as model_module
from megatron_nitp.training.initialize import set_seed
from megatron_nitp.training.model import build_model
from megatron_nitp.training.step import _global_counts, _loss_func, term_scales
from tests.helpers import ROOT, tiny_args

MARKER = "# example objective"


def example_namespace() -> dict:
    """The fenced python block of docs/design.md whose first line is ``MARKER``, executed."""
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        text = f.read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if b.startswith(MARKER)]
    assert len(blocks) == 1, f"docs/design.md must hold one python block starting {MARKER!r}"
    namespace = {"__name__": "design_example"}
    exec(compile(blocks[0], "docs/design.md (example objective)", "exec"), namespace)
    return namespace


def _build(args, nitp, objectives, monkeypatch, seed=3):
    """The tiny model through ``build_model``, with ``objectives`` instead of the config's."""
    set_seed(seed)
    monkeypatch.setattr(model_module, "NITPGPTModel",
                        functools.partial(model_module.NITPGPTModel, objectives=objectives))
    return build_model(args, nitp, True, True)


def _batch(args, seed=0, masked=()):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (2, args.model.seq_length + 1), generator=g)
    loss_mask = torch.ones(2, args.model.seq_length)
    for b, t in masked:
        loss_mask[b, t] = 0.0
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
            "position_ids": torch.arange(args.model.seq_length).expand(2, -1)}


def _forward(model, batch, **kwargs):
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                 loss_mask=batch["loss_mask"], **kwargs)


def _keep_layer_outputs(model, layers) -> dict:
    """Layer k's output (1-based) of each forward, detached, by k."""
    seen = {}
    for k in layers:
        model.decoder.layers[k - 1].register_forward_hook(
            lambda module, inputs, output, k=k: seen.__setitem__(k, output[0].detach()))
    return seen


# ------------------------------------------------------------------- the example objective

def test_design_example_objective_computes_and_lowers_its_term(dist, monkeypatch):
    example = example_namespace()["NextLayerState"](source=1, target=2, weight=0.25)
    args = tiny_args("--num-layers", "3")
    nitp = NITPConfig(target_layer=1)
    objectives = (*representation_objectives(nitp), example)
    model = _build(args, nitp, objectives, monkeypatch)
    head = model.aux_modules["next_state_head"]
    assert isinstance(head, torch.nn.Linear)
    assert model.tap_owner_stages == {1: 0, 2: 0}  # NITP's tap and the example's, shared
    seen = _keep_layer_outputs(model, (1, 2))
    batch = _batch(args, masked=[(0, 3), (1, 9)])
    mask = batch["loss_mask"]

    output = _forward(model, batch)
    assert set(output.aux) == {"nitp loss", "next state loss"}
    term = output.aux["next state loss"]
    # by hand: 1 - cos(W z1_t, z2_{t+1}) for t < s-1 where the loss mask counts
    z1, z2 = seen[1], seen[2]
    with torch.no_grad():
        cos = F.cosine_similarity(z1[:-1] @ head.weight.t(), z2[1:], dim=-1).t()  # [b, s-1]
    expected_mask = mask.clone()
    expected_mask[:, -1] = 0
    expected = torch.zeros_like(mask)
    expected[:, :-1] = (1 - cos) * mask[:, :-1]
    torch.testing.assert_close(term.mask, expected_mask, rtol=0, atol=0)
    torch.testing.assert_close(term.loss, expected, rtol=1e-6, atol=1e-6)
    assert term.mask.sum() == example.count(batch) == 2 * 15 - 2
    assert example.weight_at(0) == example.weight_at(10**6) == 0.25
    # the step weighs it by w N_ntp / N_o
    counts = _global_counts([batch], objectives)
    scales = term_scales(objectives, counts, iteration=0)
    assert scales["next state loss"] == pytest.approx(0.25 * mask.sum().item() / 28)

    # trained alone with plain SGD, its loss falls (only the head gets its gradient: the taps
    # are detached)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    means = []
    for _ in range(30):
        optimizer.zero_grad()
        term = _forward(model, batch).aux["next state loss"]
        mean = term.loss.sum() / term.mask.sum()
        mean.backward()
        means.append(mean.item())
        grads = {name for name, p in model.named_parameters() if p.grad is not None}
        assert grads == {"aux_modules.next_state_head.weight"}, grads
        optimizer.step()
    assert means[-1] < 0.5 * means[0], means


# ------------------------------------------------- the step's loss = the hand-written loss

LAMBDA = 0.8
COSINE_WEIGHT = 0.5


def _hand_written_loss(model, batch, h, z):
    """The objective in plain torch from the captured final hidden states ``h`` [s, b, h] (with
    their graph) and the detached layer outputs ``z``: mean CE + lambda/4 * sum over (k, d) of
    the mean over its positions of (1 - cos(P_kd(h_t), z^k_{t+d})) + 0.5 * the mean over the
    counted tokens of the mean cosine with the sequence's other counted tokens."""
    mask = batch["loss_mask"]  # [b, s]
    s = mask.shape[1]
    weight = model.shared_embedding_or_output_weight()
    logits = F.linear(h, weight)  # [s, b, V]
    ce = F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.shape[-1]).float(),
                         batch["labels"].reshape(-1), reduction="none").view_as(mask)
    loss = (ce * mask).sum() / mask.sum()
    projectors = {(1, 1): model.projector, (1, 2): model.aux_modules["k1_t2"],
                  (2, 1): model.aux_modules["k2_t1"], (2, 2): model.aux_modules["k2_t2"]}
    for (k, d), projector in projectors.items():
        prediction = projector(h)[: s - d]  # [s-d, b, h]
        distance = 1 - F.cosine_similarity(prediction.float(), z[k][d:].float(), dim=-1)
        term_mask = mask[:, : s - d].t()
        loss = loss + LAMBDA / 4 * (distance * term_mask).sum() / term_mask.sum()
    cosine_sum = 0.0
    for b in range(mask.shape[0]):
        keep = mask[b].bool()
        unit = F.normalize(h[keep, b].float(), dim=-1)  # the counted tokens' states
        cos = unit @ unit.t()
        n = unit.shape[0]
        cosine_sum = cosine_sum + ((cos.sum(dim=1) - cos.diagonal()) / (n - 1)).sum()
    return loss + COSINE_WEIGHT * cosine_sum / mask.sum()


def test_step_loss_has_the_gradient_of_the_hand_written_objective(dist):
    args = tiny_args("--num-layers", "3")
    nitp = NITPConfig(target_layer=1, extra_target_layers=(2,), horizon=2,
                      cosine_reg_weight=COSINE_WEIGHT, loss_weight=LAMBDA)
    set_seed(7)
    model = build_model(args, nitp, True, True)
    objectives = model.objectives
    nitp_terms = [o for o in objectives if isinstance(o, ImplicitTokenPrediction)]
    assert [(o.layer, o.horizon) for o in nitp_terms] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [o.module_name for o in nitp_terms] == ["projector", "k1_t2", "k2_t1", "k2_t2"]
    # lambda is read once: each term weighs lambda / 4, the cosine term its own weight
    assert all(o.weight_at(5) == pytest.approx(LAMBDA / 4) for o in nitp_terms)
    (cosine,) = [o for o in objectives if isinstance(o, CosineRegularization)]
    assert cosine.weight_at(5) == COSINE_WEIGHT and len(objectives) == 5

    batch = _batch(args, seed=1, masked=[(0, 0), (0, 7), (1, 14), (1, 15)])
    z = _keep_layer_outputs(model, (1, 2))
    captured = {}
    model.decoder.final_layernorm.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("h", output))
    counts = _global_counts([batch], objectives)
    n_ntp = counts[0].item()
    assert n_ntp == 28
    # N_kd: positions with t + d in the sequence whose label counts; the cosine term: N_ntp
    assert counts[1:].tolist() == [27, 26, 27, 26, 28]
    scales = term_scales(objectives, counts, iteration=5)

    # the step: per micro-batch sum(lm) + sum_o scale_o sum(aux_o); megatron-core / N_ntp
    output = _forward(model, batch)
    assert set(output.aux) == {"nitp loss k=1 t+1", "nitp loss k=1 t+2", "nitp loss k=2 t+1",
                               "nitp loss k=2 t+2", "cosine reg loss"}
    loss, num_tokens, report = _loss_func(batch["loss_mask"], scales, False, output)
    assert num_tokens.item() == n_ntp
    assert report["cosine reg loss"][1].item() == n_ntp  # its own count, not NITP's
    (loss / n_ntp).backward()
    step_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # by hand, from the same forward's captured states
    output = _forward(model, batch)
    hand = _hand_written_loss(model, batch, captured["h"], z)
    torch.testing.assert_close(hand, loss.detach() / n_ntp, rtol=1e-5, atol=0)
    hand.backward()
    hand_grads = {name: p.grad for name, p in model.named_parameters()}
    assert set(hand_grads) == set(step_grads)
    for name, grad in hand_grads.items():
        assert grad is not None, name
        scale = grad.abs().max().item()
        torch.testing.assert_close(step_grads[name], grad, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")
    for prefix in ("projector.", "aux_modules.k1_t2.", "aux_modules.k2_t1.",
                   "aux_modules.k2_t2."):
        grads = [g for name, g in step_grads.items() if name.startswith(prefix)]
        assert grads and all(g.abs().sum() > 0 for g in grads), prefix


def test_the_plan_counts_one_projector_per_nitp_term(dist):
    """Two target layers x two horizons: the model holds four projectors (the paper's at
    ``projector``, the others in ``aux_modules``) and the plan's projector count is theirs."""
    from megatron_nitp.accounting.parameters import run_projector_parameters

    args = tiny_args("--num-layers", "3", "--nitp-target-layer", "1",
                     "--nitp-extra-target-layers", "2", "--nitp-horizon", "2")
    model = build_model(args, None, True, True)
    assert sorted(model.aux_modules) == ["k1_t2", "k2_t1", "k2_t2"]
    held = sum(p.numel() for m in (model.projector, *model.aux_modules.values())
               for p in m.parameters())
    one = sum(p.numel() for p in model.projector.parameters())
    assert held == 4 * one == run_projector_parameters(args)
    assert run_projector_parameters(tiny_args("--nitp-objective", "cosine_reg")) == 0
