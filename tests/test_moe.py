"""MoE NITP: expert parallelism equals one process, a tiny MoE learns and uses every expert,
the paper presets' parameter counts match their names, and bad MoE input is refused.

test_expert_parallel_equals_single_process: from one initial checkpoint, each layout (EP2,
EP2 x PP2, TP2+SP with EP2) with each token dispatcher (alltoall, allgather) trains 3
iterations and must match the one-process run of that dispatcher: per-iteration lm loss, nitp
loss, load-balancing loss and grad norm to a relative 1e-5, a nitp loss > 0 at every step, and
the whole checkpoint state after the steps (backbone, experts, routers, projector, and the
optimizer's exp_avg and exp_avg_sq of every parameter; see parallel_runs.assert_state_close),
with every replicated copy equal to the saved one. Layouts of one world size run in one launch.
"""

import pytest

from megatron_nitp.accounting.preset_table import preset_counts
from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.loop import pretrain
from tests.helpers import measured_counts
from tests.parallel_runs import FLAGS, Launcher, assert_state_close

MOE = FLAGS + [
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
    "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0]*1+[1]*3",
    "--nitp-target-layer", "1", "--untie-embeddings-and-output-weights",
]
DISPATCHERS = ["alltoall", "allgather"]
EP2 = ["--expert-model-parallel-size", "2"]
# name: (world size, flags)
LAYOUTS = {
    "ep2": (2, EP2),
    "ep2xpp2": (4, EP2 + ["--pipeline-model-parallel-size", "2"]),
    "tp2-sp-ep2": (4, EP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    # whole experts per rank under TP 2 (expert TP 1, expert data parallel 2)
    "tp2-sp-ep2-etp1": (4, EP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--expert-tensor-parallel-size", "1"]),
}

# DeepSeek-V3-style routing: sigmoid scores, the aux-loss-free expert bias (updated after each
# step from the tokens each expert got), the per-sequence balancing loss, and ST-MoE's z-loss
ROUTER = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
          "--moe-router-bias-update-rate", "0.01",
          "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-z-loss-coeff", "1e-3"]


@pytest.fixture(scope="module")
def moe_results(tmp_path_factory):
    """Results by run name: the one-process references (the alltoall one writes the initial
    checkpoint), then one launch per world size."""
    root = tmp_path_factory.mktemp("moe")
    init = str(root / "init")
    groups = {1: {}}
    for dispatcher in DISPATCHERS:
        first = not groups[1]
        groups[1][f"ref-{dispatcher}"] = MOE + ["--moe-token-dispatcher-type", dispatcher,
                                                "--save-init" if first else "--load", init]
        for layout, (nproc, flags) in LAYOUTS.items():
            groups.setdefault(nproc, {})[f"{layout}-{dispatcher}"] = (
                MOE + ["--moe-token-dispatcher-type", dispatcher, "--load", init] + flags)
    # the router's other settings, with their own initial checkpoint (the expert bias)
    groups[1]["ref-router"] = MOE + ROUTER + ["--save-init", str(root / "init-router")]
    groups.setdefault(4, {})["tp2-sp-ep2-router"] = (MOE + ROUTER + ["--load", str(root / "init-router")]
                                      + LAYOUTS["tp2-sp-ep2"][1])
    # the interleaved schedule (2 chunks of 1 layer per rank) under EP2 x PP2, NITP's layer 1
    # routed from rank 0's first chunk to rank 1's last
    groups.setdefault(4, {})["ep2xpp2-vpp2"] = MOE + EP2 + [
        "--moe-token-dispatcher-type", DISPATCHERS[0], "--load", init,
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    launcher = Launcher(root, groups)

    def get(name):
        if name.endswith("router"):
            launcher("ref-router")
        launcher(f"ref-{DISPATCHERS[0]}")  # every layout loads the initial checkpoint it writes
        return launcher(name)

    return get


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_equals_single_process(moe_results, dispatcher, layout):
    ref_metrics, ref_state, _ = moe_results(f"ref-{dispatcher}")
    metrics, state, _ = moe_results(f"{layout}-{dispatcher}")
    name = f"{layout}-{dispatcher}"
    assert len(metrics) == len(ref_metrics) == 3
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        assert got["nitp loss"] > 0 and want["nitp loss"] > 0, (name, step)
        for key in ("lm loss", "nitp loss", "load balancing loss", "grad norm", "params norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (name, step, key)
    assert_state_close(state, ref_state, name)


@pytest.mark.distributed
def test_router_settings_under_tp_sp_ep_equal_single_process(moe_results):
    """Sigmoid routing with the expert bias, the per-sequence balancing loss and the z-loss
    under TP2+SP, EP2: the losses (z-loss included), the grad norm and the whole state (the
    expert biases after their updates included) equal one process."""
    ref_metrics, ref_state, _ = moe_results("ref-router")
    metrics, state, _ = moe_results("tp2-sp-ep2-router")
    biases = [key for key in ref_state["tensors"] if key.endswith("router.expert_bias")]
    assert biases, "the expert bias is in the checkpoint state"
    assert any(ref_state["tensors"][key].abs().sum() > 0 for key in biases), "updated"
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        assert got["z loss"] > 0 and got["load balancing loss"] > 0, step
        for key in ("lm loss", "nitp loss", "load balancing loss", "z loss", "grad norm",
                    "params norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
    assert_state_close(state, ref_state, "tp2-sp-ep2-router")


@pytest.mark.distributed
def test_expert_parallel_under_the_interleaved_schedule_equals_single_process(moe_results):
    """EP2 x PP2 with 2 model chunks per rank (dense layer 1 and MoE layer 3 on rank 0, MoE
    layers 2 and 4 on rank 1), NITP's target routed from rank 0's first chunk: losses,
    load-balancing loss, grad norm and the whole state equal one process."""
    ref_metrics, ref_state, _ = moe_results(f"ref-{DISPATCHERS[0]}")
    metrics, state, _ = moe_results("ep2xpp2-vpp2")
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        assert got["load balancing loss"] > 0 and got["nitp loss"] > 0, step
        assert got["routed bytes per step"] > 0, step
        for key in ("lm loss", "nitp loss", "load balancing loss", "grad norm", "params norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
    assert_state_close(state, ref_state, "ep2xpp2-vpp2")


@pytest.mark.slow
def test_tiny_moe_learns_and_every_expert_receives_tokens(dist, tmp_path):
    from megatron.core.transformer.moe.router import TopKRouter

    args = parse_args(["--train-iters", "30", "--lr-warmup-iters", "3", "--eval-interval", "0",
                       "--no-save", "--no-plot", "--no-progress-bar", "--log-interval", "1000",
                       "--geometry-interval", "0", "--run-dir", str(tmp_path / "run")],
                      model_type="moe")
    counts = {}
    original = TopKRouter.forward

    def counting_forward(self, *a, **kw):
        probs, routing_map = original(self, *a, **kw)
        key = self.layer_number
        counts[key] = counts.get(key, 0) + routing_map.sum(dim=0).cpu()
        return probs, routing_map

    TopKRouter.forward = counting_forward
    try:
        pretrain(args)
    finally:
        TopKRouter.forward = original
    import json

    history = json.load(open(tmp_path / "run" / "summary.json"))["history"]
    lm = [v for _, v in history["lm loss"]]
    nitp = [v for _, v in history["nitp loss"]]
    balance = [v for _, v in history["load balancing loss"]]
    assert sum(lm[-5:]) / 5 < lm[0] - 1.5
    assert sum(nitp[-5:]) / 5 < 0.5 * nitp[0]
    assert all(0.5 < b < 8 for b in balance)  # 1.0 = perfectly balanced
    assert sorted(counts) == [2, 3, 4]  # layer 1 is the dense stage
    for layer, per_expert in counts.items():
        assert per_expert.shape == (8,)
        assert (per_expert > 0).all(), f"layer {layer}: an expert received no token {per_expert}"


# Names promise "about": tolerance 10% on total and active. Measured (README table): 0.49B,
# 2.10B, 3.03B dense (tied embeddings, Qwen2 style); MoE 1.84B/0.29B, 3.20B/0.47B, 8.75B/1.06B,
# 44.94B/5.54B (untied; active includes embedding and output matrices, shared expert, router).
@pytest.mark.parametrize("name,total,active", [
    ("dense-0.5b", 0.5e9, 0.5e9), ("dense-2b", 2e9, 2e9), ("dense-3b", 3e9, 3e9),
    ("moe-1.9b-a0.3b", 1.9e9, 0.3e9), ("moe-3b-a0.5b", 3e9, 0.5e9),
    ("moe-9b-a1b", 9e9, 1e9), ("moe-45b-a5.5b", 45e9, 5.5e9),
])
def test_paper_preset_parameter_counts_match_their_names(dist, name, total, active):
    counts = measured_counts(name)
    assert preset_counts(name) == counts  # the --list-presets table counts what is built
    assert counts["total_params"] == pytest.approx(total, rel=0.10)
    assert counts["active_params"] == pytest.approx(active, rel=0.10)
    d = counts["hidden_size"]
    assert counts["projector_params"] == 12 * d * d


def _error(capsys, argv, model_type):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, model_type=model_type)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_moe_input_is_refused(capsys):
    assert "not divisible by --expert-model-parallel-size 3" in _error(
        capsys, ["--expert-model-parallel-size", "3"], "moe")
    assert "--moe-router-topk 9 must be between 1 and --num-experts 8" in _error(
        capsys, ["--moe-router-topk", "9"], "moe")
    err = _error(capsys, ["--num-experts", "8"], "dense")
    assert "--num-experts is for mixture-of-experts models: use pretrain_moe_nitp.py" in err
    err = _error(capsys, ["--preset", "moe-9b-a1b"], "dense")
    assert "use pretrain_moe_nitp.py" in err
    assert "is a dense model" in _error(capsys, ["--preset", "dense-2b"], "moe")
    err = _error(capsys, ["--preset", "moe-10b"], "moe")
    assert "unknown --preset 'moe-10b'" in err and "moe-9b-a1b" in err


def test_a_moe_model_of_another_depth_later_in_the_process_logs_its_own_layers(dist):
    """megatron-core's router-loss tracker is module-level and sized by the first MoE model
    that logs; building a model empties it (``training.model.clear_moe_tracker``: 0.19 keeps
    it in ``moe_logging``, where clearing the legacy accessor's copy did nothing). A 4-layer
    model after a 2-layer one logs 4 layers instead of indexing past 2 (an export after
    training, in-process tests)."""
    import torch
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_nitp.config import resolve
    from megatron_nitp.nitp.config import NITPConfig
    from megatron_nitp.training.model import build_model
    from tests.helpers import TINY_MODEL

    for layers in (2, 4):
        args = resolve(parse_args(TINY_MODEL + [
            "--num-layers", str(layers), "--num-experts", "4", "--moe-router-topk", "2",
            "--moe-ffn-hidden-size", "32", "--moe-layer-freq", "1", "--nitp-target-layer", "1",
            "--train-iters", "4"], model_type="moe"), 1, 128)
        model = build_model(args, NITPConfig(target_layer=1), True, True)
        model.train()
        tokens = torch.randint(0, 100, (2, args.model.seq_length),
                               generator=torch.Generator().manual_seed(layers))
        positions = torch.arange(args.model.seq_length).expand(2, -1)
        model(tokens, positions, None, labels=tokens, loss_mask=torch.ones(2, 16))
        values = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
        assert values.shape == (layers,) and bool((values > 0).all()), values
