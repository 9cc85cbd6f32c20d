"""Telemetry flags: per-phase times (--timing-log-level), the straggler spread
(--log-straggler), memory in TensorBoard only with --log-memory-to-tensorboard, and Weights &
Biases (--wandb-*): a fake module in sys.modules records what the logger hands it, and the real
package (a test extra) runs in offline mode."""

import importlib.machinery
import json
import re
import sys
import time
import types

import pytest

from megatron_nitp.training import timers
from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.loop import UsageError, pretrain
from tests.helpers import TINY_MODEL, TINY_RUN

TINY = TINY_MODEL + TINY_RUN + ["--nitp-target-layer", "1", "--no-save", "--train-iters", "4",
                                "--log-interval", "2"]


class FakeWandb(types.ModuleType):
    """What the logger uses of wandb: ``init`` returning a run with ``log`` and ``finish``."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec finds it
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, scalars, step):
        self.logged.append((step, dict(scalars)))

    def finish(self):
        self.finished += 1


def _tags(tensorboard_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return events


def test_phase_times_straggler_and_wandb(dist, tmp_path, capsys, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "run"
    pretrain(parse_args(TINY + [
        "--timing-log-level", "2", "--log-straggler", "--wandb-project", "nitp-test",
        "--wandb-exp-name", "tiny", "--run-dir", str(run_dir)]))
    out = capsys.readouterr().out
    with open(run_dir / "summary.json") as f:
        history = json.load(f)["history"]
    lines = [line for line in out.splitlines() if re.match(r" iteration +\d+/", line)]
    assert len(lines) == 2
    for line, iteration in zip(lines, (2, 4)):
        step = float(re.search(r"elapsed time per iteration \(ms\): ([\d.]+)", line).group(1))
        value = {p: dict(history[timers.key(p)])[iteration] for p in timers.LEVELS[2]}
        assert all(v >= 0 for v in value.values())
        # the disjoint phases add up to at most the step time (one rank: no max over ranks)
        assert sum(value[p] for p in timers.LEVELS[1]) <= step + 0.1, (value, step)
        assert value[timers.FORWARD_BACKWARD] > 0 and value[timers.OPTIMIZER] > 0
        assert value[timers.GRAD_REDUCE] <= value[timers.FORWARD_BACKWARD]
        assert value[timers.ROUTING_WAIT] == 0  # one stage: nothing to route
        assert f"forward-backward: {value[timers.FORWARD_BACKWARD]:.1f}" in line
        assert re.search(r"straggler compute \(ms\): min [\d.]+ \(rank 0\), max [\d.]+ "
                         r"\(rank 0\), spread 0.0%", line)
    events = _tags(run_dir / "tensorboard")
    tags = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("forward-backward-time")] == [2, 4]
    assert "nitp-routing-wait-time" in tags and "straggler-max-ms" in tags
    assert not any(tag.startswith("mem-") for tag in tags)  # no --log-memory-to-tensorboard
    assert "max rss" in lines[0]  # the console keeps the memory figures
    (init,) = fake.inits
    assert init["project"] == "nitp-test" and init["name"] == "tiny"
    assert init["dir"] == str(run_dir / "wandb") and init["config"]["logging"]["log_straggler"]
    steps = [step for step, _ in fake.logged]
    assert steps == [1, 2, 3, 4]
    assert set(fake.logged[1][1]) >= {"lm loss", "nitp loss", "forward-backward-time"}
    assert fake.finished == 1


def test_level_zero_logs_no_phase_and_memory_goes_to_tensorboard_when_asked(dist, tmp_path,
                                                                            capsys):
    run_dir = tmp_path / "run"
    pretrain(parse_args(TINY + ["--log-memory-to-tensorboard", "--run-dir", str(run_dir)]))
    out = capsys.readouterr().out
    assert "time per iteration (ms, max" not in out and "straggler compute" not in out
    with open(run_dir / "summary.json") as f:
        assert not any(k.startswith("time ") for k in json.load(f)["history"])
    assert any(tag.startswith("mem-") for tag in _tags(run_dir / "tensorboard").Tags()["scalars"])


def test_missing_wandb_is_refused_before_any_work(dist, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: None
    with pytest.raises(UsageError, match="pip install wandb"):
        pretrain(parse_args(TINY + ["--wandb-project", "p", "--run-dir", str(tmp_path / "r")]))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_wandb_offline_run_records_the_metrics(dist, tmp_path, capsys, monkeypatch):
    """The real wandb package in offline mode (nothing leaves the machine): the run folder under
    --wandb-save-dir holds the run, and its summary has the last logged losses."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    save_dir = tmp_path / "wb"
    pretrain(parse_args(TINY + ["--wandb-project", "nitp-test", "--wandb-exp-name", "offline",
                                "--wandb-save-dir", str(save_dir),
                                "--run-dir", str(tmp_path / "run")]))
    runs = sorted((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(save_dir.rglob("*"))[:20]
    records = list(runs[0].glob("*.wandb"))
    assert len(records) == 1, "the run's record file (what `wandb sync` uploads)"
    # the records are protobufs (no Python reader in wandb >= 0.2x): the logged tags and the
    # run's name are in them as strings
    deadline = time.time() + 30  # wandb-core may still be flushing the file
    while b"lm loss" not in records[0].read_bytes() and time.time() < deadline:
        time.sleep(0.5)
    data = records[0].read_bytes()
    for tag in (b"lm loss", b"nitp loss", b"grad-norm", b"learning-rate", b"offline",
                b"nitp-test"):
        assert tag in data, tag
    assert wandb.run is None  # finished


def test_megatron_lms_tensorboard_flags(dist, tmp_path):
    """--tensorboard-log-interval 2 writes the training scalars at 2 and 4 of 4 iterations
    while the history keeps all 4; --log-batch-size-to-tensorboard writes
    'batch-size'; --log-validation-ppl-to-tensorboard writes exp(validation lm loss) at each
    validation (written whatever the interval)."""
    import math

    run_dir = tmp_path / "run"
    pretrain(parse_args(TINY_MODEL + [
        "--nitp-target-layer", "1", "--no-save", "--no-plot", "--no-progress-bar",
        "--geometry-interval", "0", "--train-iters", "4", "--eval-interval", "3",
        "--eval-iters", "1", "--tensorboard-log-interval", "2", "--tensorboard-queue-size", "3",
        "--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--run-dir", str(run_dir)]))
    with open(run_dir / "summary.json") as f:
        history = json.load(f)["history"]
    assert [i for i, _ in history["lm loss"]] == [1, 2, 3, 4]
    events = _tags(run_dir / "tensorboard")
    assert [e.step for e in events.Scalars("lm loss")] == [2, 4]
    assert [(e.step, e.value) for e in events.Scalars("batch-size")] == [(2, 4.0), (4, 4.0)]
    validation = dict(history["validation lm loss"])
    assert sorted(validation) == [3, 4]
    ppl = [(e.step, e.value) for e in events.Scalars("lm loss validation ppl")]
    assert [step for step, _ in ppl] == [3, 4]
    for step, value in ppl:
        assert value == pytest.approx(math.exp(validation[step]), rel=1e-6)
    assert [e.step for e in events.Scalars("lm loss validation")] == [3, 4]
