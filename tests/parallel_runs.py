"""The parallel-equivalence tests' shared parts (tests/test_parallel.py, test_moe.py,
test_layout_invariant.py): the tiny model's flags, launches of ``parallel_harness.py --runs``
by world size, and the comparison of a run's whole state with the one-process reference."""

import json
import os
import subprocess

import pytest
import torch

from tests.helpers import TINY_MODEL, launch_runs

# The tiny model of the equivalence runs (they add their NITP flags): 4 layers, so that PP 2 and
# PP 4 have whole stages, 32 tokens, 4 micro-batches of 2 per step, 3 steps; the weights' norm
# and the gradient's zeros logged, to be compared too.
FLAGS = TINY_MODEL + ["--num-layers", "4", "--seq-length", "32", "--global-batch-size", "8",
                      "--train-iters", "3", "--log-params-norm", "--log-num-zeros-in-grad"]
MAIN_PARAM = "optimizer.state.param."


def load_result(out):
    """(per-iteration metrics, whole state, evaluate() record or None) of one run."""
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    evaluation = None
    if os.path.exists(os.path.join(out, "eval.json")):
        with open(os.path.join(out, "eval.json")) as f:
            evaluation = json.load(f)
    return metrics, torch.load(os.path.join(out, "state.pt")), evaluation


class Launcher:
    """Results by run name; each world size is launched once, when a test first needs it
    (``timeout`` seconds a launch). A run that crashes fails its test with the launch's output,
    and the runs after it are launched again without it, ``relaunches`` times at most (a bug
    that crashes every run costs 1 + ``relaunches`` launches, not one per run); a launch that
    times out (a hang) fails every run it left unfinished. A run is finished when its
    ``state.pt`` exists (the harness writes it last)."""

    def __init__(self, root, groups, timeout=900, relaunches=2):
        self.root, self.groups, self.timeout, self.relaunches = root, groups, timeout, relaunches
        self.launched, self.errors = set(), {}

    def _finished(self, name):
        return os.path.exists(self.root / name / "state.pt")

    def _launch(self, nproc):
        pending = dict(self.groups[nproc])
        for attempt in range(1 + self.relaunches):
            try:
                launch_runs(self.root, nproc, pending, timeout=self.timeout)
                return
            except (AssertionError, subprocess.TimeoutExpired) as err:
                left = [name for name in pending if not self._finished(name)]
                last = attempt == self.relaunches or isinstance(err, subprocess.TimeoutExpired)
                for name in left if last else left[:1]:
                    self.errors[name] = (f"the launch of world size {nproc} failed before run "
                                         f"{name} finished:\n{err}")
                pending = {} if last else {name: pending[name] for name in left[1:]}
            if not pending:
                return

    def __call__(self, name):
        nproc = next(n for n, runs in self.groups.items() if name in runs)
        if nproc not in self.launched:
            self.launched.add(nproc)
            self._launch(nproc)
        if name in self.errors:
            pytest.fail(self.errors[name])
        return load_result(self.root / name)


def assert_state_close(state, ref, what, weight_atol=3e-5, lr=None):
    """The whole state of a run equals the reference's: the same keys, every tensor close, and
    every replicated copy (``replica differences``) equal to the saved one, bit for bit.

    The distributed optimizer's fp32 main parameters (``optimizer.state.param.K``) have no
    counterpart in the plain fp32 optimizer, whose main parameters are the weights themselves:
    they are compared with the reference's weight K.

    Tolerances: a layout sums gradients in another order, so each gradient carries last-ulp
    differences, which the steps then amplify. Weights: relative 1e-5 plus ``weight_atol``
    absolute (3e-5, 1% of the learning rate 3e-3). Adam normalizes every update to about lr
    whatever the gradient's size, so where a gradient entry is near zero its rounding noise
    moves that weight by a fraction of lr (measured on CPU: up to 2.9e-5 after 3 steps, single
    elements); a wrong or missing gradient moves weights by O(lr). ``lr`` given (the GPU
    tests, whose numerics the CPU cannot rehearse): up to one weight in 10,000 of a tensor (at
    least one) may exceed the bound, by at most lr - the entries whose gradient is rounding
    noise in both runs, which Adam can move by up to lr; a bug moves many.

    Optimizer moments (exp_avg, exp_avg_sq): relative 1e-5 plus 5e-4 of the tensor's largest
    entry. They are statistics of gradients computed from those slightly different weights, so
    their error scales with the tensor's largest entries, and exp_avg_sq, a square (error
    2 g dg), by about twice the gradients' relative error (measured, MoE with TP2+SP+EP2: up to
    3.6e-5 of it on one machine, 1.1e-4 on an AMD EPYC host, where the router settings' layout
    failed a 1e-4 bound by one element of 8192); entries near zero have no meaningful relative
    accuracy. A wrong or missing gradient term, scaled gradients (which Adam's weights would
    not show) or the state of another parameter differ by O(1) of it.
    """
    tensors, ref_tensors = dict(state["tensors"]), ref["tensors"]
    for key in [k for k in tensors if k.startswith(MAIN_PARAM)]:
        tensors[f"main param {key[len(MAIN_PARAM):]}"] = tensors.pop(key)
    expected = dict(ref_tensors)
    for key in tensors:
        if key.startswith("main param "):
            expected[key] = ref_tensors[key[len("main param "):]]
    assert sorted(tensors) == sorted(expected), what
    for key, want in expected.items():
        got = tensors[key]
        assert got.shape == want.shape, (what, key)
        assert not got.isnan().any(), (what, key, "not covered by any rank's shards")
        moment = key.startswith("optimizer.state.")
        atol = 5e-4 * want.abs().max().item() if moment else weight_atol
        if lr is not None and not moment:
            excess = (got - want).abs() - (atol + 1e-5 * want.abs())
            outside = int((excess > 0).sum())
            assert outside <= max(1, got.numel() // 10000), (
                what, key, f"{outside} weights outside the bound")
            assert excess.max().item() <= lr, (what, key, f"a weight off by {excess.max():.3g}")
            continue
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol,
                                   msg=lambda m, key=key: f"{what}: {key}: {m}")
    different = {k: v for k, v in state["replica differences"].items() if v != 0.0}
    assert not different, (what, "replicated copies disagree", different)
