"""NITPGPTModel on CPU: projector shape and size, parameter counts, forward/backward, capture."""

import torch
from megatron.core.models.gpt import GPTModel

from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.nitp.loss import implicit_token_loss
from megatron_nitp.nitp.projector import SwiGLUProjector
from megatron_nitp.training.initialize import set_seed
from megatron_nitp.training.model import build_model, layer_spec, run_transformer_config
from tests.helpers import tiny_args, nitp_terms


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def _batch(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (2, args.model.seq_length), generator=g)
    positions = torch.arange(args.model.seq_length).expand(2, -1)
    return tokens, positions


def test_projector_is_swiglu_with_12_d_squared_parameters(dist):
    args = tiny_args("--hidden-size", "48")
    projector = SwiGLUProjector(run_transformer_config(args))
    assert _numel(projector) == 12 * 48 * 48
    assert projector.gate.weight.shape == (192, 48)
    assert projector.down.weight.shape == (48, 192)
    assert all(getattr(m, "bias", None) is None for m in (projector.gate, projector.up, projector.down))
    x = torch.randn(5, 3, 48)
    assert projector(x).shape == (5, 3, 48)


def test_inference_model_has_exactly_the_baseline_parameters(dist):
    args = tiny_args()
    set_seed(1)
    baseline = GPTModel(
        run_transformer_config(args), layer_spec(run_transformer_config(args)),
        vocab_size=args.derived.padded_vocab_size, max_sequence_length=args.model.seq_length,
        share_embeddings_and_output_weights=True, position_embedding_type="rope",
    )
    inference = build_model(args, NITPConfig(enabled=False), True, True)
    training = build_model(args, NITPConfig(target_layer=1), True, True)
    assert inference.projector is None
    assert _numel(inference) == _numel(baseline)
    assert _numel(training) == _numel(baseline) + 12 * args.model.hidden_size**2


def test_forward_returns_per_token_losses_and_backward_reaches_projector(dist):
    args = tiny_args()
    set_seed(2)
    model = build_model(args, NITPConfig(target_layer=1), True, True)
    tokens, positions = _batch(args)
    lm, nitp, nitp_mask, hidden = nitp_terms(model(tokens, positions, None, labels=tokens,
                                        loss_mask=torch.ones(2, 16), return_hidden=True))
    assert nitp_mask.sum() == 2 * 15 and torch.all(nitp_mask[:, -1] == 0)
    assert lm.shape == (2, 16) and nitp.shape == (2, 16) and hidden.shape == (16, 2, 32)
    assert torch.all(nitp[:, -1] == 0) and torch.all(nitp[:, :-1] > 0)
    # the hidden states only when asked for (the step asks on its geometry micro-batch)
    lm_only, nitp_only, _, none = nitp_terms(model(tokens, positions, None, labels=tokens,
                                        loss_mask=torch.ones(2, 16)))
    assert none is None
    assert torch.equal(lm_only, lm) and torch.equal(nitp_only, nitp)
    (lm.mean() + nitp.sum() / 30).backward()
    for name, p in model.projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # without labels it is a plain GPTModel: logits [b, s, V]
    logits = model(tokens, positions, None)
    assert logits.shape == (2, 16, args.derived.padded_vocab_size)


def test_target_layer_zero_is_the_embedding_output(dist):
    args = tiny_args()
    set_seed(3)
    model = build_model(args, NITPConfig(target_layer=0), True, True)
    tokens, positions = _batch(args, seed=1)
    mask = torch.ones(2, 16)
    _, nitp, _, hidden = nitp_terms(model(tokens, positions, None, labels=tokens,
                               loss_mask=mask, return_hidden=True))
    with torch.no_grad():
        embedded = model.embedding(input_ids=tokens, position_ids=positions)
        expected = implicit_token_loss(model.projector(hidden), embedded, mask)[0]
    torch.testing.assert_close(nitp, expected)


def test_target_layer_k_is_the_kth_layer_output(dist):
    args = tiny_args("--num-layers", "3")
    set_seed(4)
    model = build_model(args, NITPConfig(target_layer=2), True, True)
    seen = {}

    def keep(module, inputs, output):
        seen["z"] = output[0].detach()

    model.decoder.layers[1].register_forward_hook(keep)
    tokens, positions = _batch(args, seed=2)
    mask = torch.ones(2, 16)
    _, nitp, _, hidden = nitp_terms(model(tokens, positions, None, labels=tokens,
                               loss_mask=mask, return_hidden=True))
    with torch.no_grad():
        expected = implicit_token_loss(model.projector(hidden), seen["z"], mask)[0]
    torch.testing.assert_close(nitp, expected)
    assert model.decoder.layers[1].layer_number == 2


def test_inference_model_gives_the_training_models_logits(dist):
    args = tiny_args()
    set_seed(6)
    training = build_model(args, NITPConfig(target_layer=1), True, True)
    inference = build_model(args, NITPConfig(enabled=False), True, True)
    state = {k: v for k, v in training.state_dict().items() if not k.startswith("projector.")}
    missing, unexpected = inference.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    tokens, positions = _batch(args)
    with torch.no_grad():
        torch.testing.assert_close(inference(tokens, positions, None),
                                   training(tokens, positions, None), rtol=0, atol=0)
    assert _numel(training) - _numel(inference) == 12 * args.model.hidden_size ** 2
