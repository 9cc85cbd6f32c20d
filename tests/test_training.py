"""End-to-end training on the built-in corpus: losses fall, precision paths, summary files."""

import json
import math
import os
import re

import pytest
import torch

from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.loop import pretrain
from tests.helpers import TINY_MODEL, TINY_RUN

FAST = ["--eval-interval", "0", "--no-save", "--no-plot", "--no-progress-bar",
        "--log-interval", "1000", "--geometry-interval", "0"]


def _run(tmp_path, *flags):
    run_dir = str(tmp_path / "run")
    args = parse_args(list(flags) + FAST + ["--run-dir", run_dir])
    summary = pretrain(args)
    with open(os.path.join(run_dir, "summary.json")) as f:
        history = json.load(f)["history"]
    return summary, {k: [v for _, v in points] for k, points in history.items()}


@pytest.mark.slow
def test_thirty_iterations_lm_and_nitp_losses_fall(dist, tmp_path):
    summary, history = _run(tmp_path, "--train-iters", "30", "--lr-warmup-iters", "3")
    lm, nitp = history["lm loss"], history["nitp loss"]
    assert len(lm) == 30 and len(nitp) == 30
    # random init: lm loss near ln(vocab) = ln 4096 = 8.3, nitp loss near 1 (orthogonal)
    assert lm[0] == pytest.approx(math.log(4096), abs=0.3)
    assert nitp[0] == pytest.approx(1.0, abs=0.1)
    assert sum(lm[-5:]) / 5 < lm[0] - 1.5
    assert sum(nitp[-5:]) / 5 < 0.5 * nitp[0]
    # the summary's losses are means over the last logging interval: here (--log-interval
    # 1000) the one console line at iteration 30 averages all 30 iterations
    assert summary["nitp loss"] == pytest.approx(sum(nitp) / 30, rel=1e-12)
    assert summary["lm loss"] == pytest.approx(sum(lm) / 30, rel=1e-12)
    assert summary["nitp loss"] != pytest.approx(nitp[-1], rel=1e-3)
    # the logged total is lm + lambda * nitp, iteration by iteration
    for total, a, b in zip(history["total loss"], lm, nitp):
        assert total == pytest.approx(a + b, rel=1e-9)


def _console_losses(out):
    """{iteration: {loss: value}} of the console's training lines."""
    lines = {}
    for line in out.splitlines():
        match = re.match(r" iteration +(\d+)/", line)
        if match:
            lines[int(match.group(1))] = {k: float(v) for k, v in
                                          re.findall(r"\| ([a-z ]+ loss): (\S+)", line)}
    return lines


@pytest.mark.slow
def test_console_and_summary_losses_are_means_over_the_logging_interval(dist, tmp_path, capsys):
    """Megatron-LM's convention: the line at iteration N shows each loss averaged over the
    iterations since the previous line; history keeps every iteration's value."""
    run_dir = tmp_path / "run"
    summary = pretrain(parse_args(["--train-iters", "6", "--lr-warmup-iters", "0",
                                   "--log-interval", "4", "--eval-interval", "0", "--no-save",
                                   "--no-plot", "--no-progress-bar", "--geometry-interval", "0",
                                   "--run-dir", str(run_dir)]))
    out = capsys.readouterr().out
    with open(run_dir / "summary.json") as f:
        saved = json.load(f)
    history = {k: [v for _, v in points] for k, points in saved["history"].items()}
    assert [i for i, _ in saved["history"]["lm loss"]] == [1, 2, 3, 4, 5, 6]
    console = _console_losses(out)
    assert sorted(console) == [4, 6]
    for key in ("lm loss", "nitp loss", "total loss"):
        values = history[key]
        assert len(values) == 6 and len(set(values)) == 6
        # printed with 7 significant digits
        assert console[4][key] == pytest.approx(sum(values[:4]) / 4, rel=1e-6)
        assert console[6][key] == pytest.approx(sum(values[4:]) / 2, rel=1e-6)
        assert console[6][key] != pytest.approx(values[-1], rel=1e-4)
    for key in ("lm loss", "nitp loss"):
        assert summary[key] == pytest.approx(sum(history[key][4:]) / 2, rel=1e-12)
        assert saved["summary"][key] == summary[key]
    assert "lm loss (mean of iterations 5-6)" in out
    assert "nitp loss (mean of iterations 5-6)" in out


@pytest.mark.slow
def test_baseline_and_start_iteration(dist, tmp_path, capsys):
    summary, base = _run(tmp_path / "ntp", "--train-iters", "4", "--lr-warmup-iters", "0",
                         "--no-nitp")
    # an NTP run has no nitp loss: not in its history, on the console line, nor in the summary
    assert "nitp loss" not in base
    out = capsys.readouterr().out
    assert _console_losses(out)[4]["lm loss"] == pytest.approx(sum(base["lm loss"]) / 4, rel=1e-6)
    assert "nitp loss" not in out
    assert summary["nitp loss"] is None
    _, late = _run(tmp_path / "late", "--train-iters", "4", "--lr-warmup-iters", "0",
                   "--nitp-start-iter", "2")
    assert late["nitp weight"] == [0.0, 0.0, 1.0, 1.0]
    # lambda = 0 before the start iteration: the same trajectory as the baseline
    assert late["lm loss"][:3] == pytest.approx(base["lm loss"][:3], rel=1e-6)
    assert late["lm loss"][3] != pytest.approx(base["lm loss"][3], rel=1e-6)


@pytest.mark.slow
def test_bf16_run_is_finite_and_close_to_fp32(dist, tmp_path, monkeypatch):
    from megatron.core.transformer.module import Float16Module

    from megatron_nitp.training import loop
    from megatron_nitp.training.model import unwrap

    seen = []

    def probing_train_step(model, *args, **kwargs):
        """Records what training actually runs with: the wrappers, the weights' dtypes and the
        dtype of the decoder's output during the step's forward pass."""
        inner = unwrap(model)
        outputs = []
        hook = inner.decoder.register_forward_hook(lambda m, i, out: outputs.append(
            (out[0] if isinstance(out, tuple) else out).dtype))
        try:
            metrics = real_train_step(model, *args, **kwargs)
        finally:
            hook.remove()
        seen.append({
            "float16_module": any(isinstance(m, Float16Module) for m in model.modules()),
            "param_dtypes": {p.dtype for p in inner.parameters()},
            "decoder_output": set(outputs),
        })
        return metrics

    real_train_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", probing_train_step)
    flags = ["--train-iters", "6", "--lr-warmup-iters", "1"]
    _, fp32 = _run(tmp_path / "fp32", *flags)
    assert seen and all(s == {"float16_module": False, "param_dtypes": {torch.float32},
                              "decoder_output": {torch.float32}} for s in seen)
    seen.clear()
    _, bf16 = _run(tmp_path / "bf16", *flags, "--bf16")
    # bf16 is really used: Float16Module wraps the model, its weights are bf16 (all of them)
    # and the transformer computes in bf16, at every one of the 6 steps
    assert len(seen) == 6
    assert all(s == {"float16_module": True, "param_dtypes": {torch.bfloat16},
                     "decoder_output": {torch.bfloat16}} for s in seen)
    for key in ("lm loss", "nitp loss", "grad norm"):
        assert all(math.isfinite(v) for v in bf16[key])
    for a, b in zip(fp32["lm loss"], bf16["lm loss"]):
        assert b == pytest.approx(a, rel=0.02)
    # ... and it changes the numbers (a run silently falling back to fp32 would match exactly)
    assert bf16["lm loss"] != fp32["lm loss"]


@pytest.mark.slow
def test_geometry_is_logged_and_the_run_folder_is_complete(dist, tmp_path):
    run_dir = tmp_path / "full"
    args = parse_args(["--train-iters", "4", "--lr-warmup-iters", "0", "--geometry-interval", "2",
                       "--eval-interval", "2", "--eval-iters", "1", "--no-progress-bar",
                       "--run-dir", str(run_dir)])
    summary = pretrain(args)
    assert 1.0 <= summary["effective rank"] <= args.model.hidden_size
    assert -1.0 <= summary["cosine similarity"] <= 1.0
    assert (run_dir / "training.png").stat().st_size > 10_000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard"))
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert summary["validation lm loss"] is not None


def test_memory_is_logged_per_interval_with_the_plan_once(dist, tmp_path, capsys):
    """Each console line carries the interval's memory (max over ranks), the history and
    TensorBoard (with --log-memory-to-tensorboard) keep it at the logging iterations, the
    summary its peak, and --dry-run's estimate is printed beside the measured peak once, after
    the first line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_nitp.training.memory import TENSORBOARD_TAGS, MemoryMonitor, key

    run_dir = tmp_path / "run"
    summary = pretrain(parse_args(TINY_MODEL + TINY_RUN + [
        "--nitp-target-layer", "1", "--train-iters", "4", "--log-interval", "2", "--no-save",
        "--log-memory-to-tensorboard", "--run-dir", str(run_dir)]))
    out = capsys.readouterr().out
    peak_key = MemoryMonitor().peak_key  # CPU: the peak RSS of the interval
    with open(run_dir / "summary.json") as f:
        history = json.load(f)["history"]
    current = key("rss")
    assert [i for i, _ in history[peak_key]] == [2, 4]
    assert [i for i, _ in history[current]] == [2, 4]
    for (_, peak), (_, now) in zip(history[peak_key], history[current]):
        assert 50 < now <= peak < 100_000  # MB: a Python process with torch, below 100 GB
    lines = [line for line in out.splitlines() if re.match(r" iteration +\d+/", line)]
    assert len(lines) == 2
    for line, (_, peak) in zip(lines, history[peak_key]):
        assert "| memory (MB, max over ranks) rss: " in line
        shown = re.search(r"\| max rss(?: since start)?: ([\d.]+) \|", line)
        assert float(shown.group(1)) == pytest.approx(peak, abs=0.05)
    assert summary["peak memory (MB, max over ranks)"] == max(v for _, v in history[peak_key])
    planned = [line for line in out.splitlines() if line.startswith("> memory after iteration")]
    assert len(planned) == 1 and planned[0].startswith("> memory after iteration 2: peak ")
    assert re.search(r" vs [\d.]+ (GiB|MiB) planned per rank by --dry-run \(weights ", planned[0])
    number, unit = re.search(r"([\d.]+) (GiB|MiB) were resident before the first step",
                             planned[0]).groups()
    before = float(number) * (1024 if unit == "GiB" else 1)  # MB
    # printed to 2 decimals of GiB (a process past 1 GiB: up to 5.12 MB of rounding) or 1 of MiB
    rounding = 0.005 * 1024 if unit == "GiB" else 0.05
    assert 50 < before <= history[peak_key][0][1] + rounding + 0.1
    assert out.index(lines[0]) < out.index(planned[0]) < out.index(lines[1])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tag = TENSORBOARD_TAGS[peak_key]  # mem-max-rss-MB
    assert [e.step for e in events.Scalars(tag)] == [2, 4]
    assert events.Scalars(tag)[-1].value == pytest.approx(history[peak_key][-1][1], rel=1e-6)


def test_manual_gc_collects_at_megatron_lms_points_only(dist, tmp_path, monkeypatch, capsys):
    """--manual-gc --manual-gc-interval 2 with validation every 3 of 4 iterations: the
    automatic collector is off for the run and given back after it; full collections at the
    start, after steps 2 and 4 and before each validation, the youngest generation after it
    (Megatron-LM's points); without --manual-gc nothing is touched."""
    import gc as real_gc

    from megatron_nitp.training import loop, manual_gc

    events = []

    class Spy:
        def isenabled(self):
            return real_gc.isenabled()

        def disable(self):
            events.append("disable")
            real_gc.disable()

        def enable(self):
            events.append("enable")
            real_gc.enable()

        def collect(self, generation=2):
            events.append(f"collect {generation}" + ("" if real_gc.isenabled() else " (off)"))
            return 0

    train_step, evaluate = loop.train_step, loop.evaluate
    monkeypatch.setattr(manual_gc, "gc", Spy())
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: (
        events.append(f"step {a[5] + 1}"), train_step(*a, **k))[1])
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (
        events.append("validation"), evaluate(*a, **k))[1])
    flags = TINY_MODEL + ["--no-plot", "--no-progress-bar", "--geometry-interval", "0",
                          "--no-save", "--train-iters", "4", "--eval-interval", "3",
                          "--eval-iters", "1"]
    assert real_gc.isenabled()
    pretrain(parse_args(flags + ["--manual-gc", "--manual-gc-interval", "2",
                                 "--run-dir", str(tmp_path / "manual")]))
    assert events == [
        "disable", "collect 2 (off)", "step 1", "step 2", "collect 2 (off)",
        "step 3", "collect 2 (off)", "validation", "collect 0 (off)",
        "step 4", "collect 2 (off)", "collect 2 (off)", "validation", "collect 0 (off)",
        "enable"]
    assert real_gc.isenabled()
    events.clear()  # interval 0, and no collection around validation
    pretrain(parse_args(flags + ["--manual-gc", "--no-manual-gc-eval",
                                 "--run-dir", str(tmp_path / "start-only")]))
    assert events == ["disable", "collect 2 (off)", "step 1", "step 2", "step 3", "validation",
                      "step 4", "validation", "enable"]
    events.clear()
    pretrain(parse_args(flags + ["--run-dir", str(tmp_path / "automatic")]))
    assert [e for e in events if not e.startswith(("step", "validation"))] == []
    with pytest.raises(SystemExit):
        parse_args(flags + ["--manual-gc", "--manual-gc-interval", "-1"])
    assert "--manual-gc-interval -1 must be >= 0" in capsys.readouterr().err


def test_params_norm_and_num_zeros_equal_hand_counts(dist, tmp_path):
    """--log-params-norm and --log-num-zeros-in-grad on one process: after a step, 'params
    norm' is the L2 norm of every weight and 'num zeros' the number of gradient entries that
    are exactly 0 (with untied embeddings, the input embedding's rows of the tokens the step
    did not see); both on the console after the grad norm."""
    from megatron_nitp.training import loop
    from megatron_nitp.training.model import as_chunks
    from megatron_nitp.training.step import train_step

    args = parse_args(TINY_MODEL + TINY_RUN + [
        "--train-iters", "2", "--no-save", "--log-params-norm", "--log-num-zeros-in-grad",
        "--untie-embeddings-and-output-weights", "--run-dir", str(tmp_path / "run")])
    run = loop.setup(args)
    metrics = train_step(run.model, run.optimizer, run.scheduler, run.train_iter, run.args, 0,
                         False)
    params = [p for chunk in as_chunks(run.model) for p in chunk.parameters()]
    norm = math.sqrt(sum(float(p.detach().double().norm()) ** 2 for p in params))
    zeros = sum(int((p.main_grad == 0).sum()) for p in params)
    assert metrics["params norm"] == pytest.approx(norm, rel=1e-6)
    assert metrics["num zeros"] == zeros
    # the step's 4 x 16 tokens leave at least 4096 - 64 rows of 32 at 0
    assert zeros >= 32 * (run.args.derived.padded_vocab_size - 64)
    from megatron_nitp.training.logger import console_keys

    keys = console_keys(metrics)
    assert keys.index("num zeros") == keys.index("grad norm") + 1 == keys.index("params norm") - 1
