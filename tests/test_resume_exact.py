"""Exact resume with dropout, in one process: weights, Adam moments and RNG states, bit for bit.

A run of 4 iterations straight and the same run stopped after iteration 2 (``--exit-interval
2``: the same LR schedule, a checkpoint written) then resumed with ``--load`` for iterations 3
and 4 must end in the same state: every parameter, every Adam ``exp_avg`` / ``exp_avg_sq`` /
``step``, the Python, NumPy, torch and megatron RNG-tracker states, the LR scheduler's state,
the data position, and the per-iteration losses and grad norms of iterations 3 and 4 (CPU,
fp32: bitwise). Hidden and attention dropout are on (0.1), so the dropout masks of iterations
3 and 4 are drawn from the restored RNG: a resume that re-seeds instead of restoring the RNG
draws other masks, and the losses and weights differ.
"""

import json
import random

import numpy as np
import pytest
import torch

from megatron_nitp.training import loop
from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.model import unwrap
from tests.helpers import TINY_MODEL, TINY_RUN

TINY = TINY_MODEL + TINY_RUN + ["--nitp-target-layer", "1", "--lr-warmup-iters", "1",
                                "--log-interval", "1", "--mock-data", "--train-iters", "4",
                                "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def _rng() -> dict:
    """Every RNG state a training step draws from (CPU: the tracker's states are CPU ones)."""
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state().clone(),
            "tracker": {k: v.clone() for k, v in
                        tensor_parallel.get_cuda_rng_tracker().get_states().items()}}


def _state(model, optimizer) -> dict:
    """Weights by name and Adam state by parameter name (torch Adam inside megatron's fp32
    optimizer: its parameters are the model's)."""
    inner = unwrap(model)
    names = {id(p): n for n, p in inner.named_parameters()}
    adam = {}
    torch_adam = optimizer.optimizer
    for group in torch_adam.param_groups:
        for p in group["params"]:
            adam[names[id(p)]] = {k: v.detach().clone() for k, v in torch_adam.state[p].items()}
    return {"weights": {n: p.detach().clone() for n, p in inner.named_parameters()},
            "adam": adam}


def _run(monkeypatch, run_dir, *flags, expect_exit=None):
    """One in-process run; the state after its last step and its per-iteration history."""
    seen = {}
    real = loop.train_step

    def capturing(model, optimizer, scheduler, data_iterator, *args, **kwargs):
        metrics = real(model, optimizer, scheduler, data_iterator, *args, **kwargs)
        seen.update(_state(model, optimizer), rng=_rng(), scheduler=scheduler.state_dict(),
                    consumed_samples=data_iterator.consumed_samples)
        return metrics

    monkeypatch.setattr(loop, "train_step", capturing)
    args = parse_args(TINY + list(flags) + ["--run-dir", str(run_dir)])
    if expect_exit is None:
        loop.pretrain(args)
        with open(run_dir / "summary.json") as f:
            history = {k: dict((int(i), v) for i, v in points)
                       for k, points in json.load(f)["history"].items()}
    else:
        with pytest.raises(SystemExit) as err:
            loop.pretrain(args)
        assert err.value.code == expect_exit
        history = None
    monkeypatch.undo()
    return seen, history


def _assert_same(got, want, what):
    if isinstance(want, dict):
        assert got.keys() == want.keys(), (what, set(got) ^ set(want))
        for key in want:
            _assert_same(got[key], want[key], f"{what}.{key}")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), (
            f"{what} differs: max |diff| {(got.double() - want.double()).abs().max().item():.3e}")
    elif isinstance(want, np.ndarray):
        assert np.array_equal(got, want), what
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), what
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same(a, b, f"{what}[{i}]")
    else:
        assert got == want, (what, got, want)


def test_resume_with_dropout_is_bitwise_in_weights_adam_and_rng(dist, tmp_path, monkeypatch):
    from megatron_nitp.training.exits import EXIT_INTERVAL

    straight, full = _run(monkeypatch, tmp_path / "straight", "--no-save")
    stopped, _ = _run(monkeypatch, tmp_path / "stopped", "--exit-interval", "2", "--no-save",
                      expect_exit=EXIT_INTERVAL)
    resumed, second = _run(monkeypatch, tmp_path / "resumed", "--no-save",
                           "--load", str(tmp_path / "stopped" / "checkpoints"))
    assert sorted(second["lm loss"]) == [3, 4]
    # the stop really stopped half way: its state is not the end state
    assert not torch.equal(stopped["weights"]["projector.down.weight"],
                           straight["weights"]["projector.down.weight"])
    assert len(straight["weights"]) == len(straight["adam"]) == 17  # 2 layers + projector
    assert {float(s["step"]) for s in straight["adam"].values()} == {4.0}
    for key in ("lm loss", "nitp loss", "grad norm"):
        for it in (3, 4):
            assert second[key][it] == full[key][it], (key, it, second[key][it], full[key][it])
    _assert_same(resumed["weights"], straight["weights"], "weights")
    _assert_same(resumed["adam"], straight["adam"], "adam")
    _assert_same(resumed["rng"], straight["rng"], "rng")
    _assert_same(resumed["scheduler"], straight["scheduler"], "scheduler")
    assert resumed["consumed_samples"] == straight["consumed_samples"] == 16
