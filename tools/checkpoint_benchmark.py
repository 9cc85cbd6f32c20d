"""Checkpoint save and load per rank as data parallelism grows: the time, the bytes each rank
checksums at save and verifies at load, and what it reads in all (``rchar``).

    python tools/checkpoint_benchmark.py                    # DP = 1, 2, 4 on CPU (gloo)
    python tools/checkpoint_benchmark.py --dp 1 2 --hidden-size 512 --json-out ckpt.json
    python tools/checkpoint_benchmark.py --distributed-optimizer   # both optimizer formats

With ``--distributed-optimizer`` each DP size runs once per optimizer format (``--format``:
megatron-core's dp_reshardable, the default save, and fully_reshardable,
``--dist-ckpt-optim-fully-reshardable``) and the table adds the optimizer state a rank holds in
host memory for the save and for the load (the distinct tensors of its optimizer sharded state
dict: its own shard, or its data-parallel group's whole state gathered) beside
``accounting.checkpoint.checkpoint_host_memory``'s figures for the same run (weights
included), and what ``dist_checkpointing.load`` read (``ckpt read``: ``rchar`` less the
verification's bytes).

Each DP size is one ``torchrun`` job that builds a real run (``training.loop.setup``), trains
one step (so the optimizer has state), saves synchronously, saves again with ``--async-save``
(the time training is held is the scheduling, the rest is in the background) and loads the
first checkpoint back. The figures per rank are the maximum over the ranks. ``legacy rank-0
read`` is what the earlier scheme cost: rank 0 re-read the whole checkpoint to checksum it, and
every rank re-read it at load to verify it. Why it matters: those reads grow with the
checkpoint (and so with the number of ranks writing it); the per-rank checksums and the shared
verification keep each rank's part at or below its own share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4],
                   help="data-parallel sizes (one torchrun job each)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="shard the optimizer state over DP (--use-distributed-optimizer)")
    p.add_argument("--format", nargs="+", choices=["dp_reshardable", "fully_reshardable"],
                   default=["dp_reshardable", "fully_reshardable"],
                   help="optimizer formats to measure (with --distributed-optimizer)")
    p.add_argument("--json-out", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    return p


def _rchar() -> int:
    """Bytes this process has read through read() so far (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))
    except (OSError, StopIteration):
        return 0


def _tensor_bytes(tree) -> int:
    """Bytes of the distinct tensors in a (sharded) state dict: views of one buffer count once
    (ShardedTensor and ShardedTensorFactory, e.g. the SwiGLU fc1 weight's, hold theirs in
    ``.data``)."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    seen, total = set(), 0
    for leaf in nested_values(tree):
        tensor = getattr(leaf, "data", leaf)
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def worker(args) -> None:
    import torch

    from megatron_nitp.config import preset_config, validate
    from megatron_nitp.training import checkpoint as ck
    from megatron_nitp.training import loop
    from megatron_nitp.training.checkpoint.state import sharded_state
    from megatron_nitp.training.step import train_step

    world = int(os.environ["WORLD_SIZE"])
    d = args.hidden_size
    cfg = preset_config(
        "tiny-dense", "dense", num_layers=args.num_layers, hidden_size=d, ffn_hidden_size=2 * d,
        num_attention_heads=4, num_query_groups=2, seq_length=32, micro_batch_size=1,
        global_batch_size=world, train_iters=10, lr_warmup_iters=0, eval_interval=0,
        geometry_interval=0, save_final=False, plot=False, progress_bar=False,
        nitp_target_layer=1, use_distributed_optimizer=args.distributed_optimizer,
        dist_ckpt_optim_fully_reshardable=args.format == ["fully_reshardable"])
    validate(cfg)
    run = loop.setup(cfg)
    train_step(run.model, run.optimizer, run.scheduler, run.train_iter, run.args, 0, False)
    root = os.path.join(args.worker, "ckpt")
    out = {}

    def reset():
        for key in ck.STATS:
            ck.STATS[key] = 0
        torch.distributed.barrier()
        return time.perf_counter(), _rchar()

    t0, r0 = reset()
    ck.save_checkpoint(root, 1, run.model, run.optimizer, run.scheduler, run.args)
    out.update(save_s=time.perf_counter() - t0, save_read=_rchar() - r0,
               save_checksummed=ck.STATS["save_checksum_bytes"],
               written=ck.STATS["written_bytes"])
    saves = ck.AsyncSaves()
    t0, _ = reset()
    ck.save_checkpoint(root, 2, run.model, run.optimizer, run.scheduler, run.args,
                       async_saves=saves)
    out["async_held_s"] = time.perf_counter() - t0
    saves.wait()
    out["async_total_s"] = time.perf_counter() - t0
    with open(os.path.join(root, ck.TRACKER), "w") as f:
        f.write("1")
    torch.distributed.barrier()
    t0, r0 = reset()
    ck.load_checkpoint(root, run.model, run.optimizer, run.scheduler, run.args)
    out.update(load_s=time.perf_counter() - t0, load_read=_rchar() - r0,
               load_verified=ck.STATS["load_verify_bytes"])
    fmt = ck.optimizer_format(run.args, run.optimizer)
    for key, loading in (("opt_save_bytes", False), ("opt_load_bytes", True)):
        state = sharded_state(run.model, run.optimizer, is_loading=loading, fmt=fmt)
        out[key] = _tensor_bytes(state["optimizer"])
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, out)
    if torch.distributed.get_rank() == 0:
        manifest = json.load(open(os.path.join(ck.checkpoint_dir(root, 1), ck.MANIFEST)))
        total = sum(e["bytes"] for e in manifest.values())
        row = {key: max(r[key] for r in everyone) for key in out}
        from megatron_nitp.accounting.checkpoint import checkpoint_bytes, checkpoint_host_memory

        row.update(dp=world, checkpoint_bytes=total, files=len(manifest), format=fmt,
                   planned_bytes=checkpoint_bytes(run.args),
                   planned=checkpoint_host_memory(run.args))
        print("BENCH " + json.dumps(row), flush=True)


def run_dp(args, dp: int, folder: str, fmt: str = "dp_reshardable") -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(dp),
           "--master-port", str(_free_port()), os.path.abspath(__file__), "--worker", folder,
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--format", fmt]
    if args.distributed_optimizer:
        cmd.append("--distributed-optimizer")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode or not rows:
        raise SystemExit(f"DP {dp} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(rows[-1][len("BENCH "):])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return []
    rows = []
    for fmt in (args.format if args.distributed_optimizer else ["dp_reshardable"]):
        for dp in args.dp:
            with tempfile.TemporaryDirectory(prefix=f"ckpt-bench-dp{dp}-") as folder:
                rows.append(run_dp(args, dp, folder, fmt))
    kib = 1024
    print(f"checkpoint save/load per rank (max over ranks), CPU/gloo, {args.num_layers} layers, "
          f"d={args.hidden_size}{', distributed optimizer' if args.distributed_optimizer else ''}"
          " (KiB; s)")
    header = ("format", "DP", "ckpt KiB", "planned", "written", "checksummed", "save s",
              "async held s", "async total s", "verified", "load read", "ckpt read", "load s",
              "legacy rank-0", "opt at save", "opt at load", "plan save", "plan load")
    print("  ".join(f"{h:>13}" for h in header))
    for r in rows:
        print("  ".join(f"{v:>13}" for v in (
            r["format"], r["dp"], f"{r['checkpoint_bytes'] / kib:.0f}",
            f"{r['planned_bytes'] / kib:.0f}", f"{r['written'] / kib:.0f}",
            f"{r['save_checksummed'] / kib:.0f}", f"{r['save_s']:.2f}",
            f"{r['async_held_s']:.2f}", f"{r['async_total_s']:.2f}",
            f"{r['load_verified'] / kib:.0f}", f"{r['load_read'] / kib:.0f}",
            f"{(r['load_read'] - r['load_verified']) / kib:.0f}", f"{r['load_s']:.2f}", f"{r['checkpoint_bytes'] / kib:.0f}",
            f"{r['opt_save_bytes'] / kib:.0f}", f"{r['opt_load_bytes'] / kib:.0f}",
            f"{r['planned']['save'] / kib:.0f}", f"{r['planned']['load'] / kib:.0f}")))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    try:
        main()
    finally:  # the runs' process group (NCCL warns at exit about one left alive)
        from megatron_nitp.training.initialize import destroy_distributed

        destroy_distributed()
