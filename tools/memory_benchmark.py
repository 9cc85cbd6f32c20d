"""Memory of a training step without recomputation, with selective and with full recompute, for
NTP and NITP under each: measured, beside what ``--dry-run`` plans for the same config.

    python tools/memory_benchmark.py                      # CPU: d=512, 12 layers, s=512
    python tools/memory_benchmark.py --micro-batch-size 4 --json

Each (recompute mode, objective) arm is built through ``training.loop.setup`` (the model,
optimizer and data a real run has), trains one warm-up step, then one measured step
(``training.memory.step_memory``): ``step peak`` is the peak of tensor bytes allocated during
the step above those live at its start (the activations kept for the backward pass, the logits,
temporaries, the optimizer's temporaries), ``fwd+bwd peak`` the same before the optimizer's step
begins (torch's Adam without a fused kernel allocates about two fp32 copies of the parameters,
which can set the step's peak whatever the recomputation). The plan's figure is its activation term for the same config (one micro-batch in
flight, one process). Recomputation trades that peak for time: the step time is printed too.
NITP's routing buffers under pipeline parallelism are a separate figure:
``python tools/nitp_comm_bytes.py --compare``.
"""

from __future__ import annotations

import argparse
import json
import time

#: The figure recomputation changes: the step's peak before the optimizer's step (whose own
#: temporaries can set the whole step's peak)
PEAK = "forward_backward_peak_mib"

#: (name, recompute settings)
MODES = (
    ("none", {}),
    ("selective", dict(recompute_granularity="selective",
                       recompute_modules=("core_attn", "mlp"))),
    ("full", dict(recompute_granularity="full", recompute_method="uniform",
                  recompute_num_layers=1)),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--nitp-target-layer", type=int, default=3,
                   help="NITP's layer k (default: a quarter of the 12 layers)")
    p.add_argument("--bf16", action="store_true", help="bf16 (GPU)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--json-out", metavar="FILE", help="also write the figures to FILE as JSON")
    return p


def config(args, mode: dict, nitp: bool):
    from megatron_nitp.config import preset_config

    d = args.hidden_size
    return preset_config(
        "tiny-dense", "dense", num_layers=args.num_layers, hidden_size=d,
        ffn_hidden_size=11 * d // 4, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_attention_heads // 2, seq_length=args.seq_length,
        max_position_embeddings=args.seq_length, nitp_target_layer=args.nitp_target_layer,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size,
        train_iters=100000, lr_warmup_iters=0, eval_interval=0, geometry_interval=0,
        save_final=False, plot=False, progress_bar=False, bf16=args.bf16, nitp=nitp, **mode)


def measure_arm(args, mode: dict, nitp: bool) -> dict:
    from megatron_nitp.accounting.memory_plan import stage_memory
    from megatron_nitp.accounting.parallel import layout_of
    from megatron_nitp.config import validate
    from megatron_nitp.device import synchronize
    from megatron_nitp.training import loop
    from megatron_nitp.training.memory import step_memory
    from megatron_nitp.training.step import train_step

    cfg = config(args, mode, nitp)
    validate(cfg)
    run = loop.setup(cfg)
    train_step(run.model, run.optimizer, run.scheduler, run.train_iter, run.args, 0, False)
    synchronize()
    start = time.perf_counter()
    train_step(run.model, run.optimizer, run.scheduler, run.train_iter, run.args, 1, False)
    synchronize()
    seconds = time.perf_counter() - start
    memory = step_memory(run, 2)
    planned = stage_memory(run.args, layout_of(run.args), run.args.derived.num_microbatches, 0)
    return dict(memory, planned_activations_mib=planned.activations / 2**20,
                step_seconds=seconds)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron_nitp.device import name

    results = {}
    for mode_name, mode in MODES:
        for objective in ("ntp", "nitp"):
            results[f"{mode_name}/{objective}"] = measure_arm(args, mode, objective == "nitp")
    report = dict(device=name(), model=dict(num_layers=args.num_layers,
                                            hidden_size=args.hidden_size,
                                            seq_length=args.seq_length,
                                            micro_batch_size=args.micro_batch_size,
                                            nitp_target_layer=args.nitp_target_layer),
                  arms=results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"step memory on {report['device']}: d={args.hidden_size}, {args.num_layers} layers, "
          f"s={args.seq_length}, micro-batch {args.micro_batch_size}, NITP k="
          f"{args.nitp_target_layer} (MiB; step peak = tensors allocated during the step above "
          "those live at its start; fwd+bwd peak = the same before the optimizer's step, what "
          "recomputation changes)")
    header = ("recompute", "objective", "fwd+bwd peak", "step peak", "planned act.", "resident",
              "step s", "NITP vs NTP")
    print("  ".join(f"{h:>12}" for h in header))
    for mode_name, _ in MODES:
        for objective in ("ntp", "nitp"):
            r = results[f"{mode_name}/{objective}"]
            ntp = results[f"{mode_name}/ntp"][PEAK]
            extra = f"{100 * (r[PEAK] / ntp - 1):+.1f}%" if objective == "nitp" else ""
            print("  ".join(f"{v:>12}" for v in (
                mode_name, objective, f"{r[PEAK]:.1f}", f"{r['step_peak_mib']:.1f}",
                f"{r['planned_activations_mib']:.1f}", f"{r['resident_mib']:.1f}",
                f"{r['step_seconds']:.2f}", extra)))
    for mode_name, _ in MODES[1:]:
        for objective in ("ntp", "nitp"):
            base = results[f"none/{objective}"]
            got = results[f"{mode_name}/{objective}"]
            print(f"{mode_name} recompute, {objective}: forward-backward peak "
                  f"{100 * (got[PEAK] / base[PEAK] - 1):+.1f}%, step peak "
                  f"{100 * (got['step_peak_mib'] / base['step_peak_mib'] - 1):+.1f}% "
                  "vs no recompute")
    return report


if __name__ == "__main__":
    try:
        main()
    finally:  # the runs' process group (NCCL warns at exit about one left alive)
        from megatron_nitp.training.initialize import destroy_distributed

        destroy_distributed()
