"""Which pipeline stage owns layer k when the layers are not split evenly over the stages.

The pure ``target_stage`` (plans, validation, tools) follows megatron-core's own split
(``num_layers_in_first/last_pipeline_stage``); the model decides from what it built (one
all-reduce over the pipeline group at construction), checked in a 2-process gloo job.
"""

import os
import sys

import pytest
import torch

from megatron_nitp.layout import routed_bytes_per_step, stage_layer_counts, target_stage


@pytest.mark.parametrize("num_layers,pp,first,last,counts", [
    (4, 2, None, None, [2, 2]),
    (4, 2, 1, None, [1, 3]),
    (4, 2, None, 1, [3, 1]),
    (8, 4, 1, 1, [1, 3, 3, 1]),
    (10, 4, 1, None, [1, 3, 3, 3]),
    (10, 4, None, 4, [2, 2, 2, 4]),
    (6, 3, 2, 2, [2, 2, 2]),
    (5, 2, 2, 3, [2, 3]),
])
def test_stage_layer_counts_follow_megatron(num_layers, pp, first, last, counts):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    assert stage_layer_counts(num_layers, pp, first, last) == counts
    config = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=2,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               num_layers_in_first_pipeline_stage=first,
                               num_layers_in_last_pipeline_stage=last)
    offsets = [get_transformer_layer_offset(config, pp_rank=rank) for rank in range(pp)]
    assert offsets == [sum(counts[:rank]) for rank in range(pp)]


def test_target_stage_with_uneven_splits():
    # even split: 4 layers over 2 stages, layers 1-2 on stage 0
    assert [target_stage(k, 4, 2) for k in range(5)] == [0, 0, 0, 1, 1]
    # first stage holds 1 layer: only layer 1 (and the embedding, k = 0) is on stage 0
    assert [target_stage(k, 4, 2, first_stage_layers=1) for k in range(5)] == [0, 0, 1, 1, 1]
    assert [target_stage(k, 4, 2, last_stage_layers=1) for k in range(5)] == [0, 0, 0, 0, 1]
    # 8 layers over 4 stages as 1 | 3 | 3 | 1
    assert [target_stage(k, 8, 4, 1, 1) for k in range(1, 9)] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert target_stage(3, 10, 4, None, 4) == 1  # 2 | 2 | 2 | 4
    # the routing cost follows: k = 2 with a 1-layer first stage is on the last stage
    routed = routed_bytes_per_step(seq_length=32, micro_batch_size=2, hidden_size=32,
                                   num_microbatches=4, target_layer=2, num_layers=4,
                                   pipeline_parallel=2, first_stage_layers=1)
    assert routed["owner_stage"] == 1 and not routed["routed"]
    assert routed["bytes_per_step_total"] == 0


@pytest.mark.parametrize("num_layers,pp,first,last,match", [
    (4, 2, 0, None, "at least one layer"),
    (4, 2, 4, None, "do not split"),       # nothing left for the last stage
    (4, 2, 2, 3, "do not split"),           # more than 4 layers asked for
    (9, 4, 1, None, "do not split"),        # 8 layers over 3 stages
    (5, 2, None, None, "do not split"),
    (4, 1, 1, None, "need pipeline parallelism"),
])
def test_impossible_splits_are_refused(num_layers, pp, first, last, match):
    with pytest.raises(ValueError, match=match):
        stage_layer_counts(num_layers, pp, first, last)


def test_flags_and_plan_use_the_real_split(capsys):
    from megatron_nitp.accounting.parallel import Layout, stage_layers, target_stage
    from megatron_nitp.training.arguments import parse_args

    flags = ["--preset", "tiny-dense", "--num-layers", "4", "--pipeline-model-parallel-size",
             "2", "--nitp-target-layer", "2", "--micro-batch-size", "1",
             "--global-batch-size", "4"]
    # --nitp-no-stop-gradient is refused only when layer k is before the last stage
    args = parse_args(flags + ["--decoder-first-pipeline-num-layers", "1",
                               "--nitp-no-stop-gradient"])
    assert args.parallel.decoder_first_pipeline_num_layers == 1
    assert args.parallel.decoder_last_pipeline_num_layers is None
    with pytest.raises(SystemExit):
        parse_args(flags + ["--nitp-no-stop-gradient"])
    assert "earlier pipeline stage" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(flags + ["--decoder-first-pipeline-num-layers", "4"])
    assert "do not split" in capsys.readouterr().err

    layout = Layout(world=2, tp=1, pp=2, cp=1, ep=1, dp=1, sp=False)
    assert stage_layers(args, layout, 0) == slice(0, 1)
    assert stage_layers(args, layout, 1) == slice(1, 4)
    assert target_stage(args, layout) == 1


# ---- 2-process gloo job: the model decides from what it built --------------------------------

CASES = (
    # (layers on the first stage, k, owner stage from the built model); the even split of
    # 4 layers over 2 stages would say the opposite stage each time
    (1, 2, 1),  # layer 2 is on the last stage: nothing routed
    (3, 3, 0),  # layer 3 is on the first stage: routed to the last one
)


def _worker() -> None:
    from megatron.core import parallel_state

    from megatron_nitp.training.initialize import (
        destroy_distributed, initialize_distributed, set_seed,
    )
    from megatron_nitp.training.model import build_model
    from megatron_nitp.training.step import _run_schedule
    from tests.helpers import tiny_args

    initialize_distributed(1, 2, 1)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    for first, k, owner in CASES:
        assert target_stage(k, 4, 2) == 1 - owner  # what the even split says
        assert target_stage(k, 4, 2, first_stage_layers=first) == owner
        args = tiny_args("--num-layers", "4", "--pipeline-model-parallel-size", "2",
                         "--decoder-first-pipeline-num-layers", str(first),
                         "--nitp-target-layer", str(k))
        set_seed(1)
        model = build_model(args)
        assert len(model.decoder.layers) == (first if stage == 0 else 4 - first)
        assert model.target_owner_stage == owner, (stage, model.target_owner_stage)
        assert (model.nitp.target_layer in model._routers) == (owner == 0)
        assert model._taps[model.nitp.target_layer].owns_target == (stage == owner)

        g = torch.Generator().manual_seed(k)
        batches = []
        for _ in range(2):
            tokens = torch.randint(0, 100, (args.training.micro_batch_size, args.model.seq_length), generator=g)
            batches.append({"tokens": tokens, "labels": tokens.roll(-1, 1),
                            "loss_mask": torch.ones(tokens.shape),
                            "position_ids": torch.arange(args.model.seq_length).expand_as(tokens)})
        reports = _run_schedule(model, batches, args, model.objectives, {"nitp loss": 1.0},
                                False, False)
        routed = 2 * args.model.seq_length * args.training.micro_batch_size * args.model.hidden_size * 4
        assert model.routed_bytes == (routed if stage == 0 and owner == 0 else 0)
        if stage == 1:
            nitp = sum(r["nitp loss"][0] for r in reports) / sum(r["nitp loss"][1] for r in reports)
            assert torch.isfinite(nitp) and nitp > 0, nitp
        grads = [p.grad for p in model.decoder.layers.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), stage
        print(f"stage {stage} first={first} k={k}: owner {model.target_owner_stage} ok", flush=True)
    destroy_distributed()


@pytest.mark.distributed
def test_model_decides_the_owner_from_the_built_stages():
    from tests.helpers import torchrun_file

    proc = torchrun_file(__file__, 2)
    assert proc.stdout.count(" ok") == 2 * len(CASES), proc.stdout


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import megatron_nitp  # noqa: F401  (CPU import stubs before megatron-core loads)

    _worker()
