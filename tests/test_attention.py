"""``--attention-backend`` (``models/attention.py``, ``config/performance.attention_path``):
torch's SDPA in the local spec equals megatron-core's unfused DotProductAttention (losses and
every gradient, GQA; under TP 2 + SP in tests/test_parallel.py's ``tp2-sp-unfused`` layout),
each machine gets the backend it can serve, and what SDPA cannot serve is refused."""

import pytest
import torch

from megatron_nitp import kernels
from megatron_nitp.config import performance
from megatron_nitp.models.attention import SDPAttention
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.initialize import set_seed
from megatron_nitp.training.model import build_model
from tests.helpers import tiny_args, nitp_terms


def _losses_and_grads(backend: str, *flags):
    """One forward/backward of the tiny NITP model (GQA: 4 heads, 2 query groups) with the
    given backend, from the same seed: (lm loss, nitp loss, {name: grad})."""
    args = tiny_args("--attention-backend", backend, *flags)
    set_seed(5)
    model = build_model(args, NITPConfig(target_layer=1), True, True)
    cores = {type(m).__name__ for n, m in model.named_modules() if n.endswith("core_attention")}
    assert cores == {"SDPAttention" if backend == "sdpa" else "DotProductAttention"}, cores
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (2, args.model.seq_length), generator=g)
    positions = torch.arange(args.model.seq_length).expand(2, -1)
    lm, nitp, mask, _ = nitp_terms(model(tokens, positions, None, labels=tokens,
                              loss_mask=torch.ones(2, args.model.seq_length)))
    loss = lm.mean() + nitp.sum() / mask.sum()
    loss.backward()
    return lm.mean().item(), nitp.sum().item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sdpa_equals_unfused_losses_and_every_gradient(dist):
    lm_u, nitp_u, grads_u = _losses_and_grads("unfused")
    lm_s, nitp_s, grads_s = _losses_and_grads("sdpa")
    assert lm_s == pytest.approx(lm_u, rel=1e-5) and nitp_s == pytest.approx(nitp_u, rel=1e-5)
    assert grads_s.keys() == grads_u.keys() and len(grads_u) > 10
    for name, grad in grads_u.items():
        scale = grad.abs().max().item()
        assert (grads_s[name] - grad).abs().max().item() <= 1e-5 * max(scale, 1e-3), name


def test_sdpa_with_attention_dropout_trains_and_differs_from_eval(dist):
    """Dropout goes through SDPA's dropout_p in training only (megatron-core's RNG tracker)."""
    args = tiny_args("--attention-backend", "sdpa", "--attention-dropout", "0.5")
    set_seed(6)
    model = build_model(args, NITPConfig(target_layer=1), True, True)
    tokens = torch.randint(0, 100, (2, args.model.seq_length), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(args.model.seq_length).expand(2, -1)
    with torch.no_grad():
        train = model(tokens, positions, None)
        model.eval()
        first, second = model(tokens, positions, None), model(tokens, positions, None)
    assert torch.equal(first, second) and not torch.allclose(train, first)


@pytest.mark.parametrize("env,backend,path", [
    (dict(cuda=False, te=False), "auto", "sdpa"),
    (dict(cuda=False, te=False), "unfused", "unfused"),
    (dict(cuda=True, te=False), "auto", "sdpa"),
    (dict(cuda=True, te=True), "auto", "te"),
    (dict(cuda=True, te=True), "flash", "te"),
    (dict(cuda=True, te=True), "unfused", "te"),
    (dict(cuda=True, te=True), "sdpa", "sdpa"),
])
def test_each_machine_gets_the_backend_it_serves(env, backend, path):
    with kernels.simulate(**env):
        config = tiny_args("--attention-backend", backend)
        assert performance.attention_path(config.performance, config.parallel.transformer_impl) == path
        field = performance.transformer_config_fields(
            config.performance, config.parallel.transformer_impl)["attention_backend"]
        assert field.name == (backend if path == "te" else "auto")


@pytest.mark.parametrize("backend", ["flash", "fused"])
def test_te_backends_are_refused_without_te(capsys, backend):
    with pytest.raises(SystemExit):
        parse_args(["--attention-backend", backend])
    err = capsys.readouterr().err
    assert f"--attention-backend {backend} is Transformer Engine's, and this machine has no " \
           "CUDA: use --attention-backend sdpa" in err


def test_sdpa_refuses_what_it_cannot_serve(dist):
    from megatron.core.transformer.enums import AttnMaskType

    args = tiny_args("--attention-backend", "sdpa")
    set_seed(7)
    model = build_model(args, NITPConfig(target_layer=1), True, True)
    core = next(m for m in model.modules() if isinstance(m, SDPAttention))
    q = torch.randn(8, 2, 4, 8)  # [s, b, heads, head dim]
    kv = torch.randn(8, 2, 2, 8)  # two query groups
    assert core(q, kv, kv, None).shape == (8, 2, 32)
    with pytest.raises(ValueError, match="causal self-attention"):
        core(q, kv, kv, None, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(ValueError, match="a KV cache"):
        core(q, torch.randn(12, 2, 2, 8), torch.randn(12, 2, 2, 8), None)
