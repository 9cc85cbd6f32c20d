"""Training FLOPs per token of NTP and of NITP's additions (paper and exact conventions), and,
with --measure, the measured time and memory of NTP vs NITP (vs MTP) iterations.

Examples:
    python tools/flops_overhead.py --all                  # table of every preset
    python tools/flops_overhead.py --preset moe-9b-a1b --json
    python tools/flops_overhead.py --num-layers 24 --hidden-size 1280 --num-attention-heads 8 \
        --num-query-groups 4 --kv-channels 160 --seq-length 8192 --vocab-size 152064
    python tools/flops_overhead.py --measure               # CPU: d=512, 12 layers, s=512
    python tools/flops_overhead.py --measure --compare-mtp --measure-iters 8

The formulas are in megatron_nitp/accounting/flops.py and parameters.py; docs/performance.md
has the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)

from megatron_nitp.cli import ArgumentParser
from megatron_nitp.accounting import flops, parameters
from megatron_nitp.config.presets import PRESETS, get_preset

# (flag, type) of the model shape; dest names match megatron_nitp.accounting.shape.ModelShape
MODEL_FLAGS = [
    ("--num-layers", int), ("--hidden-size", int), ("--ffn-hidden-size", int),
    ("--num-attention-heads", int), ("--num-query-groups", int), ("--kv-channels", int),
    ("--seq-length", int), ("--vocab-size", int), ("--num-moe-experts", int),
    ("--moe-router-topk", int), ("--moe-ffn-hidden-size", int),
    ("--moe-shared-expert-intermediate-size", int), ("--moe-layer-freq", str),
    ("--nitp-projector-ffn-ratio", int),
]

#: --measure's default model (no --preset): a mid-size dense GPT that trains in seconds per
#: The paper's measured wall-clock overhead of NITP (Section 5, 9B MoE: 16h01m -> 16h18m).
PAPER_WALL_CLOCK_OVERHEAD = 17 / 961

#: iteration on a 2-core CPU; GQA 8 query / 4 key-value heads of 64 like the paper's 1.9B.
#: Model flags replace these values; unless given, the FFN width is 2.75 d (1408) and the
#: key-value heads are half the query heads.
MEASURE_MODEL = dict(num_layers=12, hidden_size=512, num_attention_heads=8, seq_length=512)


def default_target_layer(num_layers: int) -> int:
    """--measure's NITP target layer without --preset: about a quarter of the depth (3 of 12)."""
    return min(max(1, round(num_layers / 4)), num_layers - 1)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", help=f"one preset: {', '.join(PRESETS)}")
    p.add_argument("--all", action="store_true", help="every preset (the default for the table)")
    g = p.add_argument_group("model shape (override the preset's values)")
    for flag, kind in MODEL_FLAGS:
        aliases = ["--num-experts"] if flag == "--num-moe-experts" else []  # training's name
        g.add_argument(flag, *aliases, type=kind)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    p.add_argument("--attention-count", choices=["causal", "full"], default="causal",
                   help="exact convention: attention scores over s/2 keys (causal, Megatron-LM) "
                        "or over the full s x s square (what unfused attention computes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    g = p.add_argument_group("measurement")
    g.add_argument("--measure", action="store_true",
                   help="time NTP and NITP training iterations, interleaved, on this machine")
    g.add_argument("--measure-iters", type=int, default=8,
                   help="timed iterations per arm (after the warm-up)")
    g.add_argument("--warmup-iters", type=int, default=2, help="untimed iterations per arm")
    g.add_argument("--micro-batch-size", type=int, default=2,
                   help="sequences per iteration (global batch = micro batch)")
    g.add_argument("--nitp-target-layer", type=int,
                   help="NITP target layer (default: the preset's, else a quarter of the depth)")
    g.add_argument("--compare-mtp", action="store_true",
                   help="also time megatron-core's multi-token prediction (mtp_num_layers=1)")
    g.add_argument("--no-memory", dest="memory", action="store_false", default=True,
                   help="skip the (untimed) memory-profiled step of each arm")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 training (megatron-core mixed precision; what GPU runs use)")
    return p


def _explicit(args) -> dict:
    """The model flags given on the command line."""
    names = [f.lstrip("-").replace("-", "_") for f, _ in MODEL_FLAGS]
    names.append("untie_embeddings_and_output_weights")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _models(args) -> list[tuple[str, dict]]:
    """(name, shape dict) of the models the table covers."""
    explicit = _explicit(args)
    if args.preset:
        return [(args.preset, {**get_preset(args.preset), **explicit})]
    if explicit and not args.all:
        missing = [f"--{n.replace('_', '-')}" for n in
                   ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
                   if n not in explicit]
        if missing:
            raise SystemExit(f"error: give {', '.join(missing)} (or --preset NAME / --all)")
        return [("custom", explicit)]
    return [(name, {**get_preset(name), **explicit}) for name in PRESETS]


# --------------------------------------------------------------------------------------------
# Analytic table
# --------------------------------------------------------------------------------------------


def _e(x: float) -> str:
    """3 significant digits, paper style: 3.89e9."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def analytic(models, causal: bool) -> dict:
    return {name: dict(shape=shape, **flops.flops_report(shape, causal)) for name, shape in models}


def print_tables(report: dict, causal: bool) -> None:
    headers = ["model", "params", "activated", "backbone", "unembedding", "NTP total",
               "NITP", "overhead"]
    titles = {
        "paper": "paper convention (App. G): 6 x forward parameters, MoE formula on all layers",
        "exact": "exact convention (real shapes, Megatron-LM num_floating_point_operations; "
                 + ("causal attention s/2)" if causal else "full s x s attention)"),
    }
    for convention, title in titles.items():
        rows = []
        for name, entry in report.items():
            f, n = entry[convention], entry["parameters"]
            rows.append([name, _e(n["total"]), _e(n["activated"]), _e(f["backbone"]),
                         _e(f["unembedding"]), _e(f["ntp_total"]), _e(f["nitp"]),
                         f"{100 * f['overhead']:.2f}%"])
        print(f"Training FLOPs per token - {title}")
        print(_table(headers, rows))
        print()


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _is_moe(args) -> bool:
    return bool(_explicit(args).get("num_moe_experts")
                or (args.preset and PRESETS[args.preset].get("model_type") == "moe"))


def _training_config(args):
    """The run config to measure: the model (a preset or the table's shape flags), a
    one-micro-batch step, no extras. Built from the config's fields, not from flag strings."""
    from megatron_nitp.config import FLAT, preset_config

    model_type = "moe" if _is_moe(args) else "dense"
    shape = {} if args.preset else dict(MEASURE_MODEL)
    shape.update(_explicit(args))
    if not args.preset:
        shape.setdefault("ffn_hidden_size", 11 * shape["hidden_size"] // 4)
        heads = shape["num_attention_heads"]
        shape.setdefault("num_query_groups", heads // 2 if heads % 2 == 0 else heads)
    for name in shape:
        if name not in FLAT:
            raise SystemExit(f"error: --{name.replace('_', '-')} is a FLOPs-table flag only: the "
                             "training flags cannot build that model, so --measure cannot time it.")
    target = args.nitp_target_layer
    if target is None and not args.preset:
        target = default_target_layer(shape["num_layers"])
    if target is not None:
        shape["nitp_target_layer"] = target
    mbs = args.micro_batch_size
    preset = args.preset or ("tiny-moe" if model_type == "moe" else "tiny-dense")
    return preset_config(
        preset, model_type, **shape, micro_batch_size=mbs, global_batch_size=mbs,
        train_iters=100000, lr_warmup_iters=0, eval_interval=0, geometry_interval=0,
        save_final=False, plot=False, progress_bar=False, bf16=bool(args.bf16))


def _model_params(run) -> int:
    """Parameters of the built model without the training-only heads (NITP projector, MTP)."""
    from megatron_nitp.training.model import unwrap

    return sum(p.numel() for name, p in unwrap(run.model).named_parameters()
               if not name.startswith(("projector.", "mtp.")))


def measure(args) -> dict:
    import platform

    import torch

    from megatron_nitp.training.arms import build_arm, timed_step

    config = _training_config(args)
    arms = ["ntp", "nitp"] + (["mtp"] if args.compare_mtp else [])
    runs = {}
    for arm in arms:
        try:
            runs[arm] = build_arm(arm, config)
        except Exception as err:  # noqa: BLE001 - report why, never a number
            if arm != "mtp":
                raise
            raise SystemExit(f"--compare-mtp: megatron-core's MTP model cannot be built here "
                             f"({type(err).__name__}: {err}); no MTP figures.") from err
    train_args = runs["nitp"].args
    shape = train_args.flat()
    counted = parameters.parameter_counts(shape)["total"]
    built = _model_params(runs["ntp"])
    if built != counted:
        raise SystemExit(f"error: the built model has {built:,} parameters but the analytic "
                         f"count of these flags is {counted:,}: the training flags do not build "
                         "the model the FLOPs formulas describe (MoE?); no measurement.")

    load_before = os.getloadavg()
    times = {arm: [] for arm in arms}
    for i in range(args.warmup_iters + args.measure_iters):
        for arm in arms:  # interleaved: A B A B ... so drifts in machine load hit every arm
            try:
                seconds = timed_step(runs[arm], i)
            except Exception as err:  # noqa: BLE001 - report why, never a number
                if arm != "mtp":
                    raise
                raise SystemExit(f"--compare-mtp: megatron-core's MTP training step fails here "
                                 f"({type(err).__name__}: {err}); no MTP figures.") from err
            if i >= args.warmup_iters:
                times[arm].append(seconds)
    load_after = os.getloadavg()
    iteration = args.warmup_iters + args.measure_iters
    from megatron_nitp.training.memory import step_memory

    memory = {arm: step_memory(runs[arm], iteration) for arm in arms} if args.memory else {}

    tokens = train_args.training.micro_batch_size * train_args.model.seq_length
    median = {arm: statistics.median(t) for arm, t in times.items()}
    paired = {arm: statistics.median(a / b for a, b in zip(times[arm], times["ntp"]))
              for arm in arms if arm != "ntp"}
    exact = flops.exact_flops(shape, causal=True)
    full = flops.exact_flops(shape, causal=False)
    from megatron_nitp import kernels
    from megatron_nitp.config.performance import attention_path
    from megatron_nitp.training.logger import peak_tflops

    per_token = {"ntp": exact.ntp_total, "nitp": exact.ntp_total + exact.nitp}
    tflops = {arm: per_token[arm] * tokens / median[arm] / 1e12 for arm in per_token}
    peak = peak_tflops(train_args.logging)
    result = dict(
        tflops_per_device=tflops,
        mfu={arm: t / peak for arm, t in tflops.items()} if peak else None,
        peak_tflops=peak,
        device=(torch.cuda.get_device_name() if torch.cuda.is_available()
                else f"CPU ({platform.processor() or platform.machine()}), "
                     f"{torch.get_num_threads()} torch threads"),
        torch=torch.__version__,
        training_config=train_args.to_dict(),
        layer_spec=("transformer_engine" if kernels.use_transformer_engine(
            train_args.parallel.transformer_impl) else "local"),
        attention=attention_path(train_args.performance, train_args.parallel.transformer_impl),
        tokens_per_iteration=tokens,
        warmup_iters=args.warmup_iters,
        measure_iters=args.measure_iters,
        load_average_before=load_before,
        load_average_after=load_after,
        seconds=times,
        median_seconds=median,
        overhead_measured={arm: median[arm] / median["ntp"] - 1 for arm in paired},
        overhead_measured_paired={arm: r - 1 for arm, r in paired.items()},
        overhead_measured_min={arm: min(times[arm]) / min(times["ntp"]) - 1 for arm in paired},
        overhead_exact_causal=exact.overhead,
        overhead_exact_full_square=full.overhead,
        overhead_paper=flops.paper_flops(shape).overhead,
        memory=memory,
        parameters=parameters.parameter_counts(shape),
    )
    if args.compare_mtp:
        result["mtp_overhead_exact_causal"] = flops.mtp_flops(shape) / exact.ntp_total
        result["mtp_overhead_exact_full_square"] = (
            flops.mtp_flops(shape, causal=False) / full.ntp_total)
    return result


def model_line(r: dict) -> str:
    """One line naming what was timed: the model's shape, precision and kernels."""
    c = r["training_config"]
    m, t = c["model"], c["training"]
    return (f"model: {c['preset'] or c['model_type']}, {m['num_layers']} layers, hidden "
            f"{m['hidden_size']}, seq {m['seq_length']}, micro-batch {t['micro_batch_size']}, "
            f"{'bf16' if t['bf16'] else 'fp16' if t['fp16'] else 'fp32'}, NITP layer k "
            f"{c['nitp_config']['target_layer']}; layer spec {r['layer_spec']}, attention "
            f"{r['attention']}")


def print_measurement(r: dict) -> None:
    names = {"ntp": "NTP", "nitp": "NITP", "mtp": "MTP (1 depth)"}
    load = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"device: {r['device']}, torch {r['torch']}")
    print(model_line(r))
    print(f"{r['measure_iters']} timed iterations per arm, interleaved, after "
          f"{r['warmup_iters']} warm-up; {r['tokens_per_iteration']} tokens per iteration; "
          f"load average (1/5/15 min) before {load(r['load_average_before'])}, after "
          f"{load(r['load_average_after'])}")
    headers = ["arm", "median s/iter", "min", "max", "tokens/s (median)", "resident MiB",
               "step peak MiB", "peak MiB"]
    rows = []
    for arm, seconds in r["seconds"].items():
        mem = r["memory"].get(arm)
        rows.append([names[arm], f"{r['median_seconds'][arm]:.3f}", f"{min(seconds):.3f}",
                     f"{max(seconds):.3f}",
                     f"{r['tokens_per_iteration'] / r['median_seconds'][arm]:.0f}"]
                    + ([f"{mem[k]:.0f}" for k in ("resident_mib", "step_peak_mib", "peak_mib")]
                       if mem else ["-"] * 3))
    print(_table(headers, rows))
    for arm, seconds in r["seconds"].items():
        print(f"{names[arm]} seconds per iteration, in order: "
              + " ".join(f"{t:.2f}" for t in seconds))
    for arm in r["overhead_measured"]:
        print(f"{names[arm]} vs NTP, measured: {100 * r['overhead_measured'][arm]:+.1f}% "
              f"(medians), {100 * r['overhead_measured_paired'][arm]:+.1f}% (median of paired "
              f"A/B ratios), {100 * r['overhead_measured_min'][arm]:+.1f}% (minimums)")
    mfu = r.get("mfu") or {}
    print("model TFLOP/s per device (exact FLOPs, causal): " + ", ".join(
        f"{names[arm]} {t:.1f}" + (f" (MFU {100 * mfu[arm]:.1f}% of {r['peak_tflops']:g})"
                                   if arm in mfu else "")
        for arm, t in r["tflops_per_device"].items()))
    print(f"NITP vs NTP, analytic (exact): {100 * r['overhead_exact_causal']:+.1f}% counting "
          f"causal attention as s/2, {100 * r['overhead_exact_full_square']:+.1f}% counting the "
          f"full s x s square (what the unfused local attention computes); paper convention "
          f"{100 * r['overhead_paper']:+.1f}%")
    print(f"the paper's measured wall clock (quoted, 9B MoE, 5k steps, GBS 1024): NTP 16h01m, "
          f"NITP 16h18m, {100 * PAPER_WALL_CLOCK_OVERHEAD:+.1f}%")
    if "mtp_overhead_exact_causal" in r:
        print(f"MTP vs NTP, analytic (exact): {100 * r['mtp_overhead_exact_causal']:+.1f}% "
              f"causal, {100 * r['mtp_overhead_exact_full_square']:+.1f}% full square")
    if r["memory"]:
        print("memory: resident = parameters + gradient buffers + optimizer states (tensor "
              "bytes); step peak = peak of tensors allocated during one extra, untimed step "
              "(torch.profiler memory events on CPU, max_memory_allocated on GPU); peak = sum")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare_mtp and not args.measure:
        parser.error("--compare-mtp needs --measure")
    if args.measure:
        if args.all:
            parser.error("--measure times one model: give --preset NAME or model flags, not --all")
        # the training code's progress lines go to stderr: with --json, stdout is the JSON alone
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            result = measure(args)
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print_measurement(result)
        return 0
    causal = args.attention_count == "causal"
    report = analytic(_models(args), causal)
    if args.json:
        print(json.dumps({"attention_count": args.attention_count, "models": report}, indent=1))
    else:
        print_tables(report, causal)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:  # the runs' process group (NCCL warns at exit about one left alive)
        from megatron_nitp.training.initialize import destroy_distributed

        destroy_distributed()
