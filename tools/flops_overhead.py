"""Training FLOPs per token of NTP and of NITP's additions (paper and exact conventions), and,
with --measure, the measured time and memory of NTP vs NITP (vs MTP) iterations.

Examples:
    python tools/flops_overhead.py --all                  # table of every preset
    python tools/flops_overhead.py --preset moe-9b-a1b --json
    python tools/flops_overhead.py --num-layers 24 --hidden-size 1280 --num-attention-heads 8 \
        --num-query-groups 4 --kv-channels 160 --seq-length 8192 --vocab-size 152064
    python tools/flops_overhead.py --measure               # CPU: d=512, 12 layers, s=512
    python tools/flops_overhead.py --measure --compare-mtp --measure-iters 8

The formulas are in megatron_nitp/flops.py; docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import megatron_nitp  # noqa: E402,F401  (CPU import stubs must precede megatron-core)

from megatron_nitp import flops  # noqa: E402
from megatron_nitp.presets import PRESETS, get_preset  # noqa: E402

# (flag, type) of the model shape; dest names match megatron_nitp.flops.ModelShape
MODEL_FLAGS = [
    ("--num-layers", int), ("--hidden-size", int), ("--ffn-hidden-size", int),
    ("--num-attention-heads", int), ("--num-query-groups", int), ("--kv-channels", int),
    ("--seq-length", int), ("--vocab-size", int), ("--num-moe-experts", int),
    ("--moe-router-topk", int), ("--moe-ffn-hidden-size", int),
    ("--moe-shared-expert-intermediate-size", int), ("--moe-layer-freq", str),
    ("--nitp-projector-ffn-ratio", int),
]

#: --measure's default model (no --preset): a mid-size dense GPT that trains in seconds per
#: iteration on a 2-core CPU; GQA 8 query / 4 key-value heads of 64 like the paper's 1.9B.
#: Model flags replace these values; unless given, the FFN width is 2.75 d (1408) and the
#: key-value heads are half the query heads.
MEASURE_MODEL = dict(num_layers=12, hidden_size=512, num_attention_heads=8, seq_length=512)


def default_target_layer(num_layers: int) -> int:
    """--measure's NITP target layer without --preset: about a quarter of the depth (3 of 12)."""
    return min(max(1, round(num_layers / 4)), num_layers - 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", help=f"one preset: {', '.join(PRESETS)}")
    p.add_argument("--all", action="store_true", help="every preset (the default for the table)")
    g = p.add_argument_group("model shape (override the preset's values)")
    for flag, kind in MODEL_FLAGS:
        g.add_argument(flag, type=kind)
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
                   help="skip the per-arm peak-memory subprocesses")
    g.add_argument("--memory-child", choices=["ntp", "nitp", "mtp"], help=argparse.SUPPRESS)
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


def _training_argv(args) -> list[str]:
    """Flags for megatron_nitp's parse_args: the model, a one-micro-batch step, no extras."""
    from megatron_nitp.training.arguments import build_parser as training_parser

    known = training_parser()._option_string_actions
    shape = {} if args.preset else dict(MEASURE_MODEL)
    shape.update(_explicit(args))
    if not args.preset:
        shape.setdefault("ffn_hidden_size", 11 * shape["hidden_size"] // 4)
        heads = shape["num_attention_heads"]
        shape.setdefault("num_query_groups", heads // 2 if heads % 2 == 0 else heads)
    argv = ["--preset", args.preset or "tiny-dense"]
    for name, value in shape.items():
        flag = "--" + name.replace("_", "-")
        if flag not in known:
            raise SystemExit(f"error: {flag} is a FLOPs-table flag only: the training flags "
                             "cannot build that model, so --measure cannot time it.")
        argv += [flag] if value is True else [flag, str(value)]
    target = args.nitp_target_layer
    if target is None and not args.preset:
        target = default_target_layer(shape["num_layers"])
    if target is not None:
        argv += ["--nitp-target-layer", str(target)]
    mbs = str(args.micro_batch_size)
    return argv + ["--micro-batch-size", mbs, "--global-batch-size", mbs,
                   "--train-iters", "100000", "--lr-warmup-iters", "0", "--eval-interval", "0",
                   "--geometry-interval", "0", "--no-save", "--no-plot", "--no-progress-bar"]


def _build_mtp_model(args, **kwargs):
    """The NTP model plus megatron-core's MTP block (one depth), built the way
    ``training.model.build_model`` builds the others."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    from megatron_nitp.models import NITPGPTModel
    from megatron_nitp.training.model import layer_spec, transformer_config

    config = transformer_config(args)
    config.mtp_num_layers = 1  # mtp_loss_scaling_factor keeps megatron-core's default 0.1
    spec = layer_spec(config)
    core_attention = spec.submodules.self_attention.submodules.core_attention
    use_te = "transformer_engine" in core_attention.__module__
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=use_te)
    return NITPGPTModel(
        config, args.nitp_config, transformer_layer_spec=spec, mtp_block_spec=mtp_spec,
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope", rotary_base=args.rotary_base,
    )


def build_arm(arm: str, argv: list[str]):
    """One arm's Run through ``training.loop.setup`` (data, model, optimizer): ``ntp`` with
    ``--no-nitp``, ``nitp`` as given, ``mtp`` = ``ntp`` plus megatron-core's MTP block.
    Every arm uses the same seed (same initial backbone) and the same batches."""
    from megatron_nitp.training import loop, model as model_module
    from megatron_nitp.training.arguments import parse_args

    args = parse_args(argv + ([] if arm == "nitp" else ["--no-nitp"]))
    if arm != "mtp":
        return loop.setup(args)
    # setup() imports build_model when it runs: swapping the module attribute builds the MTP
    # model through the very same set-up path.
    original = model_module.build_model
    model_module.build_model = _build_mtp_model
    try:
        return loop.setup(args)
    finally:
        model_module.build_model = original


def _step(run, iteration: int) -> float:
    import torch

    from megatron_nitp.training.step import train_step

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_step(run.model, run.optimizer, run.scheduler, run.train_iter, run.args, iteration, False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_child(arm: str, argv: list[str], iterations: int) -> dict:
    """Runs in its own process: build one arm, train ``iterations`` steps, report memory.

    CPU: torch's CPU allocations are invisible to tracemalloc and there is no CPU peak counter,
    and a process's peak RSS only grows - so each arm runs alone in a process, and the peak
    (``VmHWM``) is reset after set-up (``/proc/self/clear_refs`` = 5, Linux) so that it covers
    the training steps only: parameters, gradient buffers, Adam states (allocated at the first
    step), activations and the Python/torch baseline. GPU: ``torch.cuda.max_memory_allocated``.
    """
    import resource

    import torch

    run = build_arm(arm, argv)
    out = {"arm": arm, "rss_after_setup_mib": _proc_status_mib("VmRSS")}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out["peak_source"] = "VmHWM reset after set-up"
    except OSError:
        out["peak_source"] = "ru_maxrss (includes set-up)"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for i in range(iterations):
        _step(run, i)
    try:
        out["peak_rss_mib"] = _proc_status_mib("VmHWM")
    except (OSError, KeyError):
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _measure_memory(arm: str, cli_argv: list[str], iterations: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *cli_argv, "--memory-child", arm]
    # A process group of its own: not the rendezvous this process set up in its environment.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"memory run of {arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _model_params(run) -> int:
    """Parameters of the built model without the training-only heads (NITP projector, MTP)."""
    from megatron_nitp.training.model import unwrap

    return sum(p.numel() for name, p in unwrap(run.model).named_parameters()
               if not name.startswith(("projector.", "mtp.")))


def measure(args, cli_argv: list[str]) -> dict:
    import platform

    import torch

    argv = _training_argv(args)
    arms = ["ntp", "nitp"] + (["mtp"] if args.compare_mtp else [])
    runs = {}
    for arm in arms:
        try:
            runs[arm] = build_arm(arm, argv)
        except Exception as err:  # noqa: BLE001 - report why, never a number
            if arm != "mtp":
                raise
            raise SystemExit(f"--compare-mtp: megatron-core's MTP model cannot be built here "
                             f"({type(err).__name__}: {err}); no MTP figures.") from err
    train_args = runs["nitp"].args
    shape = vars(train_args)
    counted = flops.parameter_counts(shape)["total"]
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
                seconds = _step(runs[arm], i)
            except Exception as err:  # noqa: BLE001 - report why, never a number
                if arm != "mtp":
                    raise
                raise SystemExit(f"--compare-mtp: megatron-core's MTP training step fails here "
                                 f"({type(err).__name__}: {err}); no MTP figures.") from err
            if i >= args.warmup_iters:
                times[arm].append(seconds)
    load_after = os.getloadavg()
    del runs

    memory = {}
    if args.memory:
        for arm in arms:
            memory[arm] = _measure_memory(arm, cli_argv, args.warmup_iters)

    tokens = train_args.micro_batch_size * train_args.seq_length
    median = {arm: statistics.median(t) for arm, t in times.items()}
    paired = {arm: statistics.median(a / b for a, b in zip(times[arm], times["ntp"]))
              for arm in arms if arm != "ntp"}
    exact = flops.exact_flops(shape, causal=True)
    full = flops.exact_flops(shape, causal=False)
    result = dict(
        device=(torch.cuda.get_device_name() if torch.cuda.is_available()
                else f"CPU ({platform.processor() or platform.machine()}), "
                     f"{torch.get_num_threads()} torch threads"),
        torch=torch.__version__,
        training_flags=argv,
        tokens_per_iteration=tokens,
        warmup_iters=args.warmup_iters,
        measure_iters=args.measure_iters,
        load_average_before=load_before,
        load_average_after=load_after,
        seconds=times,
        median_seconds=median,
        overhead_measured={arm: median[arm] / median["ntp"] - 1 for arm in paired},
        overhead_measured_paired={arm: r - 1 for arm, r in paired.items()},
        overhead_exact_causal=exact.overhead,
        overhead_exact_full_square=full.overhead,
        overhead_paper=flops.paper_flops(shape).overhead,
        memory=memory,
        parameters=flops.parameter_counts(shape),
    )
    if args.compare_mtp:
        result["mtp_overhead_exact_causal"] = flops.mtp_flops(shape) / exact.ntp_total
        result["mtp_overhead_exact_full_square"] = (
            flops.mtp_flops(shape, causal=False) / full.ntp_total)
    return result


def print_measurement(r: dict) -> None:
    names = {"ntp": "NTP", "nitp": "NITP", "mtp": "MTP (1 depth)"}
    print(f"device: {r['device']}, torch {r['torch']}")
    print("training flags: " + " ".join(r["training_flags"]))
    print(f"{r['measure_iters']} timed iterations per arm, interleaved, after "
          f"{r['warmup_iters']} warm-up; {r['tokens_per_iteration']} tokens per iteration; "
          "load average before "
          + "/".join(f"{x:.2f}" for x in r["load_average_before"]) + ", after "
          + "/".join(f"{x:.2f}" for x in r["load_average_after"]))
    headers = ["arm", "median s/iter", "min", "max", "tokens/s", "RSS after setup MiB",
               "peak RSS in steps MiB"]
    rows = []
    for arm, seconds in r["seconds"].items():
        mem = r["memory"].get(arm, {})
        rows.append([names[arm], f"{r['median_seconds'][arm]:.3f}", f"{min(seconds):.3f}",
                     f"{max(seconds):.3f}",
                     f"{r['tokens_per_iteration'] / r['median_seconds'][arm]:.0f}",
                     f"{mem['rss_after_setup_mib']:.0f}" if mem else "-",
                     f"{mem['peak_rss_mib']:.0f}" if mem else "-"])
        if "peak_cuda_allocated_mib" in mem:
            rows[-1].append(f"{mem['peak_cuda_allocated_mib']:.0f}")
    if any("peak_cuda_allocated_mib" in m for m in r["memory"].values()):
        headers.append("peak CUDA MiB")
    print(_table(headers, rows))
    for arm in r["overhead_measured"]:
        print(f"{names[arm]} vs NTP: measured {100 * r['overhead_measured'][arm]:+.1f}% "
              f"(ratio of medians), {100 * r['overhead_measured_paired'][arm]:+.1f}% (median of "
              "paired ratios)")
    print(f"NITP analytic (exact): {100 * r['overhead_exact_causal']:+.1f}% with causal s/2 "
          f"attention, {100 * r['overhead_exact_full_square']:+.1f}% with the full s x s square "
          f"(what the unfused local attention computes); paper convention "
          f"{100 * r['overhead_paper']:+.1f}%")
    if "mtp_overhead_exact_causal" in r:
        print(f"MTP analytic (exact): {100 * r['mtp_overhead_exact_causal']:+.1f}% causal, "
              f"{100 * r['mtp_overhead_exact_full_square']:+.1f}% full square")
    if r["memory"]:
        source = next(iter(r["memory"].values()))["peak_source"]
        print(f"memory: each arm alone in its own process, {max(1, r['warmup_iters'])} training "
              f"iteration(s); peak RSS = {source}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_child:
        out = memory_child(args.memory_child, _training_argv(args), max(1, args.warmup_iters))
        print(json.dumps(out))
        return 0
    if args.compare_mtp and not args.measure:
        parser.error("--compare-mtp needs --measure")
    if args.measure:
        if args.all:
            parser.error("--measure times one model: give --preset NAME or model flags, not --all")
        result = measure(args, argv)
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
    sys.exit(main())
