"""Shared fixtures (one single-process gloo group for in-process tests) and the test tiers.

Every test has a tier (``pytest -m unit`` is the fast local selection):

* ``gpu``: marked by hand (tests/test_gpu.py); needs a CUDA GPU, skipped without one.
* ``distributed``: marked by hand (``@pytest.mark.distributed``, or ``pytestmark`` for a whole
  module) on a test that starts other processes (torchrun, a training subprocess, a script).
  tests/test_tiers.py fails on a test that does so unmarked (the check: tests/tiers.py).
* ``slow``: marked by hand on tests that take more than ~20 s each on a 2-core CPU machine.
* ``unit``: given here at collection to every other test: in-process, not slow.

The helpers tests share live in tests/helpers.py (re-exported here for older imports).
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import megatron_nitp  # noqa: E402,F401  (registers CPU import stubs before megatron-core loads)
from tests.helpers import (  # noqa: E402,F401  (re-exported)
    LAUNCHERS, clean_env, free_port, tiny_args, torchrun_file,
)
from tests.tiers import UNMARKED, item_launches  # noqa: E402


def pytest_configure(config):
    """A pytest started in the background of a script (``nohup bash .ci/run &``) inherits SIGINT
    ignored, and every process it starts would inherit that too: the tests of what Ctrl-C does
    (tests/test_exits.py, tests/test_gpu_check.py) would see it never arrive. A handler that
    does nothing keeps this session as deaf to SIGINT as it was, while the processes it starts
    get SIGINT's default back (exec resets a caught signal, never an ignored one)."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, lambda signum, frame: None)


@pytest.fixture(scope="session")
def dist():
    """torch.distributed (gloo, world size 1) and megatron's parallel state, TP = PP = 1."""
    from megatron_nitp.training.initialize import initialize_distributed

    initialize_distributed(1, 1, 1)
    yield


# ------------------------------------------------------------------------------------ tiers

def _tier(item) -> str:
    for tier in ("gpu", "distributed", "slow"):
        if item.get_closest_marker(tier):
            return tier
    return "unit"


def pytest_collection_modifyitems(config, items):
    unmarked = []
    for item in items:
        tier = _tier(item)
        if tier == "unit":
            item.add_marker("unit")
        if tier in ("unit", "slow") and item_launches(item):
            unmarked.append(item.nodeid)
    config.stash[UNMARKED] = ({str(item.path) for item in items}, unmarked)
