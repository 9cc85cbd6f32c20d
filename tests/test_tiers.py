"""The tiers are marked by hand, and the marks are checked: a test that starts other processes
(read from its code, its fixtures and the tests/ helpers they call: tests/tiers.py) is marked
``distributed`` (or ``gpu``); every other test that is not slow is ``unit`` (tests/conftest.py)."""

import glob
import os
import sys
import types

import pytest

from tests.helpers import ROOT
from tests.tiers import UNMARKED, launches


def test_every_test_that_starts_processes_is_marked_distributed(pytestconfig):
    collected, unmarked = pytestconfig.stash[UNMARKED]
    missing = set(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))) - collected
    if missing:
        pytest.skip(f"checks the tests collected with it: {len(missing)} test files are not")
    assert not unmarked, ("start processes but are not marked distributed "
                          "(@pytest.mark.distributed):\n" + "\n".join(unmarked))


def test_the_check_follows_helpers_and_classes(monkeypatch):
    sample = types.ModuleType("tiers_sample")
    monkeypatch.setitem(sys.modules, sample.__name__, sample)
    exec(compile(
        "import subprocess\n"
        "def direct():\n    return subprocess.run(['true'])\n"
        "def nested():\n    return [lambda: subprocess for _ in ()]\n"
        "def in_process():\n    return sum([1, 2])\n"
        "class Runner:\n    def __call__(self):\n        return torchrun_file(__file__, 2)\n"
        "def through_a_helper():\n    return Runner()()\n",
        "tiers_sample.py", "exec"), vars(sample))
    assert launches(sample.direct) and launches(sample.nested) and launches(sample.Runner)
    assert not launches(sample.in_process)
    # a helper is followed only when it is defined under tests/
    assert not launches(sample.through_a_helper)
