"""The launch scripts in examples/: every one dry-runs to a plan that fits an 80 GB GPU with the
paper's settings, and the launcher really starts a job through torchrun (tiny model, CPU)."""

import glob
import os
import re
import subprocess
import sys

import pytest

from megatron_nitp.presets import PRESETS
from tests.conftest import ROOT, clean_env, free_port

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")))
SBATCH = sorted(glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sbatch")))
PAPER = [name for name in PRESETS if not name.startswith("tiny")]
# Variables the scripts read: a caller's values must not leak into the checks.
SCRIPT_VARS = ("NNODES", "GPUS_PER_NODE", "TP", "PP", "EP", "MICRO_BATCH_SIZE",
               "GLOBAL_BATCH_SIZE", "TRAIN_TOKENS", "TRAIN_ITERS", "DATA_PATH", "TOKENIZER_MODEL",
               "VOCAB_SIZE", "RUN_DIR", "CHECKPOINT_PATH", "DATA_CACHE_PATH", "TENSORBOARD_DIR",
               "SAVE_INTERVAL",
               "MODEL", "NITP_ROOT", "DRY_RUN", "TORCHRUN", "RDZV_ID", "NITP_GPU_MEMORY_GIB",
               "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS",
               "SLURM_SUBMIT_DIR")


def _env(**extra):
    env = {k: v for k, v in clean_env().items() if k not in SCRIPT_VARS}
    env.update({"PYTHON": sys.executable, **extra})
    return env


def _preset_of(path: str) -> str:
    """examples/pretrain_moe_1.9b_a0.3b.sh -> moe-1.9b-a0.3b"""
    return os.path.basename(path)[len("pretrain_"):-len(".sh")].replace("_", "-")


@pytest.fixture(scope="module")
def command_lines(tmp_path_factory):
    """The command line every example and sbatch file runs with DRY_RUN=1, captured by a PYTHON
    that only records its arguments: the scripts' flag assembly runs for real (bash), the plans
    are then made in this process (one Python start instead of one per script)."""
    folder = tmp_path_factory.mktemp("argv")
    shim = folder / "python"
    shim.write_text('#!/bin/sh\nfor a in "$@"; do printf \'%s\\0\' "$a"; done > "$NITP_ARGV_FILE"\n')
    shim.chmod(0o755)
    lines = {}
    for path in SCRIPTS + SBATCH:
        record = folder / (os.path.basename(path) + ".argv")
        proc = subprocess.run(["bash", path], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=_env(DRY_RUN="1", PYTHON=str(shim),
                                                   NITP_ARGV_FILE=str(record)))
        assert proc.returncode == 0, (path, proc.stderr)
        lines[path] = record.read_text().split("\0")[:-1]
    return lines


def _plan(argv, capsys, monkeypatch):
    """Runs the recorded ``python ENTRY FLAGS --dry-run ...`` in this process."""
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.plan import GPU_MEMORY_ENV, dry_run

    for name in ("WORLD_SIZE", GPU_MEMORY_ENV):
        monkeypatch.delenv(name, raising=False)
    entry, flags = argv[0], argv[1:]
    assert os.path.dirname(os.path.abspath(entry)) == ROOT
    assert "--dry-run" in flags and "--world-size" in flags
    model_type = "moe" if os.path.basename(entry) == "pretrain_moe_nitp.py" else "dense"
    capsys.readouterr()
    code = dry_run(parse_args(flags, model_type=model_type))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_one_example_per_paper_model():
    assert sorted(_preset_of(path) for path in SCRIPTS) == sorted(PAPER)


@pytest.mark.parametrize("path", SCRIPTS + SBATCH + [os.path.join(ROOT, "examples", "lib",
                                                                  "launch.sh")],
                         ids=os.path.basename)
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_example_plan_fits_80gb_with_the_paper_settings(command_lines, capsys, monkeypatch,
                                                       path):
    code, out, err = _plan(command_lines[path], capsys, monkeypatch)
    assert code == 0, out + err
    preset = PRESETS[_preset_of(path)]
    assert f"model           {_preset_of(path)} (" in out
    assert "of 80 GiB ($NITP_GPU_MEMORY_GIB): fits" in out
    k, lam = preset["nitp_target_layer"], preset["nitp_loss_weight"]
    assert f"k={k} (layer {k}), lambda {lam:g}," in out
    assert f"= global batch {preset['global_batch_size']};" in out
    assert f"lr {preset['lr']:g} (WSD)" in out
    assert "bf16" in out and "distributed optimizer on" in out
    # the world is the script's NNODES x 8 GPUs
    nodes = int(re.search(r"NNODES=\$\{NNODES:-(\d+)\}", open(path).read()).group(1))
    assert f"world {nodes * 8} = " in out
    # the header states the estimate the plan prints
    stated = int(re.search(r"Estimated ~(\d+) GiB", open(path).read()).group(1))
    printed = float(re.search(r"estimate +([\d.]+) GiB", out).group(1))
    assert abs(printed - stated) <= 1.0, (stated, printed)


@pytest.mark.parametrize("path", SBATCH, ids=os.path.basename)
def test_sbatch_dry_run(command_lines, capsys, monkeypatch, path):
    code, out, err = _plan(command_lines[path], capsys, monkeypatch)
    assert code == 0, out + err
    assert ": fits" in out
    text = open(path).read()
    assert "#SBATCH" in text and "srun" in text
    if "tiny_cpu" not in path:
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
        assert "NCCL_" in text


@pytest.mark.parametrize("path", SCRIPTS + SBATCH, ids=os.path.basename)
def test_examples_put_the_dataset_cache_in_the_run_folder(command_lines, path):
    """megatron-core builds the dataset index cache on global rank 0 only: every launch passes
    --data-cache-path inside the run folder (shared by the nodes), never the container's
    default, and without DATA_PATH (built-in corpus) too."""
    argv = command_lines[path]
    assert argv.count("--data-cache-path") == 1, argv
    cache = argv[argv.index("--data-cache-path") + 1]
    run_dir = argv[argv.index("--run-dir") + 1]
    assert cache == os.path.join(run_dir, "data-cache")
    if path in SCRIPTS:
        env = _env(DRY_RUN="1", DATA_PATH="", PYTHON="echo")
        proc = subprocess.run(["bash", path], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        assert f"--data-cache-path {cache} " in proc.stdout


def test_dry_run_refuses_a_layout_that_does_not_fit():
    # a real `python ... --dry-run` (exit code through the script): the 45B model on 2 nodes
    # without pipeline parallelism does not fit
    script = os.path.join(ROOT, "examples", "pretrain_moe_45b_a5.5b.sh")
    proc = subprocess.run(["bash", script], cwd=ROOT, env=_env(DRY_RUN="1", NNODES="2", PP="1",
                                                             TP="2"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "exceeds the GPU memory" in proc.stderr


def test_launcher_runs_torchrun_on_cpu(tmp_path):
    """The non-dry path: torchrun with a c10d rendezvous, 2 processes, the 0.5B script's flags
    overridden down to the tiny model (extra flags come last and win)."""
    script = os.path.join(ROOT, "examples", "pretrain_dense_0.5b.sh")
    env = _env(NNODES="1", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DATA_PATH="", CHECKPOINT_PATH="",
               RUN_DIR=str(tmp_path / "run"),
               TORCHRUN=f"{sys.executable} -m torch.distributed.run", OMP_NUM_THREADS="1")
    flags = ["--preset", "tiny-dense", "--seq-length", "64", "--vocab-size", "4096",
             "--nitp-target-layer", "1", "--train-iters", "2", "--lr-warmup-iters", "0",
             "--micro-batch-size", "4", "--global-batch-size", "8", "--eval-interval", "0",
             "--log-interval", "1", "--geometry-interval", "0", "--no-save"]
    proc = subprocess.run(["bash", script, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    assert re.search(r"iteration +2/ +2", proc.stdout)
    assert os.listdir(tmp_path / "run" / "data-cache")  # the index cache went to the run folder
