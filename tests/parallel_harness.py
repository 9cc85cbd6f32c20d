"""Runs a few training iterations under one parallel layout and writes what tests compare.

    python tests/parallel_harness.py OUT --save-init CKPT <flags>        # reference, 1 process
    torchrun --nproc-per-node N tests/parallel_harness.py OUT --load CKPT <flags>

Writes ``OUT/metrics.json`` (per-iteration lm loss, nitp loss, grad norm) and
``OUT/projector.pt`` (the projector's full weights after the steps, gathered over TP).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_nitp  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def gathered_projector(model):
    """Full projector weights on the last stage (gate/up split on dim 0, down on dim 1)."""
    from megatron.core import parallel_state

    from megatron_nitp.training.model import unwrap

    projector = unwrap(model).projector
    group = parallel_state.get_tensor_model_parallel_group()
    full = {}
    for name, dim in (("gate", 0), ("up", 0), ("down", 1)):
        weight = getattr(projector, name).weight.detach().float()
        parts = [torch.empty_like(weight) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, weight.contiguous(), group=group)
        full[name] = torch.cat(parts, dim=dim)
    return full


def main():
    out = sys.argv[1]
    argv = sys.argv[2:]
    save_init = None
    if "--save-init" in argv:
        i = argv.index("--save-init")
        save_init = argv[i + 1]
        del argv[i:i + 2]
    from megatron.core import parallel_state

    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.checkpointing import save_checkpoint
    from megatron_nitp.training.loop import setup
    from megatron_nitp.training.step import train_step

    if "--load" in argv and "--finetune" not in argv:
        argv.append("--finetune")  # the initial checkpoint: weights only, no optimizer state yet
    model_type = "moe" if "--num-experts" in argv or "--preset" in argv else "dense"
    args = parse_args(argv + ["--eval-interval", "0", "--no-progress-bar"], model_type)
    run = setup(args)
    if save_init:
        save_checkpoint(save_init, 0, run.model, run.optimizer, run.scheduler, args)
    history = []
    for iteration in range(args.train_iters):
        metrics = train_step(run.model, run.optimizer, run.scheduler, run.train_iter, args,
                             iteration, geometry=True)
        history.append(metrics)
    from megatron_nitp.training.model import unwrap

    routed = torch.tensor([unwrap(run.model).routed_bytes], dtype=torch.float64)
    dist.all_reduce(routed)
    for metrics in history:
        metrics["routed bytes per step"] = routed.item() / args.train_iters
    os.makedirs(out, exist_ok=True)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(history, f)
    if parallel_state.is_pipeline_last_stage():
        weights = gathered_projector(run.model)
        if (parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0):
            torch.save(weights, os.path.join(out, "projector.pt"))
    dist.barrier()
    from megatron_nitp.training.initialize import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
