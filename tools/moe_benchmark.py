"""MoE step time with and without megatron-core's fast expert paths, NTP and NITP: step time,
tokens/s, model TFLOP/s (NITP's FLOPs counted) and MFU.

    python tools/moe_benchmark.py                       # GPU: grouped GEMM vs the expert loop
    python tools/moe_benchmark.py --preset moe-1.9b-a0.3b --num-layers 4 --seq-length 4096
    python tools/moe_benchmark.py --variants loop --preset tiny-moe   # CPU: the loop only

Variants: ``loop`` (SequentialMLP: a rank's experts one after the other), ``grouped``
(``--moe-grouped-gemm``: TE's TEGroupedMLP), ``grouped+permute`` (plus
``--moe-permute-fusion``). The grouped variants need Transformer Engine on a GPU; elsewhere
they are reported as refused, with the reason. One process (EP 1): the expert computation
itself, not the all-to-all. Every arm is built by ``training.loop.setup`` with the same seed and
trains the same batches: ``--warmup-iters`` untimed steps, then ``--measure-iters`` timed ones
(the median is reported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

VARIANTS = {
    "loop": {},
    "grouped": dict(moe_grouped_gemm=True),
    "grouped+permute": dict(moe_grouped_gemm=True, moe_permute_fusion=True),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="moe-1.9b-a0.3b", help="a MoE preset (its shape)")
    p.add_argument("--num-layers", type=int, default=4, help="layers (the preset's pattern "
                   "keeps its dense first layer)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--warmup-iters", type=int, default=3)
    p.add_argument("--measure-iters", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--json-out", metavar="FILE", help="also write the figures to FILE as JSON")
    return p


def config(args, variant: str, nitp: bool):
    from megatron_nitp.config import preset_config
    from megatron_nitp.device import has_cuda

    return preset_config(
        args.preset, "moe", num_layers=args.num_layers,
        moe_layer_freq=f"[0]*1+[1]*{args.num_layers - 1}", seq_length=args.seq_length,
        max_position_embeddings=args.seq_length, nitp_target_layer=1,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size,
        train_iters=100000, lr_warmup_iters=0, eval_interval=0, geometry_interval=0,
        save_final=False, plot=False, progress_bar=False, bf16=has_cuda(), nitp=nitp,
        **VARIANTS[variant])


def measure_arm(args, variant: str, nitp: bool) -> dict:
    from megatron_nitp.config import ConfigError, validate
    from megatron_nitp.device import synchronize
    from megatron_nitp.training import loop
    from megatron_nitp.training.logger import peak_tflops, training_flops_per_token
    from megatron_nitp.training.step import train_step

    cfg = config(args, variant, nitp)
    try:
        validate(cfg)
    except ConfigError as err:
        return {"refused": str(err)}
    run = loop.setup(cfg)
    times = []
    for i in range(args.warmup_iters + args.measure_iters):
        synchronize()
        start = time.perf_counter()
        train_step(run.model, run.optimizer, run.scheduler, run.train_iter, run.args, i, False)
        synchronize()
        if i >= args.warmup_iters:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = args.seq_length * args.micro_batch_size
    tflops = training_flops_per_token(run.args) * tokens / seconds / 1e12
    peak = peak_tflops(run.args.logging)
    return dict(step_seconds=seconds, tokens_per_second=tokens / seconds, tflops=tflops,
                mfu=tflops / peak if peak else None)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron_nitp.device import name

    arms = {f"{variant}/{objective}": measure_arm(args, variant, objective == "nitp")
            for variant in args.variants for objective in ("ntp", "nitp")}
    report = dict(device=name(), preset=args.preset, num_layers=args.num_layers,
                  seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, arms=arms)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"MoE step time on {report['device']}: {args.preset} shape, {args.num_layers} layers, "
          f"s={args.seq_length}, micro-batch {args.micro_batch_size}, one process (median of "
          f"{args.measure_iters} steps)")
    header = ("experts", "objective", "step s", "tokens/s", "TFLOP/s", "MFU")
    print("  ".join(f"{h:>16}" for h in header))
    for key, r in arms.items():
        variant, objective = key.split("/")
        if "refused" in r:
            print(f"{variant:>16}  {objective:>16}  refused: {r['refused']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print("  ".join(f"{v:>16}" for v in (variant, objective, f"{r['step_seconds']:.4f}",
                                              f"{r['tokens_per_second']:.0f}",
                                              f"{r['tflops']:.2f}", mfu)))
    loop = arms.get("loop/ntp")
    for key, r in arms.items():
        if loop and "refused" not in r and "refused" not in loop and not key.startswith("loop"):
            print(f"{key}: {loop['step_seconds'] / r['step_seconds']:.2f}x the expert loop's speed")
    for variant in args.variants:
        ntp, nitp = arms[f"{variant}/ntp"], arms[f"{variant}/nitp"]
        if "refused" not in ntp and "refused" not in nitp:
            print(f"{variant}: NITP step time {100 * (nitp['step_seconds'] / ntp['step_seconds'] - 1):+.1f}% "
                  "vs NTP")
    return report


if __name__ == "__main__":
    main()
