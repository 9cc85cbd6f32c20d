"""The interleaved pipeline schedule's settings (in-process, no launch): Megatron-LM's flags,
the refusals, where each layer's chunk is (against megatron-core), and the bubble and in-flight
figures ``--dry-run`` prints, against hand-computed values. The runs themselves (equal to one
process, checkpoints resharded across chunkings) are in tests/test_parallel.py."""

import pytest
import torch

from megatron_nitp.config import ConfigError, resolve
from megatron_nitp.layout import (chunk_layer_ranges, in_flight_forwards,
                                  pipeline_bubble_fraction, target_chunk, virtual_pipeline_size)
from megatron_nitp.training.arguments import parse_args
from tests.helpers import TINY_MODEL

FOUR = TINY_MODEL + ["--num-layers", "4", "--train-iters", "4", "--global-batch-size", "8"]


def _error(capsys, *flags):
    with pytest.raises(SystemExit) as exc:
        parse_args(FOUR + list(flags))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_megatron_lm_flags_give_the_chunks_per_rank():
    # --num-layers-per-virtual-pipeline-stage: layers per stage / layers per chunk
    args = parse_args(FOUR + ["--no-nitp", "--pipeline-model-parallel-size", "2",
                              "--num-layers-per-virtual-pipeline-stage", "1"])
    assert args.virtual_pipeline_model_parallel_size == 2
    args = parse_args(FOUR + ["--no-nitp", "--pipeline-model-parallel-size", "2",
                              "--num-virtual-stages-per-pipeline-rank", "2"])
    assert args.virtual_pipeline_model_parallel_size == 2
    # one chunk per rank is the plain schedule (Megatron-LM: None)
    args = parse_args(FOUR + ["--pipeline-model-parallel-size", "2",
                              "--num-layers-per-virtual-pipeline-stage", "2"])
    assert args.virtual_pipeline_model_parallel_size is None
    assert parse_args(FOUR).virtual_pipeline_model_parallel_size is None
    assert virtual_pipeline_size(8, 2, layers_per_virtual_stage=2) == 2
    assert virtual_pipeline_size(8, 2, virtual_stages_per_rank=4) == 4


def test_layer_k_on_any_chunk_and_every_objective_are_accepted():
    pp2 = ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]
    # 6 layers split 2 + 4: rank 0 [1] [4], rank 1 [2 3] [5 6]: k = 5 is on the last chunk
    args = parse_args(FOUR + pp2 + ["--num-layers", "6", "--decoder-first-pipeline-num-layers",
                                    "2", "--nitp-target-layer", "5"])
    assert args.virtual_pipeline_model_parallel_size == 2
    parse_args(FOUR + pp2 + ["--no-nitp"])
    parse_args(FOUR + pp2 + ["--nitp-objective", "cosine_reg"])
    for k in ("0", "1", "2", "3"):  # routed from either rank's chunks, or handed over on rank 1
        parse_args(FOUR + pp2 + ["--nitp-target-layer", k])
    # MTP's blocks on the last rank's last chunk, beside NITP and alone
    mtp = ["--mtp-num-layers", "1", "--untie-embeddings-and-output-weights"]
    assert parse_args(FOUR + pp2 + mtp + ["--nitp-target-layer", "1"]).mtp.mtp_num_layers == 1
    parse_args(FOUR + pp2 + mtp + ["--no-nitp"])


def test_refusals_name_the_fix(capsys):
    pp2 = ["--pipeline-model-parallel-size", "2"]
    assert "not a Megatron-LM flag" in _error(
        capsys, *pp2, "--virtual-pipeline-model-parallel-size", "2")
    assert "are exclusive" in _error(capsys, *pp2, "--num-layers-per-virtual-pipeline-stage",
                                     "1", "--num-virtual-stages-per-pipeline-rank", "2")
    assert "needs --pipeline-model-parallel-size >= 2" in _error(
        capsys, "--num-virtual-stages-per-pipeline-rank", "2")
    assert "does not divide the 2 layers of a pipeline stage" in _error(
        capsys, *pp2, "--no-nitp", "--num-layers-per-virtual-pipeline-stage", "3")
    assert "not --num-layers-per-virtual-pipeline-stage" in _error(
        capsys, *pp2, "--no-nitp", "--decoder-first-pipeline-num-layers", "2",
        "--num-layers-per-virtual-pipeline-stage", "1")
    # 4 layers as 1 + 3: neither stage's layers split into 2 chunks
    assert "pipeline stage 0 holds 1 layers" in _error(
        capsys, *pp2, "--no-nitp", "--decoder-first-pipeline-num-layers", "1",
        "--num-virtual-stages-per-pipeline-rank", "2")
    # megatron-core places uneven chunks through the middle stages: PP 2 with both has none
    assert "give only one of" in _error(
        capsys, *pp2, "--no-nitp", "--num-layers", "8", "--decoder-first-pipeline-num-layers",
        "2", "--decoder-last-pipeline-num-layers", "6", "--num-virtual-stages-per-pipeline-rank",
        "2")
    # MTP under interleaving (accepted untied, above) keeps PP's condition on the embeddings
    assert "--mtp-num-layers with --pipeline-model-parallel-size > 1 needs " \
        "--untie-embeddings-and-output-weights" in _error(
            capsys, *pp2, "--num-virtual-stages-per-pipeline-rank", "2", "--mtp-num-layers", "1")


def test_micro_batches_must_be_a_multiple_of_pp():
    # megatron-core runs micro-batches in groups of PP per chunk
    # (microbatch_group_size_per_vp_stage)
    args = parse_args(FOUR + ["--no-nitp", "--pipeline-model-parallel-size", "2",
                              "--num-virtual-stages-per-pipeline-rank", "2",
                              "--global-batch-size", "6"])
    with pytest.raises(ConfigError, match="3 micro-batches per step .* must be a multiple of 2"):
        resolve(args, 2)
    assert resolve(args.replace(global_batch_size=8), 2).derived.num_microbatches == 4


@pytest.mark.parametrize("num_layers,pp,vpp,first,last", [
    (4, 2, 2, None, None),
    (8, 2, 2, None, None),
    (8, 4, 2, None, None),
    (6, 2, 2, 2, None),
    (6, 2, 2, None, 2),
    (12, 4, 2, 2, 2),
])
def test_chunks_hold_the_layers_megatron_core_builds(num_layers, pp, vpp, first, last):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    ranges = chunk_layer_ranges(num_layers, pp, vpp, first, last)
    config = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=2,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               virtual_pipeline_model_parallel_size=vpp,
                               num_layers_in_first_pipeline_stage=first,
                               num_layers_in_last_pipeline_stage=last)
    built = []
    for (rank, chunk), layers in ranges.items():
        offset = get_transformer_layer_offset(config, vp_stage=chunk, pp_rank=rank)
        count = get_num_layers_to_build(config, vp_stage=chunk, pp_rank=rank)
        assert layers == range(offset + 1, offset + count + 1), (rank, chunk)
        built += list(layers)
    assert sorted(built) == list(range(1, num_layers + 1))
    assert target_chunk(num_layers, num_layers, pp, vpp, first, last) == (pp - 1, vpp - 1)
    assert target_chunk(0, num_layers, pp, vpp, first, last) == (0, 0)


def test_bubble_and_in_flight_figures():
    # plain 1F1B: (p - 1) / m; interleaved: (p - 1) / (v m)
    assert pipeline_bubble_fraction(4, 8) == 3 / 8
    assert pipeline_bubble_fraction(4, 8, 2) == 3 / 16
    assert pipeline_bubble_fraction(2, 4, 2) == 1 / 8
    # stage r holds min(p - r, m) micro-batches under 1F1B; interleaved, megatron-core's
    # warm-up 2 (p - r - 1) + (v - 1) p chunk forwards plus one, each 1/v of the stage
    assert [in_flight_forwards(4, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_forwards(4, 2, 0) == 2
    assert [in_flight_forwards(4, 8, r, 2) for r in range(4)] == [11 / 2, 9 / 2, 7 / 2, 5 / 2]
    assert in_flight_forwards(2, 2, 0, 2) == 4 / 2  # warm-up 2 + 2 = 4 = all v m chunk forwards
    assert in_flight_forwards(1, 8, 0) == 1


def test_dry_run_prints_both_schedules(capsys):
    from megatron_nitp.accounting import schedules
    from megatron_nitp.accounting.dry_run import dry_run

    flags = FOUR + ["--num-layers", "16", "--pipeline-model-parallel-size", "4",
                    "--global-batch-size", "16", "--nitp-target-layer", "15", "--world-size", "4"]
    assert dry_run(parse_args(flags + ["--dry-run"])) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("pipeline "))
    # M = 16 / 2 = 8 micro-batches; this run is plain, the line says what V = 2 would give
    assert "1F1B bubble (p-1)/m = 3/8 = 37.5%, in flight on stage 0 4 micro-batches" in line
    assert "interleaved V=2: bubble (p-1)/(v m) = 3/16 = 18.8%" in line
    assert "in flight on stage 0 5.5 micro-batches" in line
    assert "--num-virtual-stages-per-pipeline-rank 2" in line
    args = parse_args(flags + ["--num-virtual-stages-per-pipeline-rank", "2", "--dry-run"])
    assert dry_run(args) == 0
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.strip().startswith("pipeline "))
    assert "interleaved V=2: bubble (p-1)/(v m) = 3/16 = 18.8%" in line and "(this run)" in line
    # the activations the plan counts on stage 0 follow the schedule: 5.5 vs 4 micro-batches
    resolved = resolve(args, 4)
    figures = schedules.pipeline_schedules(resolved)
    assert figures["interleaved_in_flight_bytes"] == 5.5 * figures["stage0_microbatch_bytes"]
    assert figures["plain_in_flight_bytes"] == 4 * figures["stage0_microbatch_bytes"]


def test_export_and_tools_rebuild_a_vpp_run_as_one_process():
    """``config_from_meta`` / tools rebuild a checkpoint's model in one process
    (``ONE_PROCESS_LAYOUT``): the chunking goes with the rest of the layout."""
    from megatron_nitp.config import ONE_PROCESS_LAYOUT

    args = parse_args(FOUR + ["--no-nitp", "--pipeline-model-parallel-size", "2",
                              "--num-virtual-stages-per-pipeline-rank", "2"])
    one = args.replace(**ONE_PROCESS_LAYOUT)
    assert one.virtual_pipeline_model_parallel_size is None
    assert resolve(one, 1).derived.num_microbatches == 4


def test_a_dp_reshardable_optimizer_state_keeps_its_chunking():
    """The distributed optimizer's dp_reshardable state follows each chunk's gradient buckets:
    a checkpoint records V in its layout, and a resume at another V is refused (the fully
    reshardable form reshards, tests/test_parallel.py)."""
    from megatron_nitp.training import checkpoint as ck
    from megatron_nitp.training.checkpoint.meta import layout

    args = parse_args(FOUR + ["--no-nitp", "--pipeline-model-parallel-size", "2",
                              "--num-virtual-stages-per-pipeline-rank", "2",
                              "--use-distributed-optimizer"])
    meta = {"iteration": 4, "optimizer_format": "dp_reshardable",
            "layout": layout(resolve(args, 2))}
    assert meta["layout"]["vpp"] == 2
    ck.check_optimizer_layout(meta, resolve(args, 2), "x")
    plain = resolve(args.replace(num_virtual_stages_per_pipeline_rank=None), 2)
    with pytest.raises(ck.CheckpointError, match="VPP 2 -> None"):
        ck.check_optimizer_layout(meta, plain, "x")
