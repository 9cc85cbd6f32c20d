"""Bad input is refused before any work, with a message that names the fix; --help works for
both entry scripts and every tool."""

import glob
import os
import subprocess
import sys

import pytest

from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.loop import UsageError, pretrain
from tests.helpers import ROOT, clean_env


def _parse_error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        parse_args(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_target_layer_out_of_range(capsys):
    err = _parse_error(capsys, "--num-layers", "4", "--nitp-target-layer", "4")
    assert "--nitp-target-layer 4 is outside 0..3" in err
    err = _parse_error(capsys, "--nitp-target-layer", "-1")
    assert "outside 0..3" in err


def test_negative_lambda(capsys):
    assert "lambda must be >= 0" in _parse_error(capsys, "--nitp-loss-weight", "-0.5")


def test_unknown_loss_kind_and_projector(capsys):
    err = _parse_error(capsys, "--nitp-loss-kind", "huber")
    assert "unknown --nitp-loss-kind 'huber'" in err and "cosine" in err
    assert "unknown --nitp-projector" in _parse_error(capsys, "--nitp-projector", "mlp3")


def test_unknown_preset_lists_valid_ones(capsys):
    err = _parse_error(capsys, "--preset", "dense-7b")
    assert "unknown --preset 'dense-7b'" in err and "tiny-dense" in err


def test_heads_not_divisible_by_tensor_parallel(capsys):
    err = _parse_error(capsys, "--tensor-model-parallel-size", "3")
    assert "not divisible by --tensor-model-parallel-size 3" in err


def _usage_error(tmp_path, *argv):
    args = parse_args(list(argv) + ["--run-dir", str(tmp_path / "run"), "--no-progress-bar"])
    with pytest.raises(UsageError) as exc:
        pretrain(args)
    assert not (tmp_path / "run").exists(), "nothing may be written before the checks pass"
    return str(exc.value)


def test_global_batch_not_divisible(dist, tmp_path):
    msg = _usage_error(tmp_path, "--micro-batch-size", "3", "--global-batch-size", "16")
    assert "--global-batch-size 16 is not divisible by --micro-batch-size 3" in msg


def test_missing_data_path(dist, tmp_path):
    model = tmp_path / "sp.model"
    model.write_bytes(b"")
    msg = _usage_error(tmp_path, "--data-path", str(tmp_path / "nope_text_document"),
                       "--tokenizer-model", str(model))
    assert "nope_text_document" in msg


def test_data_path_without_tokenizer(dist, tmp_path):
    msg = _usage_error(tmp_path, "--data-path", str(tmp_path / "x_text_document"))
    assert "--tokenizer-model" in msg


def test_tokenizer_vocabulary_larger_than_model(dist, tmp_path):
    msg = _usage_error(tmp_path, "--vocab-size", "100")
    assert "larger than --vocab-size 100" in msg


@pytest.mark.distributed
def test_entry_script_prints_error_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "pretrain_gpt_nitp.py", "--nitp-loss-weight", "-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "lambda must be >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unsupported_layouts_are_refused_at_start_up(capsys):
    err = _parse_error(capsys, "--pipeline-model-parallel-size", "2",
                       "--virtual-pipeline-model-parallel-size", "2")
    assert "--num-virtual-stages-per-pipeline-rank" in err and "not a Megatron-LM flag" in err
    err = _parse_error(capsys, "--context-parallel-size", "2")
    assert "needs Transformer Engine" in err
    err = _parse_error(capsys, "--pipeline-model-parallel-size", "2", "--nitp-no-stop-gradient")
    assert "earlier pipeline stage is not supported" in err
    err = _parse_error(capsys, "--num-layers", "6", "--pipeline-model-parallel-size", "4")
    assert "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4" in err
    err = _parse_error(capsys, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--nitp-projector", "linear")
    assert "linear does not support --sequence-parallel" in err


def test_projector_width_not_divisible_by_tensor_parallel(capsys):
    err = _parse_error(capsys, "--hidden-size", "35", "--num-attention-heads", "4",
                       "--num-query-groups", "2", "--kv-channels", "8",
                       "--nitp-projector-ffn-ratio", "1", "--tensor-model-parallel-size", "2")
    assert "projector's width 35 is not divisible by --tensor-model-parallel-size 2" in err


@pytest.mark.parametrize("env", [
    {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"},  # torchrun, 2 nodes x 8
    {"WORLD_SIZE": "4", "SLURM_STEP_NUM_NODES": "2"},  # srun, one task per rank
], ids=["torchrun", "srun"])
def test_multi_node_without_data_cache_path_is_refused(dist, tmp_path, monkeypatch, env):
    """megatron-core builds the dataset index cache on global rank 0 only: on several nodes the
    default (node-local) cache folder would make the other nodes' ranks fail later."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_NODES", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # (tiny flags: were the check missing, this would train instead of failing fast)
    msg = _usage_error(tmp_path, "--train-iters", "1", "--lr-warmup-iters", "0",
                       "--eval-interval", "0", "--no-save")
    assert "several nodes" in msg and "--data-cache-path" in msg
    assert "global rank 0" in msg and "FileNotFoundError" in msg


def test_data_cache_check_reads_the_launch():
    from megatron_nitp.training.arguments import multi_node_launch, validate_data_cache

    assert multi_node_launch({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"})
    assert multi_node_launch({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}) is None
    # torchrun's own variables win over the SLURM allocation around it (one node of a job)
    assert multi_node_launch({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8",
                              "SLURM_STEP_NUM_NODES": "2"}) is None
    assert multi_node_launch({"WORLD_SIZE": "2", "SLURM_STEP_NUM_NODES": "2"})
    assert multi_node_launch({"WORLD_SIZE": "1", "SLURM_STEP_NUM_NODES": "2"}) is None
    assert multi_node_launch({}) is None
    multi = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    validate_data_cache(parse_args(["--data-cache-path", "/shared/cache"]), multi)
    validate_data_cache(parse_args(["--dry-run"]), multi)  # a plan starts no ranks
    with pytest.raises(ValueError, match="--data-cache-path"):
        validate_data_cache(parse_args([]), multi)


@pytest.mark.distributed
@pytest.mark.parametrize("script", ["pretrain_gpt_nitp.py", "pretrain_moe_nitp.py"])
def test_help_lists_the_flags(script):
    """A newcomer's first command: --help prints every group and exits 0 (help texts taken
    from docstrings are %-escaped for argparse)."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT, clean_env

    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for flag in ("--nitp-target-layer", "--tensor-model-parallel-size", "--transformer-impl",
                 "--distributed-timeout-minutes", "--data-cache-path"):
        assert flag in proc.stdout, flag
    assert "20% of depth" in proc.stdout


TOOLS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tools", "*.py")))


@pytest.mark.distributed
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_runs_its_help_from_anywhere(tool, tmp_path):
    """``python tools/x.py --help`` works from any folder, with the package found as installed
    (no PYTHONPATH, no sys.path edits in the tool)."""
    source = open(os.path.join(ROOT, "tools", tool)).read()
    assert "sys.path" not in source, f"tools/{tool} edits sys.path"
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:300]


def test_usage_errors_are_one_line_pointing_at_help(capsys):
    """A mistyped flag prints the problem and "see --help", not the 100-line usage first; the
    tools share the parser."""
    from tests.helpers import load_tool

    err = _parse_error(capsys, "--no-such-flag", "--train-iters", "3")
    assert err.count("\n") == 1 and "usage:" not in err
    assert err.endswith(": error: unrecognized arguments: --no-such-flag (see --help)\n"), err
    err = _parse_error(capsys, "--train-iters", "x")
    assert err.endswith(": error: argument --train-iters: invalid int value: 'x' (see --help)\n")
    assert err.count("\n") == 1
    for tool, argv in (("preprocess_data", ["--input", "a.jsonl"]),
                       ("import_checkpoint", []), ("evaluate_representations", ["--bogus"])):
        with pytest.raises(SystemExit) as exc:
            load_tool(tool).main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "usage:" not in err and err.endswith("(see --help)\n")


def test_help_speaks_to_users():
    """Negated flags say what giving them does, without a "(default: True)" that reads as if
    they were on; no help text or tool output names the project's issues ("issue 14")."""
    import re

    from megatron_nitp.training.arguments import build_parser

    text = " ".join(build_parser().format_help().split())
    assert ("--no-nitp Train the NTP baseline: no NITP loss (plain next-token prediction). "
            "Without this flag the NITP loss is added. --nitp-target-layer") in text
    assert "Add the NITP loss" not in text
    assert "--no-save do not write the final checkpoint --async-save" in text
    assert "--no-plot do not plot the curves to <run-dir>/training.png --no-progress-bar" in text
    assert "--log-throughput log model TFLOP/s" in text  # the positive flags keep defaults
    sources = glob.glob(os.path.join(ROOT, "megatron_nitp", "**", "*.py"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "tools", "**", "*.py"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "examples", "**", "*"), recursive=True)
    for path in sources:
        if os.path.isfile(path):
            found = re.findall(r"issue[ _#-]*\d+|before #\d+", open(path).read(), re.I)
            assert not found, (path, found)
