"""Planned exits (training/exits.py): a signal, a wall-clock budget and an iteration interval
each stop every rank after the same step with a loadable checkpoint and their own exit code;
the next run resumes at the following iteration."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron_nitp.config.resolve import signal_number
from megatron_nitp.training import exits
from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.loop import pretrain
from tests.helpers import ROOT, TINY_MODEL, TINY_RUN, clean_env, free_port, kill_group

TINY = TINY_MODEL + TINY_RUN + ["--nitp-target-layer", "1", "--log-interval", "1"]


def _history(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        history = json.load(f)["history"]
    return {key: [int(i) for i, _ in points] for key, points in history.items()}


def _latest(ckpt):
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


def _resume(tmp_path, ckpt, stopped_at, capsys, *flags):
    """A run loading ``ckpt`` continues at ``stopped_at + 1`` (two more iterations; a shorter
    --train-iters than the stopped run's, so on the checkpoint's schedule)."""
    run_dir = tmp_path / "resumed"
    pretrain(parse_args(TINY + list(flags) + [
        "--train-iters", str(stopped_at + 2), "--load", str(ckpt), "--no-save",
        "--use-checkpoint-opt_param-scheduler", "--run-dir", str(run_dir)]))
    out = capsys.readouterr().out
    assert f"at iteration {stopped_at} " in out
    assert _history(run_dir)["lm loss"] == [stopped_at + 1, stopped_at + 2]


def test_signal_names_and_bad_values_name_the_fix():
    assert signal_number("SIGUSR1") == signal.SIGUSR1
    assert signal_number("usr2") == signal.SIGUSR2
    assert signal_number(str(int(signal.SIGTERM))) == signal.SIGTERM
    for bad in ("SIGNOPE", "SIGKILL", "0"):
        with pytest.raises(ValueError, match="SIGUSR1"):
            signal_number(bad)
    for flags in (["--exit-signal", "SIGFOO"], ["--exit-interval", "0"],
                  ["--exit-duration-in-mins", "-1"]):
        with pytest.raises(SystemExit) as err:
            parse_args(TINY + ["--train-iters", "4"] + flags)
        assert err.value.code == 2
    codes = {exits.EXIT_SIGNAL, exits.EXIT_DURATION, exits.EXIT_INTERVAL,
             exits.EXIT_NON_FINITE, 0, 1, 2}
    assert len(codes) == 7  # each reason its own code


def test_interval_exit_saves_and_resumes_at_the_next_iteration(dist, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        pretrain(parse_args(TINY + ["--train-iters", "6", "--exit-interval", "2", "--no-save",
                                    "--run-dir", str(run_dir)]))
    assert err.value.code == exits.EXIT_INTERVAL == 77
    out = capsys.readouterr().out
    assert "> exit after iteration 2: --exit-interval 2; saved checkpoint" in out
    assert "exiting with code 77" in out
    ckpt = run_dir / "checkpoints"  # written although --no-save: see training/exits.py
    assert _latest(ckpt) == 2
    _resume(tmp_path, ckpt, 2, capsys)


def test_duration_exit_saves_once_and_resumes(dist, tmp_path, capsys):
    """A budget already spent at the first step: exit after it, with code 76; a checkpoint of
    the same iteration by --save-interval is not written twice."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        pretrain(parse_args(TINY + ["--train-iters", "6", "--exit-duration-in-mins", "1e-6",
                                    "--save-interval", "1", "--run-dir", str(run_dir)]))
    assert err.value.code == exits.EXIT_DURATION == 76
    out = capsys.readouterr().out
    assert re.search(r"> exit after iteration 1: --exit-duration-in-mins 1e-06 reached", out)
    assert out.count("saved checkpoint") == 2  # the interval's line and the exit's line
    ckpt = run_dir / "checkpoints"
    assert _latest(ckpt) == 1 and sorted(os.listdir(ckpt)) == [
        "iter_0000001", "latest_checkpointed_iteration.txt"]
    _resume(tmp_path, ckpt, 1, capsys)


def test_the_last_iteration_ends_the_run_normally(dist, tmp_path):
    """An exit interval that divides --train-iters: the run completes (exit code 0 path)."""
    summary = pretrain(parse_args(TINY + ["--train-iters", "2", "--exit-interval", "2",
                                          "--no-save", "--run-dir", str(tmp_path / "run")]))
    assert summary["iterations"] == 2


def _launch_ranks(run_dir, flags, world=2):
    """``world`` ranks started as srun starts them (one process per rank, env:// rendezvous),
    all in one new process group, as the tasks of a SLURM job step: returns the Popens."""
    port = str(free_port())
    procs = []
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt_nitp.py")] + flags
    for rank in range(world):
        env = clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=ROOT)
        out = open(f"{run_dir}.rank{rank}.out", "w")
        group = procs[0].pid if procs else 0  # rank 0 leads a new group, the others join
        try:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, text=True,
                                          process_group=group))
        except OSError:
            for proc in procs:
                kill_group(proc)
            raise
    return procs


@pytest.mark.distributed
@pytest.mark.slow
def test_signal_to_the_process_group_exits_75_with_a_checkpoint(dist, tmp_path, capsys):
    """SIGUSR1 (--exit-signal SIGUSR1, what #SBATCH --signal sends) to every rank of a
    2-stage pipeline: both finish the step, write one checkpoint and exit with 75; the
    checkpoint resumes in one process at the next iteration. The same run checks the timing
    figures of a pipeline: the NITP routing wait on the last stage, a straggler line naming
    both ranks."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    flags = TINY[:] + ["--num-layers", "4", "--pipeline-model-parallel-size", "2",
                       "--train-iters", "500", "--exit-signal-handler", "--exit-signal",
                       "SIGUSR1", "--timing-log-level", "2", "--log-straggler",
                       "--distributed-backend", "gloo", "--run-dir", str(run_dir)]
    procs = _launch_ranks(run_dir, flags)
    log = f"{run_dir}.rank0.out"
    try:
        deadline = time.time() + 300
        while not re.search(r" iteration +2/", open(log).read()):
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                open(log).read()[-5000:]
            time.sleep(0.5)
        os.killpg(procs[0].pid, signal.SIGUSR1)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for proc in procs:
            kill_group(proc)
    out = open(log).read()
    assert codes == [exits.EXIT_SIGNAL] * 2, out[-5000:]
    stopped = int(re.search(r"> exit after iteration (\d+): SIGUSR1", out).group(1))
    assert 2 <= stopped < 500
    assert _latest(run_dir / "checkpoints") == stopped
    lines = [line for line in out.splitlines() if re.match(r" iteration +\d+/", line)]
    for line in lines:
        step = float(re.search(r"elapsed time per iteration \(ms\): ([\d.]+)", line).group(1))
        phases = {name: float(value) for name, value in re.findall(
            r"(data loading|forward-backward|gradient reduction|nitp routing wait|optimizer): "
            r"([\d.]+)", line)}
        assert len(phases) == 5 and all(0 <= v <= step for v in phases.values()), line
        assert phases["gradient reduction"] <= phases["forward-backward"]
        assert phases["nitp routing wait"] <= phases["forward-backward"]
        ranks = re.search(r"straggler compute \(ms\): min [\d.]+ \(rank (\d)\), max [\d.]+ "
                          r"\(rank (\d)\)", line).groups()
        assert set(ranks) <= {"0", "1"}
    assert any(float(re.search(r"nitp routing wait: ([\d.]+)", line).group(1)) > 0
               for line in lines)
    _resume(tmp_path, run_dir / "checkpoints", stopped, capsys, "--num-layers", "4")


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_continues_the_run_folder(
        dist, tmp_path, capsys, monkeypatch):
    """Ctrl-C during iteration 3 (checkpoint at 2): exit code 130 and one line naming the
    checkpoint and the command that resumes; that command, run, continues the same run folder,
    whose summary.json and training.png then cover iterations 1-4. An NTP run's validation
    line and history have no nitp loss."""
    import shlex

    from megatron_nitp.training import loop

    run_dir = tmp_path / "run"
    flags = [f for f in TINY if f != "--no-plot"] + [
        "--train-iters", "4", "--save-interval", "2", "--eval-interval", "2", "--eval-iters",
        "1", "--no-nitp", "--run-dir", str(run_dir)]
    real_step, calls = loop.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted_step)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt_nitp.py"] + flags)
    with pytest.raises(SystemExit) as err:
        pretrain(parse_args(flags))
    assert err.value.code == loop.EXIT_INTERRUPTED == 130
    out, stderr = capsys.readouterr()
    ckpt = run_dir / "checkpoints"
    prefix = (f"interrupted (Ctrl-C) after iteration 2: last checkpoint {ckpt}/iter_0000002; "
              "resume with: python pretrain_gpt_nitp.py ")
    assert stderr.startswith(prefix) and stderr.count("\n") == 1, stderr
    assert stderr.rstrip().endswith(f"--load {ckpt} --run-dir {run_dir}")
    assert " validation loss at iteration 2 | lm loss value: " in out
    assert "nitp loss" not in out
    assert not (run_dir / "summary.json").exists()

    monkeypatch.setattr(loop, "train_step", real_step)
    command = shlex.split(stderr.strip().split("resume with: ")[1])
    assert command[:2] == ["python", "pretrain_gpt_nitp.py"]
    summary = pretrain(parse_args(command[2:]))
    assert summary["segments"] == 2 and "nitp loss" not in capsys.readouterr().out
    history = _history(run_dir)
    assert history["lm loss"] == [1, 2, 3, 4]
    assert history["validation lm loss"] == [2, 4]
    assert not any("nitp" in key and "validation" in key for key in history)
    assert (run_dir / "training.png").exists()


@pytest.mark.distributed
def test_ctrl_c_in_a_terminal_exits_130_without_a_traceback(tmp_path):
    """A real SIGINT to the process group (what Ctrl-C in a terminal sends) while training and
    saving every iteration (so it usually lands in a save, whose forked writers it reaches
    too): exit code 130, no traceback, the last line names the last complete checkpoint."""
    run_dir = tmp_path / "run"
    flags = TINY + ["--train-iters", "500", "--save-interval", "1", "--run-dir", str(run_dir)]
    (proc,) = _launch_ranks(run_dir, flags, world=1)
    log = f"{run_dir}.rank0.out"
    try:
        deadline = time.time() + 300
        while "saved checkpoint" not in open(log).read():
            assert time.time() < deadline and proc.poll() is None, open(log).read()[-5000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        kill_group(proc)
    out = open(log).read()
    assert code == 130, out[-5000:]
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    ckpt = run_dir / "checkpoints"
    assert re.fullmatch(rf"interrupted \(Ctrl-C\) after iteration \d+: last checkpoint "
                        rf"{ckpt}/iter_{_latest(ckpt):07d}; resume with: python \S+ .* --load "
                        rf"{ckpt} --run-dir {run_dir}", last), last


def test_the_resume_command_replaces_load_and_run_dir(monkeypatch):
    from megatron_nitp.training.loop import resume_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["pretrain_gpt_nitp.py", "--load=old", "--lr", "1e-3", "--run-dir", "other dir",
            "--save", "ck"]
    assert resume_command(argv, "ck", "runs/a b") == (
        "python pretrain_gpt_nitp.py --lr 1e-3 --save ck --load ck --run-dir 'runs/a b'")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resume_command(argv[:1], "ck", "r").startswith(
        "torchrun --nproc-per-node=4 pretrain_gpt_nitp.py --load ck")
