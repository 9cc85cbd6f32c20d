"""A cluster's first week, with the examples' exact command lines (examples/pretrain.sh MODEL,
FAST on and off): on each machine users have (simulated through ``megatron_nitp.kernels``)
every paper model's configuration is accepted, or refused with the reason; where this machine
can run it, it trains 2 iterations, saves, resumes, and the checkpoint is exported to Hugging
Face (loaded by transformers with the same logits) and evaluated by
tools/evaluate_representations.py - on a shrunken shape (the layout's sizes set to 1 through
the script's own variables, the model's width and depth by appended flags).

Before the fixes this found: export and evaluation refused every checkpoint made with
``--use-distributed-optimizer --overlap-param-gather`` (the stored config kept the overlap
with the distributed optimizer turned off) and every MoE checkpoint trained with grouped GEMM
or permute fusion on a machine without those kernels; gradient-accumulation fusion was turned
on with TE alone, where the output layer and the projector raise without Apex's kernel."""

import io
import json
import os
from contextlib import redirect_stdout

import pytest
import torch

from megatron_nitp import kernels
from megatron_nitp.config.presets import PRESETS
from tests.helpers import ROOT, argv_shim, load_tool, record_command

PRETRAIN = os.path.join(ROOT, "examples", "pretrain.sh")
PAPER = [name for name in PRESETS if not name.startswith("tiny")]

_NONE = dict(cuda=False, te=False, apex_fused_adam=False, apex_fused_wgrad=False,
             grouped_gemm=False, fused_softmax=False, compute_capability=None)
_GPU = dict(_NONE, cuda=True, compute_capability=(9, 0))
#: The machines users have: name -> the kernels it provides.
ENVIRONMENTS = {
    "cpu": _NONE,
    "gpu, PyPI torch only": _GPU,
    "gpu, pip Transformer Engine, no Apex": dict(_GPU, te=True),
    "gpu, grouped_gemm package, no TE": dict(_GPU, grouped_gemm=True),
    "NGC image (TE and Apex)": dict(_GPU, te=True, apex_fused_adam=True, apex_fused_wgrad=True,
                                    fused_softmax=True),
}


def _expected(model: str, fast: str, env: dict) -> str | None:
    """The refusal a launch must get on ``env``, or None where it must be accepted. Written from
    what each kernel is (not from the code's checks): FAST=yes adds communication overlap
    (everywhere) and, for MoE, grouped-GEMM experts and the fused permutation, which need
    Transformer Engine's layers (the permutation has no other provider)."""
    if fast == "yes" and model.startswith("moe-") and not (env["cuda"] and env["te"]):
        return "--moe-permute-fusion need(s) Transformer Engine"
    return None


#: The paper model's shape shrunk for CPU (appended after the script's flags: they override).
SHAPE = ["--num-layers", "3", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--kv-channels", "16",
         "--seq-length", "32", "--nitp-target-layer", "1", "--lr-warmup-iters", "0",
         "--eval-iters", "1", "--log-interval", "1", "--no-plot"]
MOE_SHAPE = ["--num-experts", "4", "--moe-ffn-hidden-size", "32",
             "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0]*1+[1]*2",
             "--moe-router-topk", "2"]
#: The script's variables for one CPU process and a tiny budget; the built-in corpus.
SMALL = dict(NNODES="1", GPUS_PER_NODE="1", TP="1", PP="1", VPP="-", EP="1",
             MICRO_BATCH_SIZE="1", GLOBAL_BATCH_SIZE="2", VOCAB_SIZE="4096", SAVE_INTERVAL="2", DATA_PATH="")


def _flags(argv: list) -> tuple[str, list, int]:
    """(model type, flags, world size) of a recorded ``python ENTRY FLAGS --dry-run
    --world-size N``."""
    entry, flags = argv[0], argv[1:]
    assert flags[-3:-1] == ["--dry-run", "--world-size"], flags[-3:]
    return ("moe" if entry.endswith("pretrain_moe_nitp.py") else "dense"), flags[:-3], int(
        flags[-1])


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return argv_shim(tmp_path_factory.mktemp("shim"))


@pytest.mark.distributed
@pytest.mark.parametrize("fast", ["yes", "no"])
@pytest.mark.parametrize("model", PAPER)
def test_examples_are_accepted_or_refused_on_every_machine(shim, tmp_path, capsys, model, fast):
    """The full-size launch (the table's layout and world) on each simulated machine: accepted
    where every kernel it names is present, else exit 2 with the kernel and the reason; and the
    automatic fusions follow the machine (gradient-accumulation fusion only with Apex's
    kernel, RoPE fusion with TE's layers)."""
    from megatron_nitp.config import performance, resolve
    from megatron_nitp.training.arguments import parse_args

    model_type, flags, world = _flags(record_command(
        shim, tmp_path, [PRETRAIN, model], FAST=fast, DATA_PATH="", RUN_DIR=str(tmp_path / "run")))
    for name, env in ENVIRONMENTS.items():
        want = _expected(model, fast, env)
        with kernels.simulate(**env):
            capsys.readouterr()
            if want is not None:
                with pytest.raises(SystemExit) as exit_:
                    parse_args(flags, model_type)
                err = capsys.readouterr().err
                assert exit_.value.code == 2 and want in err, (name, err)
                assert err.count("\n") <= 2, err  # the error line (and "see --help")
                continue
            config = resolve(parse_args(flags, model_type), world)
            fusions = performance.resolved_fusions(config.performance,
                                                   config.parallel.transformer_impl)
            assert fusions == dict(gradient_accumulation_fusion=env["apex_fused_wgrad"],
                                   apply_rope_fusion=env["te"]), name


def _cases() -> list[tuple[str, str]]:
    """What this machine runs: every (model, FAST) it accepts (on CPU: dense with FAST on and
    off, MoE with FAST off)."""
    real = {k: getattr(kernels.available(), k) for k in _NONE}
    return [(m, fast) for m in PAPER for fast in ("yes", "no")
            if _expected(m, fast, real) is None]


def _train(shim, folder, model, fast, iterations, capsys, *extra):
    """The example's command line for this model (always with --load of its checkpoint
    folder, empty at first) and ``extra`` flags, shrunk, trained in this process; its console
    output."""
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.loop import pretrain

    model_type, flags, _ = _flags(record_command(
        shim, folder, [PRETRAIN, model, *extra], FAST=fast, TRAIN_ITERS=str(iterations),
        RUN_DIR=str(folder / "run"), CHECKPOINT_PATH=str(folder / "checkpoints"), **SMALL))
    flags += SHAPE + (MOE_SHAPE if model_type == "moe" else [])
    capsys.readouterr()
    pretrain(parse_args(flags, model_type))
    return flags, capsys.readouterr().out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("model,fast", _cases(), ids=lambda v: v)
def test_example_trains_saves_resumes_exports_and_evaluates(dist, shim, tmp_path, capsys, model,
                                                            fast):
    transformers = pytest.importorskip("transformers")
    flags, out = _train(shim, tmp_path, model, fast, 2, capsys)
    ckpt = tmp_path / "checkpoints"
    # one command line for the first launch and the requeues: --load of the empty folder
    assert flags[flags.index("--load") + 1] == str(ckpt)
    assert f"warning: no checkpoint in {ckpt}: starting from scratch" in out
    assert ("--overlap-grad-reduce" in flags) == (fast == "yes")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    # a longer run than the checkpoint's schedule: Megatron-LM's choice of which one wins
    flags, out = _train(shim, tmp_path, model, fast, 3, capsys,
                        "--use-checkpoint-opt_param-scheduler")
    assert flags[flags.index("--load") + 1] == str(ckpt)  # the script resumes by itself
    assert f"> resumed from {ckpt} at iteration 2" in out
    assert "iteration        3/       3" in out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"
    import shutil

    # a copy for Megatron-LM's --no-load-optim --no-load-rng resume below (the export's checks
    # edit this folder's stored config)
    shutil.copytree(ckpt, tmp_path / "fresh-optimizer" / "checkpoints")

    from megatron_nitp.export import load_checkpoint_model

    hf_dir = tmp_path / "hf"
    with redirect_stdout(io.StringIO()) as printed:
        load_tool("export_checkpoint").main(["--load", str(ckpt), "--output", str(hf_dir)])
    assert "> exported" in printed.getvalue()
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == 64
    ours, _ = load_checkpoint_model(str(ckpt))
    assert next(ours.parameters()).dtype == torch.float32  # bf16 training, fp32 evaluation
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir),
                                                               dtype=torch.float32)
    tokens = torch.randint(0, 4000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours.eval()(tokens, torch.arange(16)[None], None)
        assert (mine - theirs.eval()(input_ids=tokens).logits).abs().max().item() < 1e-4

    if model.startswith("dense-"):
        # to Megatron-LM and back (a user who returns there, then continues here with NITP):
        # megatron-core's torch_dist layout both ways, the same logits
        with redirect_stdout(io.StringIO()):
            load_tool("export_checkpoint").main(["--load", str(ckpt), "--format", "megatron",
                                                 "--output", str(tmp_path / "mlm")])
            load_tool("import_checkpoint").main(["--megatron", str(tmp_path / "mlm"),
                                                 "--save", str(tmp_path / "again")])
        again, _ = load_checkpoint_model(str(tmp_path / "again"))
        with torch.no_grad():
            back = again.eval()(tokens, torch.arange(16)[None], None)
        assert (back - mine).abs().max().item() < 1e-6

    if model.startswith("moe-"):
        # the same checkpoint as an NGC cluster writes it with FAST on: grouped-GEMM experts
        # (TEGroupedMLP: the same checkpoint keys), fused permutation, FP8, the fusions
        _as_trained_with_gpu_kernels(ckpt)
        with redirect_stdout(io.StringIO()):
            load_tool("export_checkpoint").main(["--load", str(ckpt), "--output",
                                                 str(tmp_path / "hf-gpu")])
        assert ((tmp_path / "hf-gpu" / "model.safetensors").read_bytes()
                == (hf_dir / "model.safetensors").read_bytes())

    report = tmp_path / "representations.json"
    with redirect_stdout(io.StringIO()):
        load_tool("evaluate_representations").main(
            ["--load", str(ckpt), "--evaluations", "geometry", "--max-tokens", "256",
             "--json", str(report)])
    result = json.loads(report.read_text())
    assert result["iteration"] == 3 and result["geometry"]["effective_rank"] > 1

    # the example's own checkpoint (bf16, distributed optimizer, FAST's overlap) resumed with a
    # fresh optimizer, as Megatron-LM's Mixtral recipe asks
    _, out = _train(shim, tmp_path / "fresh-optimizer", model, fast, 4, capsys,
                    "--no-load-optim", "--no-load-rng")
    assert "at iteration 3" in out and "--no-load-optim: the optimizer starts fresh" in out
    assert "iteration        4/       4" in out
    assert (tmp_path / "fresh-optimizer" / "checkpoints" /
            "latest_checkpointed_iteration.txt").read_text() == "4"


def _edit_stored_config(ckpt, edit) -> None:
    """Changes the run config stored in ``ckpt``'s latest checkpoint (``edit(config_dict)``),
    keeping its manifest entry true (size and CRC32), as if the run had been made so."""
    import zlib

    path = ckpt / f"iter_{int((ckpt / 'latest_checkpointed_iteration.txt').read_text()):07d}"
    meta = json.loads((path / "nitp.json").read_text())
    edit(meta["config"])
    data = json.dumps(meta, indent=2).encode()
    (path / "nitp.json").write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["nitp.json"] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _as_trained_with_gpu_kernels(ckpt) -> None:
    def edit(config):
        config["performance"].update(
            moe_grouped_gemm=True, moe_permute_fusion=True, overlap_grad_reduce=True,
            overlap_param_gather=True, gradient_accumulation_fusion=True,
            apply_rope_fusion=True, fp8="hybrid", fp8_recipe="tensorwise",
            cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
        config["parallel"].update(expert_tensor_parallel_size=1, sequence_parallel=True,
                                  tensor_model_parallel_size=2)
        config["checkpoint"].update(dist_ckpt_optim_fully_reshardable=True)
    _edit_stored_config(ckpt, edit)


@pytest.mark.distributed
@pytest.mark.slow
def test_export_and_evaluation_errors_are_one_line(dist, shim, tmp_path, capsys):
    """A checkpoint that cannot be used (none there; a stored config that cannot be rebuilt)
    ends the export, the evaluation and the lm-eval bridge's ``--load`` with one line naming
    the checkpoint and the problem."""
    lines = {}
    for name, argv in (
            ("export_checkpoint", ["--output", str(tmp_path / "hf")]),
            ("evaluate_representations", ["--evaluations", "geometry"])):
        with pytest.raises(SystemExit) as exit_:
            load_tool(name).main(["--load", str(tmp_path / "nothing")] + argv)
        lines[name] = str(exit_.value.code)
        assert lines[name].startswith("error: no checkpoint in ") and "\n" not in lines[name]
    _train(shim, tmp_path, "dense-0.5b", "no", 2, capsys)
    ckpt = tmp_path / "checkpoints"
    _edit_stored_config(ckpt, lambda c: c["model"].update(num_attention_heads=3))
    for name, argv in (
            ("export_checkpoint", ["--output", str(tmp_path / "hf")]),
            ("evaluate_representations", ["--evaluations", "geometry"])):
        with pytest.raises(SystemExit) as exit_:
            load_tool(name).main(["--load", str(ckpt)] + argv)
        line = str(exit_.value.code)
        assert line.startswith(f"error: {ckpt}/iter_0000002: the run config it stores cannot "
                               "be rebuilt here: ") and "\n" not in line, line
        assert "--num-attention-heads" in line or "num_attention_heads" in line, line


def test_export_model_is_built_without_the_training_kernels():
    """On a TE machine too, a checkpoint trained with grouped-GEMM experts is read by
    SequentialMLP (whose ``local_experts.{j}`` names the Hugging Face mapping knows; TE's
    grouped experts are ``linear_fc1.weight{j}``), with no overlap, FP8 or fusion, in fp32."""
    from megatron_nitp.config import preset_config
    from megatron_nitp.config.stored import config_from_meta

    trained = preset_config("moe-1.9b-a0.3b", moe_grouped_gemm=True, moe_permute_fusion=True,
                            use_distributed_optimizer=True, overlap_param_gather=True,
                            overlap_grad_reduce=True, fp8="hybrid", bf16=True,
                            gradient_accumulation_fusion=True, expert_tensor_parallel_size=1,
                            expert_model_parallel_size=8, train_iters=10000)
    meta = {"config": trained.to_dict(), "model": {"padded_vocab_size": 152064}}
    with kernels.simulate(**ENVIRONMENTS["NGC image (TE and Apex)"]):
        config = config_from_meta(meta)
    assert not (config.performance.moe_grouped_gemm or config.performance.moe_permute_fusion or config.performance.fp8
                or config.performance.overlap_param_gather or config.performance.overlap_grad_reduce or config.training.bf16)
    assert config.performance.gradient_accumulation_fusion is None  # auto: decided on the exporting machine
    assert (config.parallel.expert_model_parallel_size, config.parallel.expert_tensor_parallel_size) == (1, None)
    assert config.moe.num_moe_experts == trained.moe.num_moe_experts and config.derived.padded_vocab_size == 152064
