"""Probe the collectives a job needs before any training: send/recv between every pair of
neighbours, all-reduce and all-gather over all ranks, each checked against the value it must
give, each under a timeout.

    torchrun --nproc-per-node 2 tools/nccl_probe.py
    MEGATRON_NITP_SHARED_GPU=1 torchrun --nproc-per-node 2 tools/nccl_probe.py   # one GPU

NCCL on GPUs (each rank on its own GPU, or sharing one under $MEGATRON_NITP_SHARED_GPU with the
NCCL settings ``megatron_nitp.device.bind`` gives it), gloo on CPU. Exit 0 and one line per
check on rank 0; a failure names the check.
"""

import datetime
import os
import sys

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)


def main() -> None:
    if "-h" in sys.argv or "--help" in sys.argv:
        print("usage: torchrun --nproc-per-node N tools/nccl_probe.py\n\n" + __doc__.strip())
        return
    import torch

    from megatron_nitp import device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device.bind(local_rank)
    backend = "nccl" if device.has_cuda() else "gloo"
    kwargs = {"timeout": datetime.timedelta(minutes=2)}
    if backend == "nccl":
        kwargs["device_id"] = device.device()
    torch.distributed.init_process_group(backend, **kwargs)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    here = device.device()

    def report(check: str) -> None:
        if rank == 0:
            print(f"> {check}: ok", flush=True)

    if rank == 0:
        version = ".".join(map(str, device.nccl_version())) or "-"
        print(f"> {world} ranks, {backend} (NCCL {version}), rank 0 on {device.name()}"
              + (" (GPU shared by the ranks)" if device.shared_gpu() else ""), flush=True)
    payload = torch.full((1 << 20,), float(rank), device=here)  # 4 MiB: past NCCL's eager size
    if world > 1:
        if rank % 2 == 0 and rank + 1 < world:
            torch.distributed.send(payload, rank + 1)
        elif rank % 2 == 1:
            got = torch.empty_like(payload)
            torch.distributed.recv(got, rank - 1)
            assert torch.all(got == rank - 1), "send/recv: wrong values"
        torch.distributed.barrier()
        report("send/recv")
    total = payload.clone()
    torch.distributed.all_reduce(total)
    assert torch.all(total == sum(range(world))), "all-reduce: wrong sum"
    report("all-reduce")
    gathered = torch.empty(world * payload.numel(), device=here)
    torch.distributed.all_gather_into_tensor(gathered, payload)
    expected = torch.arange(world, dtype=gathered.dtype, device=here)
    assert torch.equal(gathered.view(world, -1)[:, 0], expected), "all-gather: wrong order"
    report("all-gather")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
