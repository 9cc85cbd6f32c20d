"""Bytes NITP adds to pipeline communication, for a model and a parallel layout.

    python tools/nitp_comm_bytes.py --preset moe-9b-a1b --pipeline-model-parallel-size 4 \\
        --tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 1 --world-size 64

Prints where layer k lives, the bytes of layer-k targets sent to the last stage per micro-batch
and per step (per sending rank and for the whole job), the send buffers a sending rank holds at
once, and megatron-core's own pipeline traffic for scale. Nothing travels backward (the target
needs no gradient). ``--compare`` puts beside them the figures of full-width routing, where
every TP rank sends the whole ``[s/cp, b, h]`` z without sequence parallelism and keeps every
send buffer of the step until its end (what the routing did at first):

    python tools/nitp_comm_bytes.py --preset dense-3b --pipeline-model-parallel-size 2 \
        --tensor-model-parallel-size 2 --micro-batch-size 2 --compare
"""

import argparse
import json

import megatron_nitp  # noqa: F401

from megatron_nitp.cli import ArgumentParser
from megatron_nitp.layout import routed_bytes_per_step
from megatron_nitp.config.presets import PRESETS, get_preset


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _routed(config, num_micro, tp, pp, cp, dp, dtype_bytes):
    """``routed_bytes_per_step`` for a resolved run config."""
    m, p = config.model, config.parallel
    return routed_bytes_per_step(
        seq_length=m.seq_length, micro_batch_size=config.training.micro_batch_size,
        hidden_size=m.hidden_size, num_microbatches=num_micro,
        target_layer=config.nitp_config.target_layer, num_layers=m.num_layers,
        tensor_parallel=tp, pipeline_parallel=pp, data_parallel=dp, context_parallel=cp,
        sequence_parallel=p.sequence_parallel, dtype_bytes=dtype_bytes,
        first_stage_layers=p.decoder_first_pipeline_num_layers,
        last_stage_layers=p.decoder_last_pipeline_num_layers,
    )


def full_width_routing(args, result: dict, tp: int, cp: int, dtype_bytes: int) -> dict:
    """The same figures for full-width routing: each TP rank sends its whole
    ``[s/cp (/tp under SP), b, h]`` z, and holds every send buffer of the step until its end
    (M micro-batches)."""
    rows = args.seq_length // cp // (tp if args.sequence_parallel else 1)
    per_micro = rows * args.micro_batch_size * args.hidden_size * dtype_bytes
    per_micro *= result["routed"]
    micro, senders = result["num_microbatches"], result["senders"]
    return {"bytes_per_microbatch_per_rank": per_micro,
            "bytes_per_step_per_rank": per_micro * micro,
            "bytes_per_step_total": per_micro * micro * senders,
            "peak_bytes_held_per_rank": per_micro * micro}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-dense", help=", ".join(PRESETS))
    p.add_argument("--num-layers", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--nitp-target-layer", type=int)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--world-size", type=int, default=None, help="default: TP x PP x CP")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="uneven pipeline: layers on the first stage")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="uneven pipeline: layers on the last stage")
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--fp32", action="store_true", help="fp32 activations (default bf16)")
    p.add_argument("--compare", action="store_true",
                   help="also print the figures of full-width routing (every TP rank sends "
                        "its whole z and keeps the step's send buffers), for comparison")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from megatron_nitp.config import preset_config, resolve

    given = {k: v for k, v in vars(args).items() if v is not None and k not in (
        "preset", "world_size", "fp32", "json", "compare")}
    if "global_batch_size" not in given and "global_batch_size" not in get_preset(args.preset):
        given["global_batch_size"] = given["micro_batch_size"]
    try:
        config = preset_config(args.preset, **given, train_iters=1, lr_warmup_iters=0)
        layout = config.parallel
        tp, pp, cp = (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                      layout.context_parallel_size)
        config = resolve(config, args.world_size or tp * pp * cp)  # DP, micro-batches per step
        dp, num_micro = config.derived.data_parallel_size, config.derived.num_microbatches
        result = _routed(config, num_micro, tp, pp, cp, dp, 4 if args.fp32 else 2)
    except ValueError as err:  # ConfigError: an impossible layout or (uneven) pipeline split
        p.error(str(err))
    args = argparse.Namespace(preset=args.preset, json=args.json, compare=args.compare,
                              dtype_bytes=4 if args.fp32 else 2, **config.flat())
    result.update(preset=args.preset, layout=dict(TP=tp, PP=pp, CP=cp, DP=dp,
                                                  SP=args.sequence_parallel),
                  num_microbatches=num_micro, senders=tp * cp * dp)
    before = full_width_routing(args, result, tp, cp, args.dtype_bytes) if args.compare else None
    if before is not None:
        result["full_width_routing"] = before
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.preset}: layer k={args.nitp_target_layer} of {args.num_layers} is on pipeline "
          f"stage {result['owner_stage']} of {pp} (TP {tp}, PP {pp}, CP {cp}, DP {dp}, "
          f"SP {'on' if args.sequence_parallel else 'off'}; {num_micro} micro-batches per step)")
    if not result["routed"]:
        print("  the target is on the last stage: NITP adds no pipeline communication")
        return
    rows = [
        ("per micro-batch, per sending rank", "bytes_per_microbatch_per_rank"),
        ("per step, per sending rank", "bytes_per_step_per_rank"),
        ("per step, whole job", "bytes_per_step_total"),
        ("send buffers held at once, per sending rank (1F1B peak)", "peak_bytes_held_per_rank"),
        ("backward", "backward_bytes"),
        ("megatron-core pipeline traffic per step per rank (for scale)",
         "pipeline_bytes_per_step_per_rank"),
    ]
    if before is not None:
        print(f"  {'':<62} {'now':>12} {'full-width':>12}")
    for label, key in rows:
        line = f"  {label:<62} {_human(result[key]):>12}"
        if before is not None:
            line += f" {_human(before.get(key, result[key])):>12}"
        print(line)
    share = result["bytes_per_step_per_rank"] / max(1, result["pipeline_bytes_per_step_per_rank"])
    print(f"  NITP routing / pipeline traffic: {100 * share:.1f}%")


if __name__ == "__main__":
    main()
