"""The objective seam: NTP, NITP, cosine regularization and megatron-core's multi-token
prediction are interchangeable training objectives (megatron_nitp/objectives/): each trains and
lowers its own loss, MTP's term enters the gradient with its factor (0 gives the baseline's
trajectory exactly), NITP + MTP train together, and the FLOPs tool's MTP arm is built through the
same seam."""

import json
import os

import pytest

from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.loop import pretrain

SMALL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
         "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3",
         "--lr-warmup-iters", "1", "--eval-interval", "0", "--no-save", "--no-plot",
         "--no-progress-bar", "--log-interval", "1000", "--geometry-interval", "0"]


def _train(tmp_path, name, *flags, iters=12):
    run_dir = str(tmp_path / name)
    pretrain(parse_args(SMALL + ["--train-iters", str(iters), "--run-dir", run_dir]
                        + list(flags)))
    with open(os.path.join(run_dir, "summary.json")) as f:
        history = json.load(f)["history"]
    return {k: [v for _, v in points] for k, points in history.items()}


def _falls(values, by):
    return sum(values[-3:]) / 3 < values[0] - by


OBJECTIVES = {
    "ntp": (["--no-nitp"], {"lm loss": 0.8}),
    "nitp": ([], {"lm loss": 0.8, "nitp loss": 0.3}),
    "cosine_reg": (["--nitp-objective", "cosine_reg"], {"lm loss": 0.3, "total loss": 0.3}),
    "nitp+cosine_reg": (["--nitp-cosine-reg-weight", "0.5"], {"lm loss": 0.3, "nitp loss": 0.3}),
    "nitp 2 layers 2 horizons": (["--nitp-extra-target-layers", "0", "--nitp-horizon", "2"],
                                 {"lm loss": 0.8, "nitp loss k=1 t+1": 0.3,
                                  "nitp loss k=1 t+2": 0.2, "nitp loss k=0 t+1": 0.1,
                                  "nitp loss k=0 t+2": 0.1}),
    "mtp": (["--no-nitp", "--mtp-num-layers", "1"], {"lm loss": 0.8, "mtp loss": 0.8}),
    "nitp+mtp": (["--mtp-num-layers", "1"], {"lm loss": 0.8, "nitp loss": 0.3,
                                             "mtp loss": 0.8}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_lowers_its_losses(dist, tmp_path, name):
    flags, drops = OBJECTIVES[name]
    history = _train(tmp_path, name, *flags)
    for key, by in drops.items():
        assert len(history[key]) == 12, key
        assert _falls(history[key], by), (key, history[key])
    assert ("mtp loss" in history) == ("mtp" in name)
    assert ("nitp loss" in history) == (name not in ("ntp", "mtp", "cosine_reg"))
    assert ("cosine reg loss" in history) == ("cosine_reg" in name)
    cosine_weight = 0.5 if name == "nitp+cosine_reg" else 1.0
    terms = [k for k in history if k.startswith("nitp loss k=")]
    assert len(terms) == (4 if "horizons" in name else 0)
    for i, total in enumerate(history["total loss"]):  # lm + lambda nitp + w cos + factor mtp
        zeros = [0.0] * 12
        if terms:  # lambda weighs the mean of the terms, logged as the nitp loss
            mean = sum(history[k][i] for k in terms) / len(terms)
            assert history["nitp loss"][i] == pytest.approx(mean, rel=1e-12)
        expected = (history["lm loss"][i]
                    + history["nitp weight"][i] * history.get("nitp loss", zeros)[i]
                    + cosine_weight * history.get("cosine reg loss", zeros)[i]
                    + 0.1 * history.get("mtp loss", zeros)[i])
        assert total == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_cosine_regularization_holds_the_cosine_down(dist, tmp_path):
    """Tokens' hidden states grow alike as the language model learns (the mean pairwise cosine
    rises from ~0.06); the regularizer's weight is what holds it down."""
    free = _train(tmp_path, "free", "--nitp-objective", "cosine_reg", "--nitp-loss-weight", "0")
    held = _train(tmp_path, "held", "--nitp-objective", "cosine_reg", "--nitp-loss-weight", "10")
    free, held = free["cosine reg loss"], held["cosine reg loss"]
    assert free[0] == pytest.approx(held[0], rel=1e-6)
    assert sum(free[-3:]) / 3 > 2 * sum(free[:3]) / 3
    assert sum(held[-3:]) < 0.5 * sum(free[-3:])


def test_mtp_enters_the_gradient_with_its_factor(dist, tmp_path):
    """The same seed and batches: MTP at factor 0 leaves the backbone's trajectory exactly as
    the baseline's (its blocks get no gradient into the backbone and are initialized from their
    own names), at factor 0.5 it changes it from the second iteration on."""
    base = _train(tmp_path, "base", "--no-nitp", iters=3)
    off = _train(tmp_path, "off", "--no-nitp", "--mtp-num-layers", "1",
                 "--mtp-loss-scaling-factor", "0", iters=3)
    on = _train(tmp_path, "on", "--no-nitp", "--mtp-num-layers", "1",
                "--mtp-loss-scaling-factor", "0.5", iters=3)
    assert off["lm loss"] == pytest.approx(base["lm loss"], rel=1e-6)
    assert on["lm loss"][0] == pytest.approx(base["lm loss"][0], rel=1e-6)
    assert on["lm loss"][2] != pytest.approx(base["lm loss"][2], rel=1e-4)
    assert on["mtp loss"][0] == pytest.approx(off["mtp loss"][0], rel=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--mtp-num-layers", "0"], "--mtp-num-layers 0 must be >= 1"),
    (["--mtp-num-layers", "1", "--pipeline-model-parallel-size", "2"],
     "--mtp-num-layers with --pipeline-model-parallel-size > 1 needs "
     "--untie-embeddings-and-output-weights"),
])
def test_mtp_that_cannot_run_is_refused(capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        parse_args(SMALL + ["--train-iters", "2"] + flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_flops_tool_builds_its_mtp_arm_through_the_seam(dist):
    from megatron_nitp.training.arms import build_arm

    config = parse_args(SMALL + ["--train-iters", "2"])
    run = build_arm("mtp", config)
    from megatron_nitp.training.model import unwrap

    model = unwrap(run.model)
    assert model.config.mtp_num_layers == 1 and model.mtp is not None
    assert model.projector is None and not run.args.nitp_config.enabled
