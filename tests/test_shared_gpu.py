"""Two NCCL ranks on one GPU (``megatron_nitp/device.py``, ``scripts/gpu_check.sh`` on a one-GPU
machine): the CPU half. The GPU each rank binds to, the NCCL settings per NCCL version, and
``tools/nccl_probe.py``'s checks (run here on gloo, two ranks)."""

import os
import subprocess

import pytest

from megatron_nitp import device
from tests.helpers import ROOT, clean_env, python_command


def test_each_rank_gets_its_gpu_or_shares_them():
    assert [device.gpu_index(r, 8) for r in range(8)] == list(range(8))
    assert [device.gpu_index(r, 1, shared=True) for r in range(3)] == [0, 0, 0]
    assert [device.gpu_index(r, 2, shared=True) for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(RuntimeError, match="local rank 1 has no GPU: this node has 1 .*"
                                           "MEGATRON_NITP_SHARED_GPU=1"):
        device.gpu_index(1, 1)


def test_nccl_settings_for_ranks_sharing_a_gpu():
    old = [device.shared_gpu_nccl_env(r, (2, 27, 5)) for r in range(2)]
    assert old[0]["NCCL_HOSTID"] != old[1]["NCCL_HOSTID"]  # two "hosts": no duplicate GPU
    for env in old:
        assert env["NCCL_SOCKET_IFNAME"] == "lo" and env["NCCL_NET"] == "Socket"
        assert env["NCCL_IB_DISABLE"] == "1" and env["NCCL_NVLS_ENABLE"] == "0"
    assert device.shared_gpu_nccl_env(0, (2, 30, 1)) == {"NCCL_MULTI_RANK_GPU_ENABLE": "1"}


@pytest.mark.distributed
@pytest.mark.slow
def test_probe_checks_the_collectives_on_two_ranks():
    cmd = python_command(os.path.join(ROOT, "tools", "nccl_probe.py"), 2)
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for check in ("2 ranks, gloo", "> send/recv: ok", "> all-reduce: ok", "> all-gather: ok"):
        assert check in proc.stdout, proc.stdout
