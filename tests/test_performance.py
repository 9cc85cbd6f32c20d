"""The speed and memory flags (``config/performance.py``): each reaches megatron-core's config,
each is refused with its reason where it cannot run, and the auto fusions follow the kernels
present. Equality of the runs they change: recompute in tests/test_recompute.py (and under PP
in tests/test_parallel.py), communication overlap in tests/test_parallel.py, the router's
settings in tests/test_moe.py."""

import json

import pytest

from megatron_nitp import kernels
from megatron_nitp.config import performance
from megatron_nitp.training import model as model_module
from megatron_nitp.training.arguments import parse_args
from tests.helpers import tiny_args

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]

# flags that run on CPU -> the TransformerConfig fields (and values) they must set
CPU_FLAGS = [
    (["--cross-entropy-loss-fusion"], dict(cross_entropy_loss_fusion=True)),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "1"],
     dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)),
    (["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
     dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])),
    (["--no-rope-fusion", "--no-gradient-accumulation-fusion"],
     dict(apply_rope_fusion=False, gradient_accumulation_fusion=False)),
    (MOE + ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
            "--moe-router-bias-update-rate", "0.01", "--moe-router-load-balancing-type", "none"],
     dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
          moe_router_bias_update_rate=0.01, moe_router_load_balancing_type="none",
          moe_aux_loss_coeff=0.0)),
    (MOE + ["--moe-router-pre-softmax", "--moe-router-load-balancing-type", "seq_aux_loss",
            "--moe-z-loss-coeff", "0.001"],
     dict(moe_router_pre_softmax=True, moe_router_load_balancing_type="seq_aux_loss",
          moe_z_loss_coeff=0.001)),
    (MOE + ["--moe-expert-capacity-factor", "1.5", "--moe-token-drop-policy", "position",
            "--moe-pad-expert-input-to-capacity"],
     dict(moe_expert_capacity_factor=1.5, moe_token_drop_policy="position",
          moe_pad_expert_input_to_capacity=True)),
    (MOE + ["--expert-tensor-parallel-size", "1"], dict(expert_tensor_parallel_size=1)),
]


def _moe_type(flags):
    return "moe" if "--num-experts" in flags else "dense"


@pytest.mark.parametrize("flags,fields", CPU_FLAGS, ids=lambda v: " ".join(v)[:60]
                         if isinstance(v, list) else "")
def test_each_flag_reaches_the_transformer_config(flags, fields):
    config = tiny_args(*flags) if _moe_type(flags) == "dense" else _moe_args(flags)
    built = model_module.run_transformer_config(config)
    for name, value in fields.items():
        assert getattr(built, name) == value, name


def _moe_args(flags):
    from megatron_nitp.config import resolve

    return resolve(parse_args(["--train-iters", "2", "--lr-warmup-iters", "0"] + flags, "moe"),
                   1, 128)


@pytest.fixture
def with_te():
    """This process decides as a GPU machine with Transformer Engine and Apex's kernels (the
    NGC image) would."""
    with kernels.simulate(cuda=True, te=True, apex_fused_wgrad=True, grouped_gemm=False):
        yield


def test_gpu_flags_reach_megatron_core_where_te_is_present(with_te):
    """On a machine with TE the GPU-only flags pass the checks and land in the configs
    megatron-core builds (checked on the fields: a TransformerConfig with FP8 would itself need
    TE)."""
    flags = MOE + ["--moe-grouped-gemm", "--moe-permute-fusion", "--fp8-format", "hybrid",
                   "--fp8-recipe", "tensorwise", "--bf16", "--apply-rope-fusion",
                   "--gradient-accumulation-fusion", "--cross-entropy-loss-fusion",
                   "--cross-entropy-fusion-impl", "te", "--use-distributed-optimizer",
                   "--overlap-grad-reduce", "--overlap-param-gather"]
    config = _moe_args(flags)
    fields = performance.transformer_config_fields(config.performance, config.parallel.transformer_impl)
    assert fields["fp8"] == "hybrid" and fields["fp8_recipe"] == "tensorwise"
    assert fields["apply_rope_fusion"] and fields["gradient_accumulation_fusion"]
    assert fields["cross_entropy_loss_fusion"] and fields["cross_entropy_fusion_impl"] == "te"
    moe = model_module.moe_config(config.moe, config.parallel, config.performance,
                                 config.derived.moe_layer_pattern)
    assert moe["moe_grouped_gemm"] and moe["moe_permute_fusion"]
    assert performance.ddp_config_fields(config.performance) == dict(overlap_grad_reduce=True,
                                                         overlap_param_gather=True)


def test_overlap_reaches_megatron_ddp(dist):
    config = tiny_args("--use-distributed-optimizer", "--overlap-grad-reduce",
                       "--overlap-param-gather")
    wrapped = model_module.wrap_model(model_module.build_model(config), config)
    assert wrapped.ddp_config.overlap_grad_reduce and wrapped.ddp_config.overlap_param_gather
    assert wrapped.use_forward_hook  # the parameters are all-gathered in the next forward
    plain = tiny_args()
    wrapped = model_module.wrap_model(model_module.build_model(plain), plain)
    assert not wrapped.ddp_config.overlap_grad_reduce and not wrapped.use_forward_hook


def test_auto_fusions_follow_the_kernels():
    config = tiny_args()
    assert config.performance.gradient_accumulation_fusion is None and config.performance.apply_rope_fusion is None
    assert performance.resolved_fusions(config.performance, config.parallel.transformer_impl) == dict(gradient_accumulation_fusion=False,
                                                        apply_rope_fusion=False)  # CPU
    with kernels.simulate(cuda=True, te=True, apex_fused_wgrad=True):
        assert performance.resolved_fusions(config.performance, config.parallel.transformer_impl) == dict(gradient_accumulation_fusion=True,
                                                            apply_rope_fusion=True)
    # pip-installed TE without Apex: the output layer and the projector (megatron-core's own
    # ColumnParallelLinear) would raise at construction with the fusion on
    with kernels.simulate(cuda=True, te=True, apex_fused_wgrad=False):
        assert performance.resolved_fusions(config.performance, config.parallel.transformer_impl) == dict(gradient_accumulation_fusion=False,
                                                            apply_rope_fusion=True)
    off = tiny_args("--no-gradient-accumulation-fusion", "--no-rope-fusion")
    assert performance.resolved_fusions(off.performance, off.parallel.transformer_impl) == dict(gradient_accumulation_fusion=False,
                                                     apply_rope_fusion=False)


GPU_ONLY = [
    (MOE + ["--moe-grouped-gemm"], "--moe-grouped-gemm needs Transformer Engine"),
    (MOE + ["--moe-permute-fusion"], "--moe-permute-fusion need(s) Transformer Engine"),
    (["--fp8-format", "e4m3", "--bf16"], "--fp8-format need(s) Transformer Engine"),
    (["--apply-rope-fusion"], "--apply-rope-fusion need(s) Transformer Engine"),
    (["--gradient-accumulation-fusion"], "--gradient-accumulation-fusion needs Apex's"),
    (["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"],
     "--cross-entropy-fusion-impl te need(s) Transformer Engine"),
    (["--recompute-granularity", "selective", "--recompute-modules", "layernorm"],
     "--recompute-modules layernorm need(s) Transformer Engine"),
]


@pytest.mark.parametrize("flags,message", GPU_ONLY, ids=lambda v: v[-1] if isinstance(v, list)
                         else "")
def test_gpu_only_flags_are_refused_on_cpu_with_the_reason(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        parse_args(flags, _moe_type(flags))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "this machine has no CUDA" in err
    # --dry-run plans the job for the cluster (a login node need not have its GPUs)
    assert parse_args(flags + ["--dry-run"], _moe_type(flags)).dry_run


COMBINATIONS = [
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--fp8-format", "hybrid"], "--fp8-format needs --bf16"),
    (["--moe-router-enable-expert-bias"], "for mixture-of-experts models only"),
    (MOE + ["--moe-router-enable-expert-bias"], "needs --moe-router-score-function sigmoid"),
    (MOE + ["--moe-pad-expert-input-to-capacity"], "needs --moe-expert-capacity-factor"),
    (MOE + ["--expert-tensor-parallel-size", "3"], "not divisible by --expert-tensor-parallel"),
    (["--recompute-method", "uniform"], "--recompute-method needs --recompute-granularity"),
    (["--recompute-granularity", "full"], "needs --recompute-method (uniform or block)"),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "3"], "--recompute-num-layers 3 must be between 1 and"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "3", "--num-layers", "4"], "does not divide the layers of each"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "are for --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe"],
     "this model has no experts"),
    (MOE + ["--recompute-granularity", "selective", "--recompute-modules", "moe_act"],
     "moe_act needs --moe-grouped-gemm"),
    # the NITP target inside a full-recompute checkpoint, without stop-gradient
    (["--nitp-no-stop-gradient", "--recompute-granularity", "full", "--recompute-method",
      "uniform", "--recompute-num-layers", "1"],
     "the NITP target layer k=1 is inside a recompute checkpoint"),
    (["--num-layers", "3", "--nitp-no-stop-gradient", "--nitp-target-layer", "2",
      "--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "2"],
     "--recompute-method block --recompute-num-layers 1 (layer 2 is layer 1 of its pipeline"),
]


@pytest.mark.parametrize("flags,message", COMBINATIONS, ids=lambda v: " ".join(v)[:60]
                         if isinstance(v, list) else "")
def test_combinations_that_cannot_run_are_refused(capsys, flags, message):
    base = ["--train-iters", "2", "--lr-warmup-iters", "0"]
    if _moe_type(flags) == "dense":
        base += ["--num-layers", "2"]
    for extra in ([], ["--dry-run"]):  # a combination is wrong on every machine
        with pytest.raises(SystemExit) as exit_:
            parse_args(base + flags + extra, _moe_type(flags))
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_no_stop_gradient_with_layer_k_outside_recomputation_is_accepted():
    """block recompute of the first layer of the stage leaves k = 2 with its graph."""
    config = tiny_args("--num-layers", "3", "--nitp-no-stop-gradient", "--nitp-target-layer", "2",
                       "--recompute-granularity", "full", "--recompute-method", "block",
                       "--recompute-num-layers", "1")
    assert performance.recomputed_layers(config.performance, [3]) == {1}
    assert performance.recomputed_layers(config.performance, [2, 2]) == {1, 3}  # per pipeline stage
    uniform = config.replace(recompute_method="uniform")
    assert performance.recomputed_layers(uniform.performance, [2, 2]) == {1, 2, 3, 4}
    assert performance.recomputed_layers(tiny_args().performance, [2]) == set()


def test_memory_benchmark_shows_recomputation_saving_memory(dist, capsys):
    """tools/memory_benchmark.py on a tiny model: full recomputation keeps less than selective,
    selective less than none, for NTP and NITP alike, and NITP adds its projector's share."""
    from tests.helpers import load_tool

    report = load_tool("memory_benchmark").main([
        "--num-layers", "2", "--hidden-size", "64", "--seq-length", "64",
        "--nitp-target-layer", "1", "--json"])
    arms = report["arms"]
    for objective in ("ntp", "nitp"):
        for peak in ("step_peak_mib", "forward_backward_peak_mib"):
            none, selective, full = (arms[f"{mode}/{objective}"][peak]
                                     for mode in ("none", "selective", "full"))
            assert full < selective < none, (objective, peak)
        for mode in ("none", "selective", "full"):  # the optimizer's step comes after
            arm = arms[f"{mode}/{objective}"]
            assert 0 < arm["forward_backward_peak_mib"] <= arm["step_peak_mib"], (mode, arm)
        planned = [arms[f"{mode}/{objective}"]["planned_activations_mib"]
                   for mode in ("none", "selective", "full")]
        assert planned[0] > planned[1] and planned[0] > planned[2], planned
    for mode in ("none", "selective", "full"):
        assert arms[f"{mode}/nitp"]["step_peak_mib"] > arms[f"{mode}/ntp"]["step_peak_mib"]
        assert arms[f"{mode}/nitp"]["resident_mib"] > arms[f"{mode}/ntp"]["resident_mib"]
    assert '"arms"' in capsys.readouterr().out


def test_step_memory_tells_the_optimizers_temporaries_from_the_forward_backward(dist):
    """An optimizer step that allocates 64 MiB more than it frees for a moment raises the step's
    peak by that much and leaves the forward-backward peak (what recomputation changes)
    where it was."""
    import torch

    from megatron_nitp.config import validate
    from megatron_nitp.training import loop
    from megatron_nitp.training.memory import step_memory
    from tests.helpers import load_tool

    tool = load_tool("memory_benchmark")
    cfg = tool.config(tool.build_parser().parse_args(
        ["--num-layers", "2", "--hidden-size", "64", "--seq-length", "64"]), {}, False)
    validate(cfg)
    run = loop.setup(cfg)
    plain = step_memory(run, 1)
    optimizer_class = type(run.optimizer)
    original = optimizer_class.step

    def step_with_a_temporary(self, *args, **kwargs):
        scratch = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB
        del scratch
        return original(self, *args, **kwargs)

    optimizer_class.step = step_with_a_temporary
    try:
        heavy = step_memory(run, 2)
    finally:
        optimizer_class.step = original
    assert "step" not in vars(run.optimizer)  # the class's method again
    assert heavy["forward_backward_peak_mib"] == pytest.approx(
        plain["forward_backward_peak_mib"], rel=0.05)
    assert heavy["step_peak_mib"] >= 64 > plain["step_peak_mib"], (plain, heavy)


def test_moe_benchmark_times_the_expert_loop_and_refuses_grouped_gemm_on_cpu(dist, tmp_path):
    """tools/moe_benchmark.py: the expert loop is timed (positive times and TFLOP/s, NITP's
    overhead from paired steps); the grouped-GEMM variants are refused on CPU with the reason,
    not run as the loop."""
    from tests.helpers import load_tool

    out = tmp_path / "moe.json"
    report = load_tool("moe_benchmark").main([
        "--preset", "tiny-moe", "--num-layers", "2", "--seq-length", "32", "--warmup-iters", "1",
        "--measure-iters", "3", "--json-out", str(out)])
    assert json.load(open(out)) == report
    for objective in ("ntp", "nitp"):
        loop = report["arms"][f"loop/{objective}"]
        assert len(loop["seconds"]) == 3 and loop["step_seconds"] == sorted(loop["seconds"])[1]
        assert loop["step_seconds"] > 0 and loop["tflops"] > 0
    # NITP's overhead pairs the arms' steps of the same iteration (interleaved, A B A B ...)
    ntp, nitp = report["arms"]["loop/ntp"], report["arms"]["loop/nitp"]
    ratios = sorted(b / a - 1 for a, b in zip(ntp["seconds"], nitp["seconds"]))
    assert nitp["overhead_paired"] == pytest.approx(ratios[1])
    for objective in ("ntp", "nitp"):
        for variant in ("grouped", "grouped+permute"):
            assert "this machine has no CUDA" in report["arms"][f"{variant}/{objective}"]["refused"]


def test_gradient_accumulation_fusion_needs_apex_even_with_te():
    """TE's layers fuse their own weight gradients, but the output layer and the projector are
    megatron-core's ColumnParallelLinear, which raises at construction without Apex's
    ``fused_weight_gradient_mlp_cuda``: refused with TE alone, accepted with Apex's kernel."""
    flags = ["--gradient-accumulation-fusion"]
    with kernels.simulate(cuda=True, te=True, apex_fused_wgrad=False):
        with pytest.raises(SystemExit):
            parse_args(flags)
    with kernels.simulate(cuda=True, te=True, apex_fused_wgrad=True):
        assert parse_args(flags).performance.gradient_accumulation_fusion is True


def test_mxfp8_needs_blackwell(capsys):
    flags = ["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8", "--bf16"]
    with kernels.simulate(cuda=True, te=True, compute_capability=(9, 0)):
        with pytest.raises(SystemExit):
            parse_args(flags)
        assert "mxfp8 needs a Blackwell GPU (compute capability 10.0 or higher), and this one " \
               "is 9.0" in capsys.readouterr().err
        assert parse_args(flags[:2] + ["--fp8-recipe", "tensorwise", "--bf16"]).performance.fp8 == "e4m3"
    with kernels.simulate(cuda=True, te=True, compute_capability=(10, 0)):
        assert parse_args(flags).performance.fp8_recipe == "mxfp8"


def test_simulation_reaches_every_decision():
    """One simulated machine changes every consumer's answer: the layer spec, the fused softmax,
    the compatibility patches, the kernel checks; leaving it restores this machine's."""
    from megatron_nitp import compat

    real = kernels.available()
    with kernels.simulate(cuda=True, te=True, apex_fused_adam=True, fused_softmax=True) as k:
        assert kernels.available() == k and k.compute_capability == (9, 0)
        assert kernels.use_transformer_engine()
        assert not kernels.use_transformer_engine("local")
        assert kernels.fused_softmax_available()
        env = compat.environment()
        assert (env.cuda, env.te, env.apex) == (True, True, True)
        assert compat.select(env.cuda, env.te, env.apex, env.mcore) == []
    assert kernels.available() == real and not kernels.use_transformer_engine()


def test_simulation_through_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "cuda=1,te=1,grouped_gemm=0,cc=10.0")
    k = kernels.available()
    assert (k.cuda, k.te, k.grouped_gemm, k.compute_capability) == (True, True, False, (10, 0))
    monkeypatch.setenv(kernels.ENV_VAR, "tee=1")
    with pytest.raises(ValueError, match="'tee=1' is not name=0|1"):
        kernels.available()
