"""Shared fixtures: one single-process gloo group for in-process tests, tiny model flags."""

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import megatron_nitp  # noqa: E402,F401  (registers CPU import stubs before megatron-core loads)


@pytest.fixture(scope="session")
def dist():
    """torch.distributed (gloo, world size 1) and megatron's parallel state, TP = PP = 1."""
    from megatron_nitp.training.initialize import initialize_distributed

    initialize_distributed(1, 1, 1)
    yield


def tiny_args(*extra):
    """The run config of a very small model (fast on CPU), resolved for one model replica
    (world TP x PP x CP) and a 128-token vocabulary."""
    from megatron_nitp.config import resolve
    from megatron_nitp.training.arguments import parse_args

    base = [
        "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
        "--lr-warmup-iters", "0", "--nitp-target-layer", "1",
    ]
    args = parse_args(base + list(extra))
    world = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
             * args.context_parallel_size)
    return resolve(args, world, 128)


def free_port() -> int:
    """A free loopback port for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment for a launched job: without the in-process tests' rendezvous variables
    (they would point the job at this process's store), one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def torchrun_file(path: str, nproc: int, timeout: int = 600):
    """Runs a test module as a script under torchrun with ``nproc`` processes (the module's
    ``__main__`` does the distributed part); fails the test with the job's output if it fails."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), os.path.abspath(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
