"""The check behind the ``distributed`` marker: whether a test starts other processes, read from
its code (tests/conftest.py runs it at collection; tests/test_tiers.py fails on what it finds).

A test starts processes when it, one of its fixtures, or a function or class of tests/ that they
name uses a name in :data:`tests.helpers.LAUNCHERS` (subprocess, multiprocessing, torchrun_file,
launch_runs, ...). Such a test must be marked ``distributed`` (or ``gpu``) by hand."""

import inspect
import os
import sys

import pytest

from tests.helpers import LAUNCHERS, ROOT

#: config.stash: (the files collected, the node ids of tests that start processes unmarked)
UNMARKED = pytest.StashKey[tuple]()


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


def launches(obj, seen=None) -> bool:
    """Whether ``obj`` (a function or class) uses a launcher, directly or through the
    functions and classes of tests/ that it names."""
    seen = set() if seen is None else seen
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
                    and _in_tests(target) and launches(target, seen)):
                return True
    return False


def item_launches(item) -> bool:
    """Whether a collected test or one of its fixtures starts processes."""
    seen = set()
    funcs = [getattr(item, "function", None)]
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    if fixtureinfo is not None:
        for defs in fixtureinfo.name2fixturedefs.values():
            funcs += [d.func for d in defs]
    return any(f is not None and launches(f, seen) for f in funcs)
