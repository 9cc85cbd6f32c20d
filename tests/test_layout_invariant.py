"""Initial weights do not depend on the parallel layout: every layout equals one process from
scratch, with no shared initial checkpoint (gloo, CPU, tiny models, fp32).

Each layout builds its model from the seed alone (``models.initialization``), trains 3
iterations, and must match the single-process run: the initial weights of every parameter
exactly, per-iteration lm loss, nitp loss and grad norm to a relative 1e-5, and the whole state
after the steps (every backbone and projector weight and every Adam moment, assembled into
global tensors from all ranks, ``assert_state_close`` of parallel_runs.py: its tolerances are
explained there), with every replicated copy equal to the saved one. Layouts of one world size
run one after the other in one launch (``parallel_harness.py --runs``), so the whole module
costs four interpreter starts.
"""

import json

import pytest
import torch

from tests.helpers import TINY_MODEL, launch_runs
from tests.parallel_runs import assert_state_close

DENSE = TINY_MODEL + ["--num-layers", "4", "--seq-length", "32", "--global-batch-size", "8",
                      "--train-iters", "3", "--nitp-target-layer", "1"]
MOE = DENSE + [
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
    "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0]*1+[1]*3",
    "--moe-token-dispatcher-type", "alltoall", "--untie-embeddings-and-output-weights",
]
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
# name: (world size, reference, flags). k = 1 sits on pipeline stage 0 in every layout.
LAYOUTS = {
    "tp2": (2, "ref", DENSE + TP2),
    "pp2-k-on-stage-0": (2, "ref", DENSE + PP2),
    "dp2": (2, "ref", DENSE),
    "ep2-moe": (2, "ref-moe", MOE + ["--expert-model-parallel-size", "2"]),
    "pp4": (4, "ref", DENSE + ["--pipeline-model-parallel-size", "4"]),
    "tp2xpp2": (4, "ref", DENSE + TP2 + PP2),
}
REFERENCES = {"ref": DENSE, "ref-moe": MOE}


def _launch(root, nproc, runs):
    """One process launch that runs ``runs`` ({name: flags}) one after the other."""
    launch_runs(root, nproc, {name: flags + ["--dump-init"] for name, flags in runs.items()},
                timeout=600)


def _result(root, name):
    out = root / name
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    return (metrics, torch.load(out / "projector.pt"), torch.load(out / "init.pt"),
            torch.load(out / "state.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Results by run name; each world size is launched once, when a test first needs it."""
    root = tmp_path_factory.mktemp("layout-invariant")
    launched = set()

    def get(name):
        nproc = 1 if name in REFERENCES else LAYOUTS[name][0]
        if nproc not in launched:
            runs = REFERENCES if nproc == 1 else {
                n: flags for n, (size, _, flags) in LAYOUTS.items() if size == nproc}
            _launch(root, nproc, runs)
            launched.add(nproc)
        return _result(root, name)

    return get


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_from_scratch_equals_single_process(results, name):
    _, reference, _ = LAYOUTS[name]
    ref_metrics, ref_projector, ref_init, ref_state = results(reference)
    metrics, projector, init, state = results(name)
    assert init.keys() == ref_init.keys()
    for key in ref_init:  # the same draws, bit for bit
        assert torch.equal(init[key], ref_init[key]), (name, key)
    assert len(metrics) == len(ref_metrics) == 3
    keys = ["lm loss", "nitp loss", "grad norm"]
    if "moe" in name:
        keys.append("load balancing loss")
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (name, step, key)
    for key in ("gate", "up", "down"):  # see test_parallel.py for the tolerance
        torch.testing.assert_close(projector[key], ref_projector[key], rtol=1e-5, atol=1e-5)
    assert any(k.startswith("model.decoder.layers.") for k in ref_state["tensors"])
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in ref_state["tensors"])
    assert_state_close(state, ref_state, name)


# ---------------------------------------------------------------- in-process, one rank


def _stage(monkeypatch, args, rank, size, seed):
    """Pipeline stage ``rank`` of ``size`` built and initialized in this one-rank process:
    megatron-core reads the stage from the pipeline group's rank, which is faked here."""
    from megatron.core import parallel_state
    from megatron.core.transformer import transformer_block, transformer_layer

    from megatron_nitp.models.initialization import initialize_weights
    from megatron_nitp.nitp.config import NITPConfig
    from megatron_nitp.training.initialize import set_seed
    from megatron_nitp.training.model import build_model

    set_seed(1)  # megatron's own build-time draws need the RNG tracker (on GPU)
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    for module in (transformer_block, transformer_layer):
        real = module.get_pg_rank
        monkeypatch.setattr(module, "get_pg_rank",
                            lambda group, real=real: rank if group is pipeline else real(group))
    staged = args.replace(pipeline_model_parallel_size=size, derived=args.derived)
    try:
        model = build_model(staged, NITPConfig(enabled=False), pre_process=rank == 0,
                            post_process=rank == size - 1)
    finally:
        monkeypatch.undo()
    initialize_weights(model, seed)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _layer(weights, index):
    prefix = f"decoder.layers.{index}."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def test_pipeline_stages_draw_their_global_layers_and_the_seed_matters(dist, monkeypatch):
    from tests.helpers import tiny_args

    args = tiny_args("--num-layers", "4", "--untie-embeddings-and-output-weights")
    full = _stage(monkeypatch, args, 0, 1, seed=7)
    first = _stage(monkeypatch, args, 0, 2, seed=7)
    second = _stage(monkeypatch, args, 1, 2, seed=7)
    assert len(_layer(second, 0)) == len(_layer(full, 2)) > 0
    for local in (0, 1):  # stage 1's layers are global layers 3 and 4, not stage 0's again
        for name, value in _layer(second, local).items():
            assert torch.equal(value, _layer(full, local + 2)[name]), name
            assert torch.equal(_layer(first, local)[name], _layer(full, local)[name]), name
            if "norm" not in name:  # norms start at ones everywhere
                assert not torch.equal(value, _layer(first, local)[name]), name
    assert torch.equal(first["embedding.word_embeddings.weight"],
                       full["embedding.word_embeddings.weight"])
    assert torch.equal(second["output_layer.weight"], full["output_layer.weight"])
    other = _stage(monkeypatch, args, 0, 1, seed=8)
    for name, value in full.items():
        if "norm" not in name:
            assert not torch.equal(value, other[name]), name


def test_rules_follow_megatron(dist):
    """Standard deviations and constants of the drawn tensors (a d=64 model: enough values)."""
    from megatron_nitp.models.initialization import init_rule, initialize_weights
    from megatron_nitp.nitp.config import NITPConfig
    from megatron_nitp.training.initialize import set_seed
    from megatron_nitp.training.model import build_model
    from tests.helpers import tiny_args

    set_seed(1)
    args = tiny_args("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
                     "--num-attention-heads", "4")
    model = build_model(args, NITPConfig(target_layer=1), True, True)
    initialize_weights(model, 3)
    std = args.model.init_method_std
    scaled = std / (2 * args.model.num_layers) ** 0.5
    params = dict(model.named_parameters())
    for name, param in params.items():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        want = scaled if any(s in name for s in ("linear_proj", "linear_fc2", "projector.down"))\
            else std
        assert param.mean().abs() < 0.2 * want, name
        assert param.std().item() == pytest.approx(want, rel=0.1), name
    config = model.config
    assert init_rule("decoder.layers.mlp.linear_fc1.layer_norm_weight", config) == "ones"
    assert init_rule("decoder.layers.1.mlp.router.weight", config) is config.init_method
    with pytest.raises(ValueError, match="no initialization rule"):
        init_rule("decoder.layers.mystery.scale", config)
