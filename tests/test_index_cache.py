"""The dataset index cache on clusters (``megatron_nitp/data/index_cache.py``): a
``--data-cache-path`` that is not one folder for all nodes is named at start; ranks waiting for
rank 0's first build say what they wait for and give up under their own timeout with the fix;
``tools/build_index.py`` builds, before the job, exactly the cache the job then reads.

The two-rank part runs this file under torchrun (``__main__``); the second rank plays the first
rank of another node (``LOCAL_RANK`` 0) whose copy of the folder is a different one."""

import io
import os
import sys
from contextlib import redirect_stdout

import pytest

from tests.helpers import ROOT, TINY_MODEL, clean_env, load_tool, python_command, torchrun_file

pytestmark = pytest.mark.distributed  # every test here starts processes


@pytest.mark.slow
def test_shared_folder_and_rank0_build_waits_on_two_ranks(tmp_path):
    proc = torchrun_file(__file__, 2, timeout=300)
    out = proc.stdout
    assert "shared: ok" in out
    assert out.count("not one folder for all nodes") == 2  # both ranks refuse
    assert "is not visible on" in out and "(rank 1)" in out and "(rank 0)" not in out
    assert "> waiting for global rank 0 to build the dataset index in CACHE" in out
    assert "built after wait: ok" in out
    assert out.count("waited") == 1 and "build it before the job with `python " \
        "tools/build_index.py`" in out and "raise --dataset-build-timeout-minutes" in out


TINY = TINY_MODEL + ["--seq-length", "32", "--train-iters", "3", "--nitp-target-layer", "1",
                     "--eval-interval", "2", "--eval-iters", "1", "--no-plot", "--no-progress-bar",
                     "--geometry-interval", "0", "--no-save"]


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(base, name), folder)
                  for base, _, names in os.walk(folder) for name in names)


@pytest.mark.slow
def test_build_index_writes_the_cache_the_job_reads(dist, tmp_path):
    """The index built by the tool from the job's flags (TP 2 on one process: the layout does
    not enter the index) is the one a 2-rank TP 2 job reads: the job adds no file."""
    import subprocess

    cache = tmp_path / "cache"
    flags = TINY + ["--data-cache-path", str(cache), "--tensor-model-parallel-size", "2"]
    with redirect_stdout(io.StringIO()) as out:
        assert load_tool("build_index").main(flags) == str(cache)
    assert f"> dataset index ready in {cache}" in out.getvalue()
    built = _listing(cache)
    assert any(name.endswith("-shuffle_index.npy") for name in built), built
    cmd = python_command(os.path.join(ROOT, "pretrain_gpt_nitp.py"), 2)
    proc = subprocess.run(cmd + flags + ["--run-dir", str(tmp_path / "run")], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _listing(cache) == built


def _two_ranks(tmp: str) -> None:
    import time

    import torch

    from megatron_nitp.data import index_cache

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    os.environ["LOCAL_RANK"] = "0"  # each rank the first of its node
    shared = os.path.join(tmp, "shared")
    index_cache.check_shared(shared)
    print(f"rank {rank} shared: ok", flush=True)
    try:  # rank 1's node mounts something else at that path
        index_cache.check_shared(shared if rank == 0 else os.path.join(tmp, f"node{rank}"))
    except ValueError as err:
        print(f"rank {rank}: {err}", flush=True)
    assert os.listdir(shared) == []  # the token file is removed

    def build(seconds):
        """megatron-core's builder: rank 0 builds, everyone meets at a plain barrier."""
        if rank == 0:
            time.sleep(seconds)
        torch.distributed.barrier()

    index_cache.QUIET_WAIT_S = 0.5
    with index_cache.rank0_builds_first("CACHE", timeout_minutes=1):
        build(2)
    print(f"rank {rank} built after wait: ok", flush=True)
    try:
        with index_cache.rank0_builds_first("CACHE", timeout_minutes=1.5 / 60):
            build(4)
    except ValueError as err:
        if rank == 1:
            print(f"rank {rank}: {err}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import shutil
    import tempfile

    sys.path.insert(0, ROOT)
    # one folder for both ranks (named by the job's rendezvous port)
    folder = os.path.join(tempfile.gettempdir(), f"nitp-index-cache-{os.environ['MASTER_PORT']}")
    os.makedirs(folder, exist_ok=True)
    try:
        _two_ranks(folder)
    finally:
        if os.environ["RANK"] == "0":
            shutil.rmtree(folder, ignore_errors=True)
