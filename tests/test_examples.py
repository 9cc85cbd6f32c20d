"""The launch script examples/pretrain.sh MODEL and its table examples/models.txt: every paper
model dry-runs to a plan that fits an 80 GB GPU with the paper's settings, the script takes the
model from its preset without repeating it, and the launcher really starts a job through
torchrun (tiny model, CPU)."""

import os
import re
import subprocess
import sys

import pytest

from megatron_nitp.config.presets import PRESETS, get_preset
from tests.helpers import ROOT, argv_shim, clean_env, example_env, free_port, record_command

PRETRAIN = os.path.join(ROOT, "examples", "pretrain.sh")
TABLE = os.path.join(ROOT, "examples", "models.txt")
SBATCH = os.path.join(ROOT, "examples", "slurm", "pretrain.sbatch")
TINY_SBATCH = os.path.join(ROOT, "examples", "slurm", "tiny_cpu.sbatch")
PAPER = [name for name in PRESETS if not name.startswith("tiny")]
COLUMNS = ("model", "nodes", "gpus", "tp", "pp", "ep", "sp", "mbs", "distopt", "first", "last",
           "vpp", "tokens", "save", "eval")
def _table() -> dict:
    """examples/models.txt: {model: {column: value}}."""
    rows = {}
    for line in open(TABLE):
        if line.strip() and not line.startswith("#"):
            fields = line.split()
            assert len(fields) == len(COLUMNS), line
            assert fields[0] not in rows, f"{fields[0]} twice in {TABLE}"
            rows[fields[0]] = dict(zip(COLUMNS, fields))
    return rows


_env = example_env


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return argv_shim(tmp_path_factory.mktemp("shim"))


_record = record_command


@pytest.fixture(scope="module")
def command_lines(shim, tmp_path_factory):
    """The command line of every paper model (examples/pretrain.sh MODEL) and of the sbatch
    files with DRY_RUN=1: the scripts' flag assembly runs for real (bash), the plans are then
    made in this process (one Python start instead of one per script)."""
    folder = tmp_path_factory.mktemp("argv")
    lines = {model: _record(shim, folder, [PRETRAIN, model]) for model in PAPER}
    lines["pretrain.sbatch"] = _record(shim, folder, [SBATCH, "dense-3b"])
    lines["pretrain.sbatch MODEL="] = _record(shim, folder, [SBATCH], MODEL="moe-9b-a1b")
    lines["tiny_cpu.sbatch"] = _record(shim, folder, [TINY_SBATCH])
    return lines


def _plan(argv, capsys, monkeypatch):
    """Runs the recorded ``python ENTRY FLAGS --dry-run ...`` in this process."""
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.accounting.dry_run import GPU_MEMORY_ENV, dry_run

    for name in ("WORLD_SIZE", GPU_MEMORY_ENV):
        monkeypatch.delenv(name, raising=False)
    entry, flags = argv[0], argv[1:]
    assert os.path.dirname(os.path.abspath(entry)) == ROOT
    assert "--dry-run" in flags and "--world-size" in flags
    capsys.readouterr()
    code = dry_run(parse_args(flags, model_type=_model_type(entry)))
    out = capsys.readouterr()
    return code, out.out, out.err


def _model_type(entry: str) -> str:
    return "moe" if os.path.basename(entry) == "pretrain_moe_nitp.py" else "dense"


def test_the_table_has_exactly_the_paper_models():
    assert sorted(_table()) == sorted(PAPER)
    for row in _table().values():
        assert row["sp"] in ("yes", "no") and row["distopt"] in ("yes", "no"), row
        assert (row["ep"] == "-") == (not row["model"].startswith("moe-")), row


@pytest.mark.distributed
@pytest.mark.parametrize("path", [PRETRAIN, SBATCH, TINY_SBATCH,
                                  os.path.join(ROOT, "examples", "lib", "launch.sh")],
                         ids=os.path.basename)
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("model", PAPER)
def test_example_plan_fits_80gb_with_the_paper_settings(command_lines, capsys, monkeypatch,
                                                       model):
    argv = command_lines[model]
    assert _model_type(argv[0]) == ("moe" if model.startswith("moe-") else "dense")
    code, out, err = _plan(argv, capsys, monkeypatch)
    assert code == 0, out + err
    preset = PRESETS[model]
    assert f"model           {model} (" in out
    assert "of 80 GiB ($NITP_GPU_MEMORY_GIB): fits" in out
    k, lam = preset["nitp_target_layer"], preset["nitp_loss_weight"]
    assert f"k={k} (layer {k}), lambda {lam:g}," in out
    assert f"= global batch {preset['global_batch_size']};" in out
    assert f"lr {preset['lr']:g} (WSD)" in out
    assert "bf16" in out and "distributed optimizer on" in out
    row = _table()[model]
    # the world is the table's nodes x GPUs; the iterations are the token budget's
    assert f"world {int(row['nodes']) * int(row['gpus'])} = " in out
    tokens = int(row["tokens"].rstrip("B")) * 10**9
    iterations = -(-tokens // (preset["global_batch_size"] * preset["seq_length"]))
    assert f"tokens per step; {iterations:,} iterations" in out
    # the table's notes state the estimate the plan prints
    notes = re.search(rf"^# {re.escape(model)} .*?Estimated ~(\d+) GiB", open(TABLE).read(),
                      re.M | re.S)
    printed = float(re.search(r"estimate +([\d.]+) GiB", out).group(1))
    assert abs(printed - int(notes.group(1))) <= 1.0, (notes.group(1), printed)


@pytest.mark.distributed
@pytest.mark.parametrize("model", PAPER)
def test_the_script_does_not_repeat_the_preset(command_lines, model):
    """The preset holds the model and the recipe: the script passes `--preset MODEL` and no
    flag the preset sets (its value would repeat the preset's or contradict it)."""
    from megatron_nitp.training.arguments import build_parser

    argv = command_lines[model]
    parser = build_parser(_model_type(argv[0]))
    preset = get_preset(model)
    flags = [a for a in argv[1:] if a.startswith("--")]
    assert argv[argv.index("--preset") + 1] == model and flags.count("--preset") == 1
    repeated = [flag for flag in flags if flag != "--preset"
                and parser._option_string_actions[flag].dest in preset]
    assert not repeated, f"{model}: {repeated} are the preset's"


@pytest.mark.distributed
@pytest.mark.parametrize("model", PAPER)
def test_the_paper_examples_use_the_fast_gpu_settings(command_lines, model):
    """Communication overlap everywhere; for MoE whole experts per rank (expert TP 1), grouped
    GEMM and fused permutation (examples/pretrain.sh, FAST=yes by default)."""
    argv = command_lines[model]
    assert "--overlap-grad-reduce" in argv
    assert ("--overlap-param-gather" in argv) == ("--use-distributed-optimizer" in argv)
    moe = model.startswith("moe-")
    for flag in ("--moe-grouped-gemm", "--moe-permute-fusion"):
        assert (flag in argv) == moe, flag
    if moe:
        assert argv[argv.index("--expert-tensor-parallel-size") + 1] == "1"


@pytest.mark.distributed
def test_an_unknown_model_is_refused_with_the_list():
    for argv in ([PRETRAIN, "dense-7b"], [PRETRAIN], [SBATCH, "moe-1b"], [SBATCH]):
        proc = subprocess.run(["bash", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=_env(DRY_RUN="1", PYTHON="false"))
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert "unknown MODEL" in proc.stderr
        assert all(name in proc.stderr.split() for name in PAPER), proc.stderr


@pytest.mark.distributed
def test_environment_overrides_and_resume(shim, tmp_path):
    """Every variable overrides the table or the preset; --save and --load of CHECKPOINT_PATH
    on every launch (one command line for the first launch and the requeues); extra flags come
    last."""
    checkpoints = tmp_path / "ckpt"
    argv = _record(shim, tmp_path, [PRETRAIN, "moe-45b-a5.5b", "--eval-iters", "5"],
                   NNODES="4", GPUS_PER_NODE="4", TP="1", PP="2", EP="4", MICRO_BATCH_SIZE="2",
                   GLOBAL_BATCH_SIZE="64", TRAIN_TOKENS="1B", VOCAB_SIZE="32000",
                   DATA_PATH="0.7 /d/a 0.3 /d/b", TOKENIZER_MODEL="/d/tok.model",
                   RUN_DIR=str(tmp_path / "run"), CHECKPOINT_PATH=str(checkpoints),
                   SAVE_INTERVAL="50")

    def value(flag):
        return argv[argv.index(flag) + 1]

    assert os.path.basename(argv[0]) == "pretrain_moe_nitp.py"
    assert value("--world-size") == "16"
    assert (value("--tensor-model-parallel-size"), value("--pipeline-model-parallel-size"),
            value("--expert-model-parallel-size")) == ("1", "2", "4")
    assert value("--micro-batch-size") == "2" and value("--global-batch-size") == "64"
    assert value("--train-iters") == str(-(-10**9 // (64 * 8192)))  # 1B tokens at 64 x 8192
    assert value("--vocab-size") == "32000"
    assert argv[argv.index("--data-path") + 1:argv.index("--data-path") + 5] == [
        "0.7", "/d/a", "0.3", "/d/b"]
    assert value("--tokenizer-model") == "/d/tok.model"
    assert value("--tokenizer-type") == "HuggingFaceTokenizer"  # the paper's kind by default
    assert value("--run-dir") == str(tmp_path / "run")
    assert value("--save") == str(checkpoints) and value("--save-interval") == "50"
    assert value("--load") == str(checkpoints)  # nothing there yet: the run starts from scratch
    assert argv[-5:-3] == ["--eval-iters", "5"]  # the extra flags, then --dry-run --world-size

    checkpoints.mkdir()
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("100")
    argv = _record(shim, tmp_path, [PRETRAIN, "dense-0.5b"], CHECKPOINT_PATH=str(checkpoints),
                   TRAIN_ITERS="7")
    assert argv[argv.index("--load") + 1] == str(checkpoints)
    assert argv[argv.index("--train-iters") + 1] == "7"
    # no checkpoints at all
    argv = _record(shim, tmp_path, [PRETRAIN, "dense-0.5b"], CHECKPOINT_PATH="")
    assert "--save" not in argv and "--load" not in argv


@pytest.mark.distributed
def test_tokenizer_kinds_reach_the_command_line(shim, tmp_path):
    """TOKENIZER_TYPE picks the kind (default the paper's HuggingFaceTokenizer); Megatron-LM's
    GPT2BPETokenizer takes VOCAB_FILE and MERGE_FILE, and without them the script stops."""
    argv = _record(shim, tmp_path, [PRETRAIN, "dense-0.5b"], TOKENIZER_TYPE="GPT2BPETokenizer",
                   VOCAB_FILE="/d/vocab.json", MERGE_FILE="/d/merges.txt")
    assert argv[argv.index("--tokenizer-type") + 1] == "GPT2BPETokenizer"
    assert (argv[argv.index("--vocab-file") + 1], argv[argv.index("--merge-file") + 1]) == (
        "/d/vocab.json", "/d/merges.txt")
    assert "--tokenizer-model" not in argv
    argv = _record(shim, tmp_path, [PRETRAIN, "dense-0.5b"],
                   TOKENIZER_TYPE="SentencePieceTokenizer", TOKENIZER_MODEL="/d/t.model")
    assert argv[argv.index("--tokenizer-type") + 1] == "SentencePieceTokenizer"
    assert argv[argv.index("--tokenizer-model") + 1] == "/d/t.model"
    proc = subprocess.run(["bash", PRETRAIN, "dense-0.5b"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env=example_env(DRY_RUN="1", PYTHON=shim,
                                          TOKENIZER_TYPE="GPT2BPETokenizer"))
    assert proc.returncode != 0 and "GPT2BPETokenizer needs VOCAB_FILE" in proc.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["pretrain.sbatch", "pretrain.sbatch MODEL=", "tiny_cpu.sbatch"])
def test_sbatch_dry_run(command_lines, capsys, monkeypatch, key):
    code, out, err = _plan(command_lines[key], capsys, monkeypatch)
    assert code == 0, out + err
    assert ": fits" in out
    path = TINY_SBATCH if key == "tiny_cpu.sbatch" else SBATCH
    text = open(path).read()
    assert "#SBATCH" in text and "srun" in text
    if path == SBATCH:
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
        assert "NCCL_" in text
        # the sbatch file runs examples/pretrain.sh MODEL: the same command line
        model = "dense-3b" if key == "pretrain.sbatch" else "moe-9b-a1b"
        assert command_lines[key] == command_lines[model]


@pytest.mark.distributed
@pytest.mark.parametrize("key", PAPER + ["pretrain.sbatch", "tiny_cpu.sbatch"])
def test_examples_put_the_dataset_cache_in_the_run_folder(command_lines, shim, tmp_path, key):
    """megatron-core builds the dataset index cache on global rank 0 only: every launch passes
    --data-cache-path inside the run folder (shared by the nodes), never the container's
    default, and without DATA_PATH (built-in corpus) too."""
    argv = command_lines[key]
    assert argv.count("--data-cache-path") == 1, argv
    cache = argv[argv.index("--data-cache-path") + 1]
    run_dir = argv[argv.index("--run-dir") + 1]
    assert cache == os.path.join(run_dir, "data-cache")
    if key in PAPER:
        argv = _record(shim, tmp_path, [PRETRAIN, key], DATA_PATH="")
        assert argv[argv.index("--data-cache-path") + 1] == cache and "--data-path" not in argv


@pytest.mark.distributed
def test_dry_run_refuses_a_layout_that_does_not_fit():
    # a real `python ... --dry-run` (exit code through the script): the 45B model on 2 nodes
    # without pipeline parallelism does not fit
    proc = subprocess.run(["bash", PRETRAIN, "moe-45b-a5.5b"], cwd=ROOT,
                          env=_env(DRY_RUN="1", NNODES="2", PP="1", VPP="-", TP="2"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "exceeds the GPU memory" in proc.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_launcher_runs_torchrun_on_cpu(tmp_path):
    """The non-dry path: torchrun with a c10d rendezvous, 2 processes, the 0.5B model's launch
    overridden down to the tiny model (extra flags come last and win)."""
    env = _env(NNODES="1", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DATA_PATH="", CHECKPOINT_PATH="",
               RUN_DIR=str(tmp_path / "run"),
               TORCHRUN=f"{sys.executable} -m torch.distributed.run", OMP_NUM_THREADS="1")
    flags = ["--preset", "tiny-dense", "--seq-length", "64", "--vocab-size", "4096",
             "--nitp-target-layer", "1", "--train-iters", "2", "--lr-warmup-iters", "0",
             "--micro-batch-size", "4", "--global-batch-size", "8", "--eval-interval", "0",
             "--log-interval", "1", "--geometry-interval", "0", "--no-save"]
    proc = subprocess.run(["bash", PRETRAIN, "dense-0.5b", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    assert re.search(r"iteration +2/ +2", proc.stdout)
    assert os.listdir(tmp_path / "run" / "data-cache")  # the index cache went to the run folder


@pytest.mark.distributed
def test_the_45b_plan_shows_the_bubble_interleaving_saves(command_lines, capsys, monkeypatch):
    """moe-45b-a5.5b (PP 4 x 2 chunks, 96 micro-batches): the plan prints the interleaved
    schedule's bubble and the plain 1F1B one it saves, with the activations each keeps in
    flight, and where layer k's chunk routes its target."""
    code, out, err = _plan(command_lines["moe-45b-a5.5b"], capsys, monkeypatch)
    assert code == 0, out + err
    line = next(line for line in out.splitlines() if line.strip().startswith("pipeline "))
    assert "1F1B bubble (p-1)/m = 3/96 = 3.1%, in flight on stage 0 4 micro-batches" in line
    assert "interleaved V=2: bubble (p-1)/(v m) = 3/192 = 1.6%" in line
    assert "5.5 micro-batches" in line and "(this run)" in line.split(";")[0]
    assert "on pipeline stage 1 (model chunk 0 of 2) of 4" in out
