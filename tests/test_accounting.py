"""Loss accounting against autograd (issue 12, item 1).

One ``train_step`` with lambda = 0.3, loss masks with zeros and 2 micro-batches per step must
produce, in every parameter's DDP ``main_grad`` (captured just before the optimizer step), the
autograd gradient of

    L = sum(lm * m) / N_ntp + lambda * sum(nitp) / N_nitp

computed on a plain copy of the same model over the whole global batch (every micro-batch of
every data-parallel rank), with N_ntp the mask-1 tokens of the global batch and N_nitp the
mask-1 positions that have an NITP target (not the last position of their sequence, shift 1).
The reference is written out here: torch cross-entropy on the plain model's logits, and
1 - cos(P(h_t), z_{t+1}) with P and the cosine computed by hand from the raw projector weights
(``W_down (silu(W_gate h) * (W_up h))``, silu as ``x * sigmoid(x)``, cos as dot / norms; never
the model's projector module, so a wrong projector cannot pass on both sides), h the final
norm's output and z the detached output of layer k. The reported "lm loss" and "nitp loss" must
be the two global means.

Checked in one process (DP = 1) and in a 2-process gloo job (DP = 2, masks of very different
density on the two ranks, so per-rank normalization would be caught). The validation losses of
``evaluate`` are checked the same way against the same hand computation (forward only, eval
mode), in the same two places.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

LAMBDA = 0.3
SEQ = 16
VOCAB = 128
MBS = 2
NUM_MICROBATCHES = 2
RTOL = 1e-5


def _global_batches(dp_size: int) -> list[list[dict]]:
    """``[dp rank][micro-batch]`` batches of the global batch. Rank 0's masks are dense, rank
    1's sparse; some sequences end with mask 1 (N_nitp < N_ntp there), one has no counted token
    at all, and masks differ between micro-batches."""
    g = torch.Generator().manual_seed(1234)
    pos = torch.arange(SEQ)
    per_rank = []
    for rank in range(dp_size):
        batches = []
        for micro in range(NUM_MICROBATCHES):
            tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
            labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
            density = 0.85 if rank == 0 else 0.3
            mask = (torch.rand(MBS, SEQ, generator=g) < density).float()
            if rank == 0 and micro == 0:
                mask[0] = 1.0                     # fully counted sequence, last position too
                mask[1, :4] = 0.0                 # a masked prefix
                mask[1, -1] = 1.0
            if rank == 0 and micro == 1:
                mask[0, -1] = 0.0
                mask[1, -1] = 1.0
            if rank == 1 and micro == 0:
                mask[0] = 0.0                     # a sequence with no counted token
                mask[1, -1] = 1.0
            if rank == 1 and micro == 1:
                mask[:, -1] = 1.0
            batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                            "position_ids": pos.expand(MBS, SEQ).clone()})
        per_rank.append(batches)
    return per_rank


def hand_projector(params: dict, h: torch.Tensor) -> torch.Tensor:
    """P(h) ``[s, b, d]`` from the raw weights ``projector.{gate,up,down}.weight`` (``[4d, d]``,
    ``[4d, d]``, ``[d, 4d]``) of ``params`` (name -> tensor): SwiGLU without bias."""
    gate = h @ params["projector.gate.weight"].t()          # [s, b, 4d]
    up = h @ params["projector.up.weight"].t()              # [s, b, 4d]
    return (gate * torch.sigmoid(gate) * up) @ params["projector.down.weight"].t()  # [s, b, d]


def hand_nitp(pred: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position NITP loss ``[b, s-1]``: 1 - cos(pred_t, z_{t+1}) in fp32 for t < s - 1,
    times ``mask[:, t]``. ``pred``, ``z``: ``[s, b, d]``; ``mask``: ``[b, s]``."""
    p, target = pred[:-1].float(), z[1:].float()            # position t pairs with t + 1
    cos = (p * target).sum(-1) / (p.norm(dim=-1) * target.norm(dim=-1)).clamp(min=1e-8)
    return (1.0 - cos).transpose(0, 1) * mask[:, :-1]       # [b, s-1]


def _reference(plain, batches: list[dict], target_layer: int, backward: bool = True):
    """Autograd of the objective over ``batches`` (the whole global batch) on ``plain``: the
    gradients by parameter name (None without ``backward``), and the global lm and nitp
    means."""
    layer = next(m for m in plain.decoder.layers if m.layer_number == target_layer)
    seen = {}
    hooks = [
        layer.register_forward_hook(
            lambda mod, inp, out: seen.__setitem__("z", out[0] if isinstance(out, tuple) else out)),
        plain.decoder.final_layernorm.register_forward_hook(
            lambda mod, inp, out: seen.__setitem__("h", out)),
    ]
    plain.zero_grad(set_to_none=True)
    params = dict(plain.named_parameters())  # the state dict's tensors, with their gradients
    n_ntp = 0.0
    n_nitp = 0.0
    lm_terms, nitp_terms = [], []
    for batch in batches:
        mask = batch["loss_mask"]
        logits = plain(batch["tokens"], batch["position_ids"], None)  # [b, s, v]
        assert logits.shape == (MBS, SEQ, VOCAB), logits.shape
        lm = F.cross_entropy(logits.reshape(-1, VOCAB).float(), batch["labels"].reshape(-1),
                             reduction="none").view(MBS, SEQ)
        h = seen.pop("h")                     # [s, b, hidden]
        z = seen.pop("z").detach()            # [s, b, hidden], the stop-gradient target
        nitp = hand_nitp(hand_projector(params, h), z, mask)   # [b, s-1]
        lm_terms.append((lm * mask).sum())
        nitp_terms.append(nitp.sum())
        n_ntp += mask.sum().item()
        n_nitp += mask[:, :-1].sum().item()
    for hook in hooks:
        hook.remove()
    lm_total = torch.stack(lm_terms).sum()
    nitp_total = torch.stack(nitp_terms).sum()
    lm_mean = lm_total.item() / n_ntp
    nitp_mean = nitp_total.item() / n_nitp
    if not backward:
        return None, lm_mean, nitp_mean, n_ntp, n_nitp
    loss = lm_total / n_ntp + LAMBDA * nitp_total / n_nitp
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in plain.named_parameters()}
    return grads, lm_mean, nitp_mean, n_ntp, n_nitp


def check_accounting(dp_rank: int, dp_size: int) -> None:
    """Builds the model, runs one train_step on this rank's micro-batches and compares with the
    reference over the global batch. Needs torch.distributed and megatron's parallel state
    initialized with DP = ``dp_size``."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_nitp.models.initialization import initialize_weights
    from megatron_nitp.config import resolve
    from megatron_nitp.training.initialize import set_seed
    from megatron_nitp.training.model import build_model, unwrap, wrap_model
    from megatron_nitp.training.optimizer import build_optimizer
    from megatron_nitp.training.step import train_step
    from tests.helpers import tiny_args

    args = tiny_args("--nitp-loss-weight", str(LAMBDA), "--micro-batch-size", str(MBS),
                     "--global-batch-size", str(MBS * NUM_MICROBATCHES * dp_size),
                     "--seq-length", str(SEQ), "--transformer-impl", "local")
    args = resolve(args, dp_size, VOCAB)
    assert args.derived.padded_vocab_size == VOCAB
    assert args.derived.num_microbatches == NUM_MICROBATCHES and args.derived.data_parallel_size == dp_size
    assert not (args.training.bf16 or args.training.fp16)
    assert args.nitp_config.weight_at(0) == LAMBDA
    assert args.nitp_config.shift == 1

    set_seed(args.training.seed)
    net = build_model(args)
    initialize_weights(net, args.training.seed)
    set_seed(args.training.seed)
    plain = build_model(args)
    plain.load_state_dict(net.state_dict())
    plain.train()
    for (n1, p1), (n2, p2) in zip(net.named_parameters(), plain.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1

    model = wrap_model(net, args)
    optimizer, scheduler = build_optimizer(model, args.training, args.schedule, args.derived)
    config = model.config
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = None

    captured = {}
    original_step = optimizer.step

    def capturing_step(*a, **kw):
        for name, p in unwrap(model).named_parameters():
            captured[name] = p.main_grad.detach().float().cpu().clone()
        return original_step(*a, **kw)

    optimizer.step = capturing_step

    per_rank = _global_batches(dp_size)
    mine = [{k: v.clone() for k, v in b.items()} for b in per_rank[dp_rank]]
    metrics = train_step(model, optimizer, scheduler, iter(mine), args, 0, geometry=False)
    assert metrics["skipped"] == 0.0, metrics
    assert captured, "optimizer.step was not called"

    everything = [b for batches in per_rank for b in batches]
    grads, lm_mean, nitp_mean, n_ntp, n_nitp = _reference(
        plain, everything, args.nitp_config.target_layer)
    assert n_nitp < n_ntp, (n_ntp, n_nitp)  # the two counts differ in this batch

    assert set(captured) == set(grads), set(captured) ^ set(grads)
    for name, ref in grads.items():
        got = captured[name]
        ref_norm = ref.norm().item()
        assert ref_norm > 0, f"{name}: zero reference gradient"
        err = (got - ref).norm().item()
        assert err <= RTOL * ref_norm, (
            f"gradient of {name} differs from autograd of the global objective: "
            f"|diff| / |ref| = {err / ref_norm:.3e} (|got| = {got.norm().item():.6e}, "
            f"|ref| = {ref_norm:.6e}, ratio {got.norm().item() / ref_norm:.6f})")
    for key, want in (("lm loss", lm_mean), ("nitp loss", nitp_mean)):
        assert abs(metrics[key] - want) <= RTOL * abs(want), (
            f"reported {key} {metrics[key]!r} != hand-computed global mean {want!r}")
    total = lm_mean + LAMBDA * nitp_mean
    assert abs(metrics["total loss"] - total) <= RTOL * abs(total), (metrics["total loss"], total)
    print(f"rank {dp_rank}/{dp_size}: {len(grads)} gradients match, lm {metrics['lm loss']:.6f} "
          f"nitp {metrics['nitp loss']:.6f} (N_ntp {n_ntp:.0f}, N_nitp {n_nitp:.0f}) ACCOUNTING OK",
          flush=True)


def test_accounting_single_process(dist):
    check_accounting(0, 1)


def check_validation(dp_rank: int, dp_size: int) -> None:
    """``evaluate`` over the 4 micro-batches of ``_global_batches(2)`` (``[b, s]`` tokens,
    uneven masks; with DP = 2 each rank evaluates its own 2, one global batch) reports the
    global means of a hand computation over all 4 on a plain copy of the model: torch
    cross-entropy on its logits and the hand-written projector and cosine above. Dropout is
    0.2 in the config: the evaluation must run the model in eval mode (the reference does), and
    give it back in training mode."""
    from megatron_nitp.config import resolve
    from megatron_nitp.models.initialization import initialize_weights
    from megatron_nitp.training.initialize import set_seed
    from megatron_nitp.training.model import build_model, unwrap, wrap_model
    from megatron_nitp.training.step import evaluate
    from tests.helpers import tiny_args

    args = tiny_args("--micro-batch-size", str(MBS), "--seq-length", str(SEQ),
                     "--global-batch-size", str(MBS * NUM_MICROBATCHES * dp_size),
                     "--hidden-dropout", "0.2", "--attention-dropout", "0.2",
                     "--transformer-impl", "local")
    args = resolve(args, dp_size, VOCAB)
    assert args.derived.num_microbatches == NUM_MICROBATCHES and args.derived.padded_vocab_size == VOCAB
    set_seed(args.training.seed)
    net = build_model(args)
    initialize_weights(net, args.training.seed)
    plain = build_model(args)
    plain.load_state_dict(net.state_dict())
    model = wrap_model(net, args)
    model.train()
    per_rank = _global_batches(2)
    batches = [b for rank_batches in per_rank for b in rank_batches]  # 4 micro-batches
    mine = batches if dp_size == 1 else per_rank[dp_rank]
    metrics = evaluate(model, iter([dict(b) for b in mine]), args, eval_iters=2 // dp_size)
    assert unwrap(model).training
    plain.eval()
    with torch.no_grad():
        _, lm_mean, nitp_mean, n_ntp, n_nitp = _reference(
            plain, batches, args.nitp_config.target_layer, backward=False)
    assert n_nitp < n_ntp
    assert metrics["lm loss"] == pytest.approx(lm_mean, rel=RTOL), (metrics, lm_mean)
    assert metrics["nitp loss"] == pytest.approx(nitp_mean, rel=RTOL), (metrics, nitp_mean)
    print(f"rank {dp_rank}/{dp_size}: validation lm {metrics['lm loss']:.6f} nitp "
          f"{metrics['nitp loss']:.6f} VALIDATION OK", flush=True)


def test_validation_losses_equal_a_hand_computation(dist):
    check_validation(0, 1)


@pytest.mark.distributed
def test_accounting_data_parallel_uneven_masks():
    from tests.helpers import torchrun_file

    proc = torchrun_file(__file__, 2, timeout=300)
    assert proc.stdout.count("ACCOUNTING OK") == 2, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("VALIDATION OK") == 2, proc.stdout + proc.stderr[-3000:]


def _worker() -> None:
    from megatron.core import parallel_state

    from megatron_nitp.training.initialize import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1)
    assert parallel_state.get_data_parallel_world_size() == 2
    check_accounting(parallel_state.get_data_parallel_rank(), 2)
    check_validation(parallel_state.get_data_parallel_rank(), 2)
    destroy_distributed()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import megatron_nitp  # noqa: F401  (CPU import stubs before megatron-core loads)

    _worker()
