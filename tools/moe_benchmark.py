"""MoE step time with and without megatron-core's fast expert paths, NTP and NITP: step time,
tokens/s, model TFLOP/s (NITP's FLOPs counted) and MFU.

    python tools/moe_benchmark.py                       # GPU: grouped GEMM vs the expert loop
    python tools/moe_benchmark.py --preset moe-1.9b-a0.3b --num-layers 4 --seq-length 4096
    python tools/moe_benchmark.py --variants loop --preset tiny-moe   # CPU: the loop only

Variants: ``loop`` (SequentialMLP: a rank's experts one after the other), ``grouped``
(``--moe-grouped-gemm``: TE's TEGroupedMLP), ``grouped+permute`` (plus
``--moe-permute-fusion``). The grouped variants need Transformer Engine on a GPU; elsewhere
they are reported as refused, with the reason. One process (EP 1): the expert computation
itself, not the all-to-all. A variant's NTP and NITP arms are built side by side by
``training.loop.setup`` with the same seed and train the same batches, their steps interleaved
(A B A B ..., as ``tools/flops_overhead.py --measure`` does, so that a drift in the machine hits
both: measured one after the other, the second arm came out 25% slower on an H200 and the first
2x slower on a CPU): ``--warmup-iters`` untimed steps, then ``--measure-iters`` timed ones. The
median per arm is reported, and NITP's overhead as the median of the paired step ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics

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


def measure_variant(args, variant: str) -> dict:
    """The NTP and NITP arms of one variant, steps interleaved: ``{"ntp": figures, "nitp":
    figures}`` (each ``{"refused": reason}`` where the flags cannot run here); NITP's figures
    carry ``overhead_paired``, the median of its step time over NTP's of the same iteration."""
    from megatron_nitp.config import ConfigError, validate
    from megatron_nitp.training.arms import build_arm, timed_step
    from megatron_nitp.training.logger import peak_tflops, training_flops_per_token

    cfg = config(args, variant, nitp=True)
    try:
        validate(cfg)
    except ConfigError as err:
        return {"ntp": {"refused": str(err)}, "nitp": {"refused": str(err)}}
    runs = {arm: build_arm(arm, cfg) for arm in ("ntp", "nitp")}
    times = {arm: [] for arm in runs}
    for i in range(args.warmup_iters + args.measure_iters):
        for arm, run in runs.items():
            seconds = timed_step(run, i)
            if i >= args.warmup_iters:
                times[arm].append(seconds)
    tokens = args.seq_length * args.micro_batch_size
    result = {}
    for arm, run in runs.items():
        seconds = statistics.median(times[arm])
        tflops = training_flops_per_token(run.args) * tokens / seconds / 1e12
        peak = peak_tflops(run.args.logging)
        result[arm] = dict(step_seconds=seconds, seconds=times[arm],
                           tokens_per_second=tokens / seconds, tflops=tflops,
                           mfu=tflops / peak if peak else None)
    result["nitp"]["overhead_paired"] = statistics.median(
        b / a - 1 for a, b in zip(times["ntp"], times["nitp"]))
    return result


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron_nitp.device import name

    arms = {f"{variant}/{objective}": figures for variant in args.variants
            for objective, figures in measure_variant(args, variant).items()}
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
          f"{args.measure_iters} steps per arm, NTP and NITP interleaved)")
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
            print(f"{variant}: NITP step time vs NTP {100 * nitp['overhead_paired']:+.1f}% (median "
                  f"of paired ratios), {100 * (nitp['step_seconds'] / ntp['step_seconds'] - 1):+.1f}%"
                  " (medians)")
    return report


if __name__ == "__main__":
    try:
        main()
    finally:  # the runs' process group (NCCL warns at exit about one left alive)
        from megatron_nitp.training.initialize import destroy_distributed

        destroy_distributed()
