"""NITP capture under megatron-core's full activation recomputation, and CUDA graphs refused.

Full recompute (``recompute_granularity='full'``, uniform, one layer per checkpoint) runs every
layer under no_grad in the forward and again inside the backward pass. The NITP loss and every
gradient must equal the run without recomputation, the capture hooks must not keep the
recomputed states, and a target that needs a gradient (``--nitp-no-stop-gradient``) but comes
out of a checkpoint without one must fail loudly instead of silently training nothing through it.
"""

import dataclasses

import pytest
import torch

from megatron_nitp.device import device
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.training import model as model_module
from megatron_nitp.training.initialize import set_seed
from tests.helpers import tiny_args, nitp_terms

FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)


def _build(monkeypatch, recompute: dict | None, **nitp):
    args = tiny_args("--num-layers", "3")
    if recompute:
        original = model_module.transformer_config
        monkeypatch.setattr(model_module, "transformer_config",
                            lambda *a, **k: dataclasses.replace(original(*a, **k), **recompute))
    set_seed(5)
    try:
        model = model_module.build_model(args, NITPConfig(**nitp), True, True)
    finally:
        monkeypatch.undo()
    model.to(device())  # as wrap_model does (the local spec's norms are built on the CPU)
    model.train()
    return model, args


def _causal(args):
    """An explicit causal mask (True = masked). With None, megatron-core builds one with
    ``device="cuda"``, which compat's CUDA-to-CPU torch function mode maps to CPU in the forward
    but cannot in the backward pass, where the recomputation runs and function modes are off."""
    ones = torch.ones(args.model.seq_length, args.model.seq_length, dtype=torch.bool, device=device())
    return torch.triu(ones, 1)[None, None]


def _inputs(args, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (2, args.model.seq_length), generator=g).to(device())
    positions = torch.arange(args.model.seq_length, device=device()).expand(2, -1)
    return tokens, positions, torch.ones(2, args.model.seq_length, device=device())


def _step(model, args, seed=0):
    tokens, positions, mask = _inputs(args, seed)
    lm, nitp, _, _ = nitp_terms(model(tokens, positions, _causal(args), labels=tokens, loss_mask=mask))
    ((lm * mask).sum() + 0.5 * nitp.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return lm.detach(), nitp.detach(), grads


@pytest.mark.parametrize("nitp", [
    dict(target_layer=1),                                  # the paper's default
    dict(target_layer=1, hidden_source="last_layer"),
    dict(target_layer=3, hidden_source="last_layer"),      # k = the last layer
], ids=["paper-default", "last-layer-source", "last-layer-source-k-last"])
def test_full_recompute_equals_no_recompute(dist, monkeypatch, nitp):
    plain, args = _build(monkeypatch, None, **nitp)
    lm_ref, nitp_ref, grads_ref = _step(plain, args)

    model, args = _build(monkeypatch, FULL_RECOMPUTE, **nitp)
    assert model.config.recompute_granularity == "full"
    lm, loss, grads = _step(model, args)

    # the layers really were recomputed in the backward pass, and those re-fires were ignored
    assert model._taps[model.nitp.target_layer].fires_in_backward > 0
    assert model._taps[model.nitp.target_layer].state is None and model._final.state is None
    torch.testing.assert_close(lm, lm_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, nitp_ref, rtol=1e-6, atol=0)
    assert loss.sum() > 0
    assert grads.keys() == grads_ref.keys()
    # every parameter that feeds the loss gets its gradient, the projector's included
    names = {n for n, p in model.named_parameters()}
    assert names == grads.keys(), names - grads.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-6, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


# --recompute-* flags -> megatron-core's recomputation (3 layers)
MODES = {
    "full-uniform-1": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"],
    "full-uniform-3": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "3"],  # one checkpoint around all 3 layers
    "full-block-2": ["--recompute-granularity", "full", "--recompute-method", "block",
                     "--recompute-num-layers", "2"],
    "selective-core_attn": ["--recompute-granularity", "selective"],
    "selective-mlp": ["--recompute-granularity", "selective", "--recompute-modules", "mlp"],
    "selective-core_attn-mlp": ["--recompute-granularity", "selective", "--recompute-modules",
                                "core_attn", "mlp"],
}
ABLATIONS = {
    "paper-default": dict(target_layer=1),
    "k-embedding": dict(target_layer=0),
    "last-layer-source": dict(target_layer=1, hidden_source="last_layer"),
    # k = 3 is outside full-block-2's checkpoints; full-uniform covers it (refused at parse
    # time: tests/test_performance.py)
    "no-stop-gradient": dict(target_layer=3, stop_gradient=False),
}
CASES = [(mode, ablation) for mode in MODES for ablation in ABLATIONS
         if not (ablation == "no-stop-gradient" and mode.startswith("full-uniform"))]


def _build_from_flags(flags, **nitp):
    args = tiny_args("--num-layers", "3", *flags)
    set_seed(5)
    model = model_module.build_model(args, NITPConfig(**nitp), True, True)
    model.to(device())
    model.train()
    return model, args


@pytest.mark.parametrize("mode,ablation", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_every_recompute_mode_equals_no_recompute(dist, mode, ablation):
    """Each --recompute-* setting gives the losses and every gradient of the run without
    recomputation (rel 1e-6), with NITP and each ablation of its target and hidden state."""
    nitp = ABLATIONS[ablation]
    plain, args = _build_from_flags([], **nitp)
    lm_ref, nitp_ref, grads_ref = _step(plain, args)
    model, args = _build_from_flags(MODES[mode], **nitp)
    assert model.config.recompute_granularity == MODES[mode][1]
    lm, loss, grads = _step(model, args)
    if mode.startswith("full") and nitp["target_layer"] >= 1:
        # layer k ran again in the backward pass (uniform: all layers; block: the first two)
        assert (model._taps[model.nitp.target_layer].fires_in_backward > 0) == (nitp["target_layer"] <= 2
                                                          or "uniform" in mode)
    assert model._taps[model.nitp.target_layer].state is None and model._final.state is None
    torch.testing.assert_close(lm, lm_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, nitp_ref, rtol=1e-6, atol=0)
    assert loss.sum() > 0
    assert grads.keys() == grads_ref.keys() == {n for n, _ in model.named_parameters()}
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-6, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_last_layer_source_trains_the_layers_through_the_projector(dist, monkeypatch):
    """Without a graph-connected hidden state, P(h) would train only the projector: with only
    the NITP loss, every decoder layer must still get a gradient under full recompute."""
    model, args = _build(monkeypatch, FULL_RECOMPUTE, target_layer=1, hidden_source="last_layer")
    tokens, positions, mask = _inputs(args, 1)
    _, nitp, _, _ = nitp_terms(model(tokens, positions, _causal(args), labels=tokens, loss_mask=mask))
    nitp.sum().backward()
    for layer in model.decoder.layers:
        assert layer.mlp.linear_fc2.weight.grad.abs().sum() > 0, layer.layer_number
    assert model.decoder.final_layernorm.weight.grad is None  # last_layer: before the norm


def test_no_stop_gradient_under_full_recompute_is_a_clear_error(dist, monkeypatch):
    model, args = _build(monkeypatch, FULL_RECOMPUTE, target_layer=2, stop_gradient=False)
    tokens, positions, mask = _inputs(args, 2)
    with pytest.raises(RuntimeError) as err:
        model(tokens, positions, _causal(args), labels=tokens, loss_mask=mask)
    message = str(err.value)
    assert "activation recomputation covers layer 2" in message
    assert "--nitp-no-stop-gradient" in message
    assert "recompute_num_layers <= 1" in message and "stop-gradient" in message
    assert model._taps[model.nitp.target_layer].state is None and model._final.state is None
    # evaluation (no graph recorded) and the block method leaving layer k out are fine
    with torch.no_grad():
        model(tokens, positions, _causal(args), labels=tokens, loss_mask=mask)
    block = dict(FULL_RECOMPUTE, recompute_method="block", recompute_num_layers=1)
    model, args = _build(monkeypatch, block, target_layer=2, stop_gradient=False)
    _, _, grads = _step(model, args)
    plain, _ = _build(monkeypatch, None, target_layer=2, stop_gradient=False)
    _, _, grads_ref = _step(plain, args)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-6, atol=1e-12)


def test_hooks_keep_nothing_after_backward_without_recompute(dist, monkeypatch):
    model, args = _build(monkeypatch, None, target_layer=1)
    _step(model, args)
    assert model._taps[model.nitp.target_layer].fires_in_backward == 0
    assert model._taps[model.nitp.target_layer].state is None and model._final.state is None


@pytest.mark.parametrize("field", ["cuda_graph_impl", "enable_cuda_graph"])
def test_cuda_graphs_are_refused(dist, field):
    from megatron_nitp.models.gpt import _refuse_cuda_graphs

    config = model_module.run_transformer_config(tiny_args())
    _refuse_cuda_graphs(config)  # the default: no CUDA graphs
    if not hasattr(config, field):
        pytest.skip(f"this megatron-core has no TransformerConfig.{field}")
    # set after construction: __post_init__ would check CUDA graph prerequisites (TE, GPU)
    object.__setattr__(config, field, "local" if field == "cuda_graph_impl" else True)
    with pytest.raises(ValueError, match="CUDA graphs .* not supported with NITPGPTModel"):
        model_module.NITPGPTModel(config, NITPConfig(target_layer=1),
                                  transformer_layer_spec=model_module.layer_spec(config),
                                  vocab_size=128, max_sequence_length=16)
