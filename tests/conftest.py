"""Shared fixtures (one single-process gloo group for in-process tests) and the test tiers.

Every test gets a tier at collection (``pytest -m unit`` is the fast local selection):

* ``gpu``: marked by hand (tests/test_gpu.py); needs a CUDA GPU, skipped without one.
* ``distributed``: the test starts other processes (torchrun, a training subprocess, a script)
  : it, one of its fixtures, or a tests/ helper it calls uses a name in
  ``tests.helpers.LAUNCHERS`` (subprocess, multiprocessing, torchrun_file, launch_runs, ...).
* ``slow``: marked by hand on tests that take more than ~20 s each on a 2-core CPU machine.
* ``unit``: everything else: in-process, no launched process, not slow.

The helpers tests share live in tests/helpers.py (re-exported here for older imports).
"""

import inspect
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


@pytest.fixture(scope="session")
def dist():
    """torch.distributed (gloo, world size 1) and megatron's parallel state, TP = PP = 1."""
    from megatron_nitp.training.initialize import initialize_distributed

    initialize_distributed(1, 1, 1)
    yield


# ------------------------------------------------------------------------------------ tiers

def _code_names(code):
    """Every global and attribute name a code object (and the code nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names


def _in_tests(obj) -> bool:
    """Whether ``obj`` is defined in a file under tests/ (imported as ``tests.x`` or, by
    pytest, as ``x``)."""
    path = getattr(sys.modules.get(getattr(obj, "__module__", None)), "__file__", None) or ""
    return os.path.dirname(os.path.abspath(path)) == os.path.join(ROOT, "tests")


def _launches(obj, seen) -> bool:
    """Whether ``obj`` (a function or class) uses a launcher, directly or through the
    functions and classes of tests/ that it names."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if inspect.isclass(obj):
        namespace = vars(sys.modules[obj.__module__])
        codes = [f.__code__ for f in vars(obj).values() if inspect.isfunction(f)]
    else:
        obj = inspect.unwrap(getattr(obj, "__func__", obj))
        if not hasattr(obj, "__code__"):
            return False
        namespace, codes = obj.__globals__, [obj.__code__]
    for code in codes:
        for name in _code_names(code):
            if name in LAUNCHERS:
                return True
            target = namespace.get(name)
            if ((inspect.isfunction(target) or inspect.isclass(target))
                    and _in_tests(target) and _launches(target, seen)):
                return True
    return False


def _tier(item) -> str:
    if item.get_closest_marker("gpu"):
        return "gpu"
    seen = set()
    funcs = [getattr(item, "function", None)]
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    if fixtureinfo is not None:
        for defs in fixtureinfo.name2fixturedefs.values():
            funcs += [d.func for d in defs]
    if any(f is not None and _launches(f, seen) for f in funcs):
        return "distributed"
    return "slow" if item.get_closest_marker("slow") else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _tier(item)
        if tier in ("unit", "distributed"):
            item.add_marker(tier)
