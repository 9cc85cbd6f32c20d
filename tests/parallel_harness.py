"""Runs a few training iterations under one parallel layout and writes what tests compare.

    python tests/parallel_harness.py OUT --save-init CKPT <flags>        # reference, 1 process
    torchrun --nproc-per-node N tests/parallel_harness.py OUT --load CKPT <flags>
    torchrun --nproc-per-node N tests/parallel_harness.py --runs RUNS.json   # several layouts

Writes ``OUT/metrics.json`` (per-iteration lm loss, nitp loss, grad norm, ..., the layer-k
bytes routed per step and the most routing send-buffer bytes any rank held at once),
``OUT/projector.pt`` (the projector's full weights, gathered over TP) and, last, ``OUT/state.pt``
(the whole checkpoint state after the steps as full global tensors by key: every model tensor,
backbone and projector, and the optimizer's per-parameter state; plus, per key, the largest
difference of any replicated copy from the saved one). With ``--dump-init``, also ``OUT/init.pt``:
every parameter's full initial value by checkpoint key, assembled from all ranks.

``--evaluate-at K`` calls evaluate() (``--eval-iters`` batches of the validation data) after
step K, then the per-layer geometry probe (``training/probe.py``), and writes ``OUT/eval.json``:
their metrics, the layer-k bytes each routed, and whatever they changed on any rank (weights,
gradients, optimizer, scheduler, data position, RNG, train mode).

``--runs RUNS.json`` (a list of ``[OUT, [flags...]]``) runs several layouts of the same world
size one after the other in one launch (megatron's parallel state is rebuilt between them): the
interpreter and megatron-core are imported once.
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_nitp  # noqa: E402,F401
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_nitp.device import device  # noqa: E402


def gathered_projector(model):
    """Full projector weights on the last stage (gate/up split on dim 0, down on dim 1)."""
    from megatron.core import parallel_state

    from megatron_nitp.training.model import last_chunk

    projector = last_chunk(model).projector
    if projector is None:  # --no-nitp: nothing to gather
        return {}
    group = parallel_state.get_tensor_model_parallel_group()
    full = {}
    for name, dim in (("gate", 0), ("up", 0), ("down", 1)):
        weight = getattr(projector, name).weight.detach().float()
        parts = [torch.empty_like(weight) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, weight.contiguous(), group=group)
        full[name] = torch.cat(parts, dim=dim)
    return full


def _assemble(sharded_tensors, name_of=lambda key: key):
    """``(full, replica differences)`` on rank 0, ``(None, None)`` elsewhere: full global
    tensors by (normalized) key, assembled from every rank's shards.

    Replica 0 of each shard is placed at its global offset (prepended layer/expert axes
    included); every tensor must come out fully covered. The other replicas (DP copies, TP
    copies of replicated weights, the last stage's tied output layer) are compared with what
    was placed: ``replica differences`` maps each key to the largest absolute difference of any
    copy, so a test can see that the copies agree. Only for tiny test models: everything goes
    through one all_gather_object.
    """
    shards = []
    for sh_ten in sharded_tensors:
        if getattr(sh_ten, "flattened_range", None) is not None:
            raise ValueError(f"{sh_ten.key}: flattened shards are not assembled here")
        replica = sh_ten.replica_id if isinstance(sh_ten.replica_id, tuple) else (sh_ten.replica_id,)
        shards.append((name_of(sh_ten.key), tuple(sh_ten.global_shape),
                       tuple(sh_ten.global_offset), sh_ten.prepend_axis_num, any(replica),
                       sh_ten.data.detach().float().cpu().clone()))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, shards)
    if dist.get_rank() != 0:
        return None, None
    full, filled, copies = {}, {}, []
    for rank_shards in every:
        for key, shape, offset, axes, is_copy, data in rank_shards:
            data = data.reshape((1,) * axes + tuple(data.shape))
            region = tuple(slice(o, o + n) for o, n in zip(offset, data.shape))
            if is_copy:
                copies.append((key, region, data))
                continue
            if key not in full:
                full[key] = torch.full(shape, float("nan"))
                filled[key] = 0
            full[key][region] = data
            filled[key] += data.numel()
    for key, tensor in full.items():
        assert filled[key] == tensor.numel(), (key, filled[key], tensor.shape)
    differences = {}
    for key, region, data in copies:
        diff = (full[key][region] - data).abs().max().item() if data.numel() else 0.0
        differences[key] = max(differences.get(key, 0.0), diff)
    return full, differences


def _tensor_shards(tree):
    """The ShardedTensors of a sharded state dict that hold a tensor (factories built)."""
    from megatron_nitp.models.initialization import _sharded_tensors

    return [sh for sh in _sharded_tensors(tree) if isinstance(sh.data, torch.Tensor)]


def gathered_initial_weights(model):
    """Full initial value of every parameter by checkpoint key, on rank 0 (None elsewhere)."""
    from megatron_nitp.training.model import as_chunks, unwrap

    shards = []
    for chunk in as_chunks(model):
        net = unwrap(chunk)
        storages = {p.untyped_storage().data_ptr() for p in net.parameters()}
        shards += [sh for sh in _tensor_shards(net.sharded_state_dict())
                   if sh.data.untyped_storage().data_ptr() in storages]
    return _assemble(shards)[0]


def _state_key(key):
    """Checkpoint key without the ``chained_N.`` prefix that megatron-core's ChainedOptimizer
    (dense and expert parameters, or several model chunks) gives the optimizer's tensors: N
    numbers the sub-optimizers, which differ between layouts, not the tensor."""
    return re.sub(r"^chained_\d+\.", "", key)


def gathered_state(model, optimizer):
    """The whole checkpoint state, as full global tensors by key, on rank 0 (None elsewhere).

    Exactly what ``save_checkpoint`` writes (``checkpoint.state.sharded_state``): every model
    tensor (backbone, projector, buffers) and the optimizer's per-parameter state,
    ``optimizer.state.exp_avg.K`` and ``optimizer.state.exp_avg_sq.K`` for model key K (and with
    the distributed optimizer ``optimizer.state.param.K``, its fp32 main parameters), whatever
    the layout or optimizer.
    """
    from megatron_nitp.training.checkpoint.state import sharded_state

    state = sharded_state(model, optimizer, is_loading=False)
    full, differences = _assemble(_tensor_shards(state), _state_key)
    if full is None:
        return None
    return {"tensors": full, "replica differences": differences}


def _local_snapshot(run):
    """Everything of this rank that evaluate() must leave alone, copied: weights, gradients,
    optimizer state and hyper-parameters, LR scheduler, train-data position, RNG states, and
    the modules' train/eval modes."""
    import copy
    import random

    from megatron.core import tensor_parallel

    from megatron_nitp.training.model import as_chunks

    chunks = as_chunks(run.model)
    snap = {f"param {i} {name}": p.detach().clone() for i, chunk in enumerate(chunks)
            for name, p in chunk.named_parameters()}
    buffers = [b for chunk in chunks
               for b in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", []))]
    for i, buffer in enumerate(buffers):
        snap[f"grad buffer {i}"] = buffer.grad_data.clone()
    for i, sub in enumerate(getattr(run.optimizer, "chained_optimizers", [run.optimizer])):
        inner = sub.optimizer
        for j, param in enumerate(p for group in inner.param_groups for p in group["params"]):
            for name, value in inner.state.get(param, {}).items():
                snap[f"optimizer {i} param {j} {name}"] = (
                    value.clone() if isinstance(value, torch.Tensor) else value)
        snap[f"optimizer {i} groups"] = copy.deepcopy(
            [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups])
    snap["scheduler"] = copy.deepcopy(run.scheduler.state_dict())
    snap["consumed samples"] = run.train_iter.consumed_samples
    snap["python rng"] = random.getstate()
    snap["numpy rng"] = np.random.get_state()
    snap["torch rng"] = torch.get_rng_state()
    snap["tracker rng"] = {k: v.clone() for k, v in
                           tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    snap["training modes"] = [m.training for chunk in chunks for m in chunk.modules()]
    return snap


def _same(a, b):
    """Bitwise equality of two snapshot entries (tensors, containers, NumPy arrays, scalars)."""
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def evaluate_without_side_effects(run, args):
    """evaluate() between two training steps: its metrics, the layer-k target bytes it routed
    between pipeline stages (all ranks), and what it changed (should be nothing) on any rank."""
    from megatron_nitp.training.model import params_synced
    from megatron_nitp.training.probe import Probe
    from megatron_nitp.training.step import evaluate

    # As the training loop does: with --overlap-param-gather the updated parameters are
    # all-gathered first (hooks off), so the snapshot is taken with them.
    with params_synced(run.model):
        before = _local_snapshot(run)
        routed = _routed(run.model, "routed_bytes")
        metrics = evaluate(run.model, run.valid_iter(), args, args.logging.eval_iters)
        routed = torch.tensor([_routed(run.model, "routed_bytes") - routed],
                              dtype=torch.float64, device=device())
        # the per-layer geometry probe (training/probe.py) on the validation data's first batch
        probe_routed = _routed(run.model, "routed_bytes")
        probe = Probe.build(args, run.train_iter, run.valid_iter)
        values, cosines = probe.measure(run.model, args)
        probe_routed = torch.tensor([_routed(run.model, "routed_bytes") - probe_routed],
                                    dtype=torch.float64, device=device())
        after = _local_snapshot(run)
    changed = [name for name in before if not _same(before[name], after[name])]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, changed)
    dist.all_reduce(routed)
    dist.all_reduce(probe_routed)
    return {"metrics": metrics, "routed bytes": routed.item(),
            "probe": values, "probe cosines": cosines.tolist() if cosines is not None else None,
            "probe routed bytes": probe_routed.item(),
            "changed": sorted({f"rank {r}: {name}" for r, names in enumerate(every)
                               for name in names})}


def _routed(model, what):
    """This rank's ``routed_bytes`` / ``routed_peak_bytes_held``, summed over its chunks."""
    from megatron_nitp.training.model import as_chunks, unwrap

    return sum(getattr(unwrap(chunk), what) for chunk in as_chunks(model))


def _pop_option(argv, flag):
    """The value of ``flag VALUE`` in argv, removed from it (None if absent)."""
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


def run_layout(out, argv):
    """One layout: set-up (from scratch, ``--load`` or ``--save-init``), the steps (with
    ``--evaluate-at K``, an evaluate() call after step K), the files."""
    save_init = _pop_option(argv, "--save-init")
    # --save-final DIR: a checkpoint after the steps; --resume: --load resumes (optimizer and
    # all) instead of taking the weights only, and no step is run (the state as loaded)
    save_final = _pop_option(argv, "--save-final")
    resume = "--resume" in argv
    if resume:
        argv.remove("--resume")
    evaluate_at = _pop_option(argv, "--evaluate-at")
    dump_init = "--dump-init" in argv
    if dump_init:
        argv.remove("--dump-init")
    from megatron.core import parallel_state

    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.checkpoint import save_checkpoint
    from megatron_nitp.training.loop import setup
    from megatron_nitp.training.model import params_synced
    from megatron_nitp.training.step import train_step

    if "--load" in argv and "--finetune" not in argv and not resume:
        argv.append("--finetune")  # the initial checkpoint: weights only, no optimizer state yet
    model_type = "moe" if "--num-experts" in argv or "--preset" in argv else "dense"
    # A non-zero eval interval only makes setup() build the validation data (run.valid_iter);
    # the steps below are called directly, so it never triggers an evaluation by itself.
    args = parse_args(argv + ["--eval-interval", "0" if evaluate_at is None else "1",
                              "--no-progress-bar"], model_type)
    run = setup(args)
    args = run.args  # resolved for this world: micro-batches per step, padded vocabulary
    os.makedirs(out, exist_ok=True)
    if dump_init:
        initial = gathered_initial_weights(run.model)
        if dist.get_rank() == 0:
            torch.save(initial, os.path.join(out, "init.pt"))
    if save_init:
        save_checkpoint(save_init, 0, run.model, run.optimizer, run.scheduler, args)
    history = []
    evaluation = None
    for iteration in range(0 if resume else args.training.train_iters):
        metrics = train_step(run.model, run.optimizer, run.scheduler, run.train_iter, args,
                             iteration, geometry=True)
        # the most layer-k send-buffer bytes any rank held at once during this step
        held = torch.tensor([_routed(run.model, "routed_peak_bytes_held")], dtype=torch.float64,
                            device=device())
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        metrics["routing peak bytes held"] = held.item()
        history.append(metrics)
        if evaluate_at is not None and iteration + 1 == int(evaluate_at):
            evaluation = evaluate_without_side_effects(run, args)
    routed = torch.tensor([_routed(run.model, "routed_bytes")], dtype=torch.float64,
                          device=device())
    dist.all_reduce(routed)
    training_bytes = routed.item() - (evaluation["routed bytes"] + evaluation["probe routed bytes"]
                                      if evaluation else 0.0)
    for metrics in history:
        metrics["routed bytes per step"] = training_bytes / args.training.train_iters
    if save_final:
        save_checkpoint(save_final, run.start_iteration + len(history), run.model,
                        run.optimizer, run.scheduler, args,
                        consumed_samples=run.train_iter.consumed_samples)
    with params_synced(run.model):
        state = gathered_state(run.model, run.optimizer)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(history, f)
        if evaluation is not None:
            with open(os.path.join(out, "eval.json"), "w") as f:
                json.dump(evaluation, f)
    if parallel_state.is_pipeline_last_stage():
        weights = gathered_projector(run.model)
        if (parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0):
            torch.save(weights, os.path.join(out, "projector.pt"))
    dist.barrier()
    if dist.get_rank() == 0:  # last: its presence says the run finished (tests/parallel_runs.py)
        torch.save(state, os.path.join(out, "state.pt"))


def reset_between_runs():
    """Drops megatron's parallel state and our routing group (the process group stays)."""
    import gc

    from megatron.core import parallel_state

    from megatron_nitp.nitp.routing import reset_routing_group
    from megatron_nitp.training.model import clear_moe_tracker

    dist.barrier()
    parallel_state.destroy_model_parallel()
    reset_routing_group()
    clear_moe_tracker()
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
