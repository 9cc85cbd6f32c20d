"""Build a job's dataset index cache before the job, from the job's own flags.

    python tools/build_index.py --preset moe-9b-a1b --data-path ... --tokenizer-model ... \
        --data-cache-path /shared/run/data-cache [the job's other flags]

megatron-core's GPTDataset indices (documents, samples, shuffle) depend on the data, the split,
the sequence length, the seed and the samples the run asks for (--train-iters x
--global-batch-size, --eval-iters); the layout flags (TP/PP/EP, nodes) do not matter. Run on one
CPU node with the same flags as the job (a DeepSeek-style MoE job is recognized by its preset or
--num-experts), this writes the cache the job then reads at start, so that no rank of the job
waits for global rank 0's first build (--dataset-build-timeout-minutes). docs/cluster.md has the
figures for a large corpus.
"""

import sys
import time

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)


def _model_type(argv: list[str]) -> str:
    from megatron_nitp.config.presets import PRESETS

    preset = argv[argv.index("--preset") + 1] if "--preset" in argv[:-1] else None
    moe = "--num-experts" in argv or PRESETS.get(preset, {}).get("model_type") == "moe"
    return "moe" if moe else "dense"


def main(argv=None) -> str:
    """Builds the index; returns the cache folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print("usage: python tools/build_index.py [the job's flags, as pretrain_*_nitp.py takes them]\n\n" + __doc__.strip())
        return ""
    from megatron_nitp.config import ONE_PROCESS_LAYOUT
    from megatron_nitp.data.cache import default_cache_root
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.initialize import initialize_distributed
    from megatron_nitp.training.loop import prepare_data

    config = parse_args(argv, _model_type(argv))
    one = config.replace(**ONE_PROCESS_LAYOUT)
    if one.data.mock_data:
        raise SystemExit("error: --mock-data has no index to build.")
    cache = one.data.data_cache_path or f"{default_cache_root()}/dataset-index"
    initialize_distributed()
    start = time.monotonic()
    print(f"> building the dataset index in {cache}", flush=True)
    try:
        args, _, train, _ = prepare_data(one)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        raise SystemExit(f"error: {err}")
    print(f"> dataset index ready in {cache} ({time.monotonic() - start:.1f} s): "
          f"{args.training.train_iters * args.training.global_batch_size:,} training samples of "
          f"{args.model.seq_length} tokens", flush=True)
    return cache


if __name__ == "__main__":
    main()
