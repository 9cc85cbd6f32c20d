"""tools/check_env.py: versions, layer spec, and a one-iteration tiny run that must succeed."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, clean_env

pytestmark = pytest.mark.distributed  # every test here starts processes


def _check_env(*argv):
    return subprocess.run([sys.executable, os.path.join("tools", "check_env.py"), *argv],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)


def test_reports_versions_and_the_cpu_path_and_trains_one_iteration():
    import torch
    from megatron.core import package_info

    proc = _check_env()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for name in ("python", "torch", "CUDA", "NCCL", "Transformer Engine", "Apex",
                 "megatron-core", "layer spec"):
        assert f"  {name} " in out, name
    assert torch.__version__ in out and package_info.__version__ in out
    assert "iteration        1/       1" in out
    assert "check_env: tiny run OK" in out
    if not torch.cuda.is_available():
        assert "local (megatron-core's own modules: no CUDA)" in out
        assert "backend gloo, CPU compatibility patches applied" in out


def test_a_failing_tiny_run_exits_non_zero():
    # flags after -- reach the tiny run: a vocabulary smaller than the tokenizer's is refused
    proc = _check_env("--", "--vocab-size", "100")
    assert proc.returncode == 1
    assert "check_env: FAILED" in proc.stdout
    assert "larger than --vocab-size 100" in proc.stdout + proc.stderr
