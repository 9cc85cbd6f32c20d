"""Runs a few training iterations under one parallel layout and writes what tests compare.

    python tests/parallel_harness.py OUT --save-init CKPT <flags>        # reference, 1 process
    torchrun --nproc-per-node N tests/parallel_harness.py OUT --load CKPT <flags>
    torchrun --nproc-per-node N tests/parallel_harness.py --runs RUNS.json   # several layouts

Writes ``OUT/metrics.json`` (per-iteration lm loss, nitp loss, grad norm) and
``OUT/projector.pt`` (the projector's full weights after the steps, gathered over TP). With
``--dump-init``, also ``OUT/init.pt``: every parameter's full initial value by checkpoint key
(the global tensor, prepended layer/expert axes included), assembled from all ranks.

``--runs RUNS.json`` (a list of ``[OUT, [flags...]]``) runs several layouts of the same world
size one after the other in one launch (megatron's parallel state is rebuilt between them): the
interpreter and megatron-core are imported once.
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


def gathered_initial_weights(model):
    """Full initial value of every parameter by checkpoint key, on rank 0 (None elsewhere).

    Each rank contributes the shards it owns (replica 0 only); rank 0 places them at their
    global offsets. Only for tiny test models: everything goes through one all_gather_object.
    """
    from megatron_nitp.models.initialization import _sharded_tensors
    from megatron_nitp.training.model import unwrap

    net = unwrap(model)
    storages = {p.untyped_storage().data_ptr() for p in net.parameters()}
    shards = []
    for sh_ten in _sharded_tensors(net.sharded_state_dict()):
        data = sh_ten.data
        if not isinstance(data, torch.Tensor) or data.untyped_storage().data_ptr() not in storages:
            continue
        replica = sh_ten.replica_id if isinstance(sh_ten.replica_id, tuple) else (sh_ten.replica_id,)
        if any(replica):
            continue
        shards.append((sh_ten.key, tuple(sh_ten.global_shape), tuple(sh_ten.global_offset),
                       sh_ten.prepend_axis_num, data.detach().float().cpu().clone()))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, shards)
    if dist.get_rank() != 0:
        return None
    full, filled = {}, {}
    for rank_shards in every:
        for key, shape, offset, axes, data in rank_shards:
            if key not in full:
                full[key] = torch.full(shape, float("nan"))
                filled[key] = 0
            data = data.reshape((1,) * axes + tuple(data.shape))
            region = tuple(slice(o, o + n) for o, n in zip(offset, data.shape))
            full[key][region] = data
            filled[key] += data.numel()
    for key, tensor in full.items():
        assert filled[key] == tensor.numel(), (key, filled[key], tensor.shape)
    return full


def run_layout(out, argv):
    """One layout: set-up (from scratch, ``--load`` or ``--save-init``), the steps, the files."""
    save_init = None
    if "--save-init" in argv:
        i = argv.index("--save-init")
        save_init = argv[i + 1]
        del argv[i:i + 2]
    dump_init = "--dump-init" in argv
    if dump_init:
        argv.remove("--dump-init")
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
    os.makedirs(out, exist_ok=True)
    if dump_init:
        initial = gathered_initial_weights(run.model)
        if dist.get_rank() == 0:
            torch.save(initial, os.path.join(out, "init.pt"))
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
    if dist.get_rank() == 0:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(history, f)
    if parallel_state.is_pipeline_last_stage():
        weights = gathered_projector(run.model)
        if (parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0):
            torch.save(weights, os.path.join(out, "projector.pt"))
    dist.barrier()


def reset_between_runs():
    """Drops megatron's parallel state and our routing group (the process group stays)."""
    import gc

    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    from megatron_nitp.nitp.routing import reset_routing_group

    dist.barrier()
    parallel_state.destroy_model_parallel()
    reset_routing_group()
    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    gc.collect()


def main():
    if sys.argv[1] == "--runs":
        with open(sys.argv[2]) as f:
            runs = json.load(f)
    else:
        runs = [(sys.argv[1], sys.argv[2:])]
    for index, (out, argv) in enumerate(runs):
        if index:
            reset_between_runs()
        run_layout(out, list(argv))
    from megatron_nitp.training.initialize import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
