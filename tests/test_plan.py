"""`--dry-run`: world checks, parameter counts per rank, memory estimate, exit codes."""

import dataclasses

import pytest

from megatron_nitp.accounting.dry_run import GPU_MEMORY_ENV, dry_run
from megatron_nitp.accounting.memory_plan import (GIB, RUNTIME_OVERHEAD_GIB,
                                                  activation_bytes_per_token, format_bytes,
                                                  stage_memory)
from megatron_nitp.accounting.parallel import Layout
from megatron_nitp.accounting.parameters import (format_count, layer_parameters,
                                                 model_parameters, parameter_counts,
                                                 stage_parameters)
from megatron_nitp.accounting.shape import vocab_of
from megatron_nitp.config import resolve
from megatron_nitp.config.presets import PRESETS
from megatron_nitp.training.arguments import parse_args
from tests.helpers import load_tool, measured_counts, run_python_code

PAPER = [name for name in PRESETS if not name.startswith("tiny")]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in LAUNCH_VARS + (GPU_MEMORY_ENV,):
        monkeypatch.delenv(name, raising=False)


def _args(*flags, model_type=None):
    flags = list(flags)
    preset = PRESETS[flags[flags.index("--preset") + 1] if "--preset" in flags else "tiny-dense"]
    model_type = model_type or preset.get("model_type", "dense")
    # the paper presets leave the run length and the micro-batch to the launch script
    for flag, value in (("--train-iters", "10000"), ("--micro-batch-size", "1")):
        if flag not in flags and flag[2:].replace("-", "_") not in preset:
            flags += [flag, value]
    return parse_args(flags, model_type=model_type)


def _layout(args, world):
    from megatron_nitp.config import resolve

    args = resolve(args, world)
    return args, Layout(world=world, tp=args.parallel.tensor_model_parallel_size,
                       pp=args.parallel.pipeline_model_parallel_size, cp=args.parallel.context_parallel_size,
                       ep=args.parallel.expert_model_parallel_size, dp=args.derived.data_parallel_size,
                       sp=args.parallel.sequence_parallel)


@pytest.mark.parametrize("name", PAPER + ["tiny-dense", "tiny-moe"])
def test_the_one_parameter_model_matches_megatron_cores_built_modules(dist, name):
    """plan, preset table and FLOPs tool share parameters.parameter_counts; it must count what
    megatron-core builds (tests/helpers.py's measured_counts: the modules, reduced depth)."""
    counts = model_parameters(_args("--preset", name))
    built = measured_counts(name)
    assert counts["total"] == built["total_params"]
    assert counts["active"] == built["active_params"]
    assert counts["projector"] == built["projector_params"]
    assert parameter_counts(PRESETS[name])["total"] == built["total_params"]


def _built_stage(args, stage, pp):
    """Parameters of pipeline stage `stage` of `pp`, built by megatron-core (TP = EP = 1)."""
    from megatron_nitp.training.model import build_model

    from megatron_nitp.config import resolve

    per = args.model.num_layers // pp
    whole = resolve(args, 1).derived
    pattern = whole.moe_layer_pattern
    derived = dataclasses.replace(
        whole, padded_vocab_size=vocab_of(args, 1)[1],
        moe_layer_pattern=pattern[stage * per:(stage + 1) * per] if pattern else None)
    mtp = {} if stage == pp - 1 else {"mtp_num_layers": None}  # MTP: on the last stage only
    part = args.replace(num_layers=per, derived=derived, **mtp)
    model = build_model(part, pre_process=stage == 0, post_process=stage == pp - 1,
                        perform_initialization=False)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("flags", [
    ("--preset", "tiny-dense"),
    ("--preset", "tiny-dense", "--untie-embeddings-and-output-weights"),
    ("--preset", "tiny-dense", "--no-nitp"),
    ("--preset", "tiny-moe"),
    ("--preset", "tiny-dense", "--untie-embeddings-and-output-weights", "--mtp-num-layers", "1"),
    ("--preset", "tiny-moe", "--mtp-num-layers", "2"),
])
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_stage_parameters_match_the_built_stages(dist, flags, pp):
    args = _args(*flags)
    layout = Layout(world=pp, tp=1, pp=pp, cp=1, ep=1, dp=1, sp=False)
    for stage in range(pp):
        dense, expert = stage_parameters(args, layout, stage)
        assert dense + expert == _built_stage(args, stage, pp), (flags, pp, stage)


def test_tensor_and_expert_parallel_divide_their_matrices():
    args = _args("--preset", "moe-9b-a1b")
    one = Layout(world=1, tp=1, pp=1, cp=1, ep=1, dp=1, sp=False)
    split = Layout(world=16, tp=2, pp=1, cp=1, ep=8, dp=8, sp=False)
    d = args.model.hidden_size
    dense1, expert1 = layer_parameters(args, True, 1, 1)
    dense2, expert2 = layer_parameters(args, True, 2, 8)
    assert expert2 == expert1 // 16
    replicated = 2 * d + args.moe.num_moe_experts * d  # two norms and the router
    assert dense2 - replicated == (dense1 - replicated) // 2
    s1, s2 = stage_parameters(args, one, 0), stage_parameters(args, split, 0)
    assert s2[1] == s1[1] // 16
    # --expert-tensor-parallel-size 1: whole experts per rank, twice the expert data parallelism
    whole = dataclasses.replace(split, etp=1)
    assert stage_parameters(args, whole, 0) == (s2[0], s1[1] // 8)
    assert (split.expert_dp, whole.expert_dp) == (1, 2)


def test_memory_terms_by_hand():
    # one dense layer, no NITP, bf16, DP 4 with the distributed optimizer
    args = _args("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
                 "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
                 "--micro-batch-size", "2", "--global-batch-size", "16", "--bf16", "--no-nitp",
                 "--use-distributed-optimizer", "--vocab-size", "256", "--nitp-target-layer", "0")
    args, layout = _layout(args, 4)
    assert (layout.dp, args.derived.num_microbatches) == (4, 2)
    m = stage_memory(args, layout, args.derived.num_microbatches, 0)
    d, q, kv, f = 64, 64, 32, 128
    n = 2 * (2 * d + d * (q + 2 * kv) + q * d + 3 * d * f) + 256 * d + d  # layers, embedding, norm
    assert m.parameters == n
    assert (m.weights, m.gradients) == (2 * n, 4 * n)
    assert m.optimizer == pytest.approx(12 * n / 4)
    tokens = 32 * 2
    per_layer = 2 * (4 * d + 2 * q + 2 * kv + 3 * f)
    logits = tokens * 256 * (2 + 4) + tokens * d * 2
    assert m.activations == pytest.approx(tokens * 2 * per_layer + logits)
    assert m.total == pytest.approx(m.weights + m.gradients + m.optimizer + m.activations
                                    + RUNTIME_OVERHEAD_GIB * GIB)


@pytest.mark.parametrize("recompute,kept_layers,rebuilt_layers,dropped", [
    ([], 0, 0, 0),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "1"], 4, 1, 0),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "2"], 4, 2, 0),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "3"], 3, 1, 0),
    (["--recompute-granularity", "selective"], 0, 0, 0),  # flash attention: nothing to drop
    (["--recompute-granularity", "selective", "--recompute-modules", "mlp"], 0, 0, 3 * 128),
], ids=["none", "full-uniform-1", "full-uniform-2", "full-block-3", "selective-core_attn",
        "selective-mlp"])
def test_recomputation_in_the_memory_estimate_by_hand(recompute, kept_layers, rebuilt_layers,
                                                      dropped):
    """Full recompute: a recomputed layer keeps only its input [s, b, d], and the backward pass
    rebuilds one checkpoint (its layers' whole activations, one micro-batch) at a time;
    selective mlp drops the FFN's 3f per token and layer."""
    args = _args("--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
                 "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
                 "--micro-batch-size", "2", "--global-batch-size", "2", "--bf16", "--no-nitp",
                 "--vocab-size", "256", "--nitp-target-layer", "0", *recompute)
    args, layout = _layout(args, 1)
    d, q, kv, f, tokens = 64, 64, 32, 128, 64
    full = 2 * (4 * d + 2 * q + 2 * kv + 3 * f)
    logits = tokens * 256 * (2 + 4) + tokens * d * 2
    layers = (kept_layers * 2 * d + (4 - kept_layers) * (full - 2 * dropped)
              + rebuilt_layers * full)
    m = stage_memory(args, layout, args.derived.num_microbatches, 0)
    assert m.activations == pytest.approx(tokens * layers + logits)


def test_pipeline_stages_hold_micro_batches_in_flight_and_the_routing_buffers():
    args = _args("--preset", "dense-2b", "--pipeline-model-parallel-size", "4",
                 "--micro-batch-size", "1")
    args, layout = _layout(args, 32)
    m = args.derived.num_microbatches
    stages = [stage_memory(args, layout, m, i) for i in range(4)]
    # stage 0 owns layer 6 (layers 1-7): it keeps the send buffers of the 4 micro-batches in
    # flight (each released when the backward of its micro-batch reaches the stage)
    tokens, d = args.model.seq_length, args.model.hidden_size
    assert m > 4
    routing = 4 * tokens * d * 2
    per_layer = tokens * activation_bytes_per_token(args, False, layout)
    assert stages[0].activations == pytest.approx(4 * 7 * per_layer + routing)
    assert stages[1].activations == pytest.approx(3 * 7 * per_layer)
    assert stages[2].activations == pytest.approx(2 * 7 * per_layer)
    assert stages[3].activations > 1 * 7 * per_layer  # + logits and NITP on the last stage


def test_sequence_parallel_and_context_parallel_shrink_activations():
    base = _args("--preset", "dense-3b", "--tensor-model-parallel-size", "2")
    sp = _args("--preset", "dense-3b", "--tensor-model-parallel-size", "2", "--sequence-parallel")
    a = activation_bytes_per_token(base, False, _layout(base, 8)[1])
    b = activation_bytes_per_token(sp, False, _layout(sp, 8)[1])
    assert b == pytest.approx(a - 2 * 4 * base.model.hidden_size / 2)


def _dry(capsys, *flags, model_type=None):
    code = dry_run(_args(*flags, model_type=model_type))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tiny_plan_prints_every_section(capsys):
    code, out, err = _dry(capsys, "--preset", "tiny-dense")
    assert code == 0, err
    for text in ("tiny-dense", "parameters", "world 1 = TP 1 x PP 1 x CP 1 x DP 1",
                 "2 micro-batches", "2,048 tokens per step", "k=1", "stage 0 of 1",
                 "NITP routing", "fits"):
        assert text in out, text


def test_world_size_from_flag_env_or_model_parallel(capsys, monkeypatch):
    code, out, _ = _dry(capsys, "--tensor-model-parallel-size", "2",
                        "--pipeline-model-parallel-size", "2")
    assert code == 0 and "world 4 = TP 2 x PP 2" in out
    monkeypatch.setenv("WORLD_SIZE", "8")
    code, out, _ = _dry(capsys, "--tensor-model-parallel-size", "2", "--micro-batch-size", "2")
    assert code == 0 and "world 8 = TP 2 x PP 1 x CP 1 x DP 4" in out
    code, out, _ = _dry(capsys, "--micro-batch-size", "1", "--world-size", "16")
    assert code == 0 and "world 16" in out and "DP 16" in out


def test_pipeline_plan_names_the_target_stage_and_routing_bytes(capsys):
    from megatron_nitp.layout import routed_bytes_per_step

    code, out, _ = _dry(capsys, "--preset", "dense-0.5b", "--pipeline-model-parallel-size", "4",
                        "--micro-batch-size", "1", "--world-size", "32",
                        "--use-distributed-optimizer")
    assert code == 0
    assert "k=5 (layer 5), lambda 1, on pipeline stage 0 of 4" in out
    expected = routed_bytes_per_step(seq_length=8192, micro_batch_size=1, hidden_size=896,
                                     num_microbatches=64, target_layer=5, num_layers=24,
                                     pipeline_parallel=4, data_parallel=8)
    per_micro = expected["bytes_per_microbatch_per_rank"]
    assert per_micro == 8192 * 896 * 2
    assert f"{per_micro / 2**20:.1f} MiB per micro-batch" in out
    assert "memory stage 3" in out


def _plan_numbers(out):
    """(vocab, padded, total parameters, memory of the one stage in bytes) from a plan."""
    import re

    vocab, padded = map(int, re.search(r"vocab (\d+) .*?, padded (\d+)", out).groups())
    total = re.search(r"parameters +total (\S+),", out).group(1)
    memory = re.search(r"memory/GPU +(\S+ \S+) =", out).group(1)
    return vocab, padded, total, memory


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A SentencePiece model of 1000 pieces trained on the built-in corpus's first chapters."""
    from megatron_nitp.data.corpus import kjv_chapters
    from megatron_nitp.data.tokenizer import build_tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("tok")
    text = root / "chapters.txt"
    text.write_text("\n\n".join(kjv_chapters()[:60]))
    model = train_sentencepiece([str(text)], str(root / "tok"), vocab_size=1000)
    assert build_tokenizer("SentencePieceTokenizer", model).vocab_size == 1000
    return model


def test_dry_run_reads_the_tokenizers_vocabulary(capsys, small_tokenizer):
    from megatron_nitp.data.corpus import prepare_default_corpus
    from megatron_nitp.data.tokenizer import build_tokenizer

    # the built-in corpus's tokenizer: its own vocabulary, named as the tokenizer's, and the
    # plan equals one given that vocabulary with --vocab-size
    _, model = prepare_default_corpus()
    real = build_tokenizer("SentencePieceTokenizer", model).vocab_size
    code, out, err = _dry(capsys, "--preset", "tiny-dense", "--tokenizer-model", model)
    assert code == 0, err
    assert f"vocab {real} (the tokenizer's, {model}), padded {real}" in out
    code, given, _ = _dry(capsys, "--preset", "tiny-dense", "--vocab-size", str(real))
    assert code == 0 and _plan_numbers(out) == _plan_numbers(given)

    # another tokenizer's vocabulary (1000 pieces, padded to 1024) changes the plan by exactly
    # its embedding rows: tiny-dense ties embedding and output layer, one matrix of d x V
    code, out, err = _dry(capsys, "--preset", "tiny-dense", "--tokenizer-model", small_tokenizer)
    assert code == 0, err
    assert f"vocab 1000 (the tokenizer's, {small_tokenizer}), padded 1024" in out
    args = resolve(_args("--preset", "tiny-dense"), 1)
    small = model_parameters(args.replace(derived=dataclasses.replace(
        args.derived, vocab_size=1000, padded_vocab_size=1024)))
    default = model_parameters(args)
    assert args.derived.vocab_size == 4096 and not args.model.untie_embeddings_and_output_weights
    assert default["total"] - small["total"] == (4096 - 1024) * args.model.hidden_size
    assert _plan_numbers(out)[2] == format_count(small["total"])
    layout = Layout(world=1, tp=1, pp=1, cp=1, ep=1, dp=1, sp=False)
    tokenizer_args = resolve(_args("--preset", "tiny-dense", "--tokenizer-model",
                                        small_tokenizer), 1, 1000)
    m = stage_memory(tokenizer_args, layout, tokenizer_args.derived.num_microbatches, 0)
    assert _plan_numbers(out)[3] == format_bytes(m.total)
    assert m.parameters == stage_parameters(args, layout, 0)[0] - 3072 * args.model.hidden_size

    # without a tokenizer the default is named as assumed
    code, out, _ = _dry(capsys, "--preset", "tiny-dense")
    assert code == 0 and "vocab 4096 (assumed: give --tokenizer-model" in out


def test_dry_run_refuses_a_missing_tokenizer_or_one_larger_than_vocab_size(capsys,
                                                                            small_tokenizer):
    code, out, err = _dry(capsys, "--tokenizer-model", "/nonexistent/tok.model")
    assert code == 2 and "tokenizer model not found: /nonexistent/tok.model" in err
    # planned elsewhere than the job runs: with a vocabulary given, the plan goes on and says
    code, out, err = _dry(capsys, "--tokenizer-model", "/nonexistent/tok.model",
                          "--vocab-size", "4096")
    assert code == 0 and "tokenizer model not found: /nonexistent/tok.model" in out
    assert "planned with --vocab-size 4096" in out and "vocab 4096 (--vocab-size)" in out
    code, out, err = _dry(capsys, "--tokenizer-model", small_tokenizer, "--vocab-size", "512")
    assert code == 2 and "the tokenizer's vocabulary (1000) is larger than --vocab-size 512" in err


@pytest.mark.parametrize("flags,message", [
    (("--tensor-model-parallel-size", "2", "--world-size", "3"),
     "world size 3 is not divisible by TP x PP x CP = 2"),
    (("--micro-batch-size", "3", "--world-size", "2"), "--global-batch-size 16 is not divisible"),
    (("--preset", "tiny-moe", "--expert-model-parallel-size", "4", "--world-size", "2"),
     "--expert-model-parallel-size 4"),
    (("--world-size", "0"), "world size 0"),
])
def test_impossible_layouts_exit_2(capsys, flags, message):
    code, out, err = _dry(capsys, *flags)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "plan" not in out


def test_bad_gpu_memory_env_exits_2(capsys, monkeypatch):
    monkeypatch.setenv(GPU_MEMORY_ENV, "lots")
    code, _, err = _dry(capsys)
    assert code == 2 and GPU_MEMORY_ENV in err


def test_too_large_for_the_gpu_exits_3_with_what_to_change(capsys, monkeypatch):
    flags = ("--preset", "dense-3b", "--micro-batch-size", "4", "--world-size", "8",
             "--tensor-model-parallel-size", "2")
    code, out, err = _dry(capsys, *flags)
    assert code == 3
    assert "DOES NOT FIT" in out
    assert "exceeds the GPU memory (80 GiB" in err
    for fix in ("--use-distributed-optimizer", "--micro-batch-size", "--sequence-parallel",
                "--pipeline-model-parallel-size"):
        assert fix in err
    # the same layout fits a larger GPU
    monkeypatch.setenv(GPU_MEMORY_ENV, "400")
    code, out, _ = _dry(capsys, *flags)
    assert code == 0 and "of 400 GiB" in out


@pytest.mark.distributed
def test_entry_script_dry_run_starts_no_process_group():
    code = (
        "import runpy, sys, torch\n"
        "sys.argv = ['pretrain_moe_nitp.py', '--preset', 'moe-1.9b-a0.3b', '--train-iters', '9000',"
        " '--world-size', '16', '--expert-model-parallel-size', '8', '--micro-batch-size', '1',"
        " '--dry-run']\n"
        "try:\n"
        "    runpy.run_path('pretrain_moe_nitp.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('EXIT', exit.code)\n"
        "print('DIST', torch.distributed.is_initialized())\n"
    )
    proc = run_python_code(code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 0" in proc.stdout and "DIST False" in proc.stdout
    assert "moe-1.9b-a0.3b (MoE GPT)" in proc.stdout
    assert "EP 8 (expert DP 2)" in proc.stdout


def test_comm_bytes_tool_compares_the_routing_with_full_width_routing(capsys):
    """tools/nitp_comm_bytes.py --compare: without SP each TP rank routes half the bytes of
    full-width routing, and the send buffers held at once are min(PP - owner, M)
    micro-batches' instead of the step's M; under SP only the buffers change."""
    import json

    tool = load_tool("nitp_comm_bytes")
    flags = ["--preset", "tiny-dense", "--num-layers", "4", "--nitp-target-layer", "1",
             "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
             "--micro-batch-size", "1", "--global-batch-size", "8", "--compare", "--json"]
    for sp in (False, True):
        tool.main(flags + (["--sequence-parallel"] if sp else []))
        result = json.loads(capsys.readouterr().out)
        before, micro = result["full_width_routing"], result["num_microbatches"]
        per_micro = result["bytes_per_microbatch_per_rank"]
        assert micro == 8 and result["owner_stage"] == 0
        assert before["bytes_per_microbatch_per_rank"] == per_micro * (1 if sp else 2)
        assert result["peak_bytes_held_per_rank"] == 2 * per_micro
        assert before["peak_bytes_held_per_rank"] == micro * before[
            "bytes_per_microbatch_per_rank"]
    tool.main(flags[:-1])
    out = capsys.readouterr().out
    assert "full-width" in out and "send buffers held at once" in out
