"""GPU acceptance tests: what only a CUDA + NCCL run can show (``pytest -m gpu``).

``scripts/gpu_check.sh`` runs them on a GPU machine. Without a CUDA device they are collected
and skipped with the reason; the multi-GPU layouts need 2 GPUs. Each test launches the real
entry points (``pretrain_*.py``, ``tools/*.py``) as a user would, in bf16 on NCCL, with TE's
layer spec where Transformer Engine is installed and megatron-core's local spec otherwise.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import (
    ROOT, clean_env, python_command, run_in_own_session, run_python_code,
)
from tests.parallel_runs import Launcher, assert_state_close

try:
    import torch

    GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
except ImportError:  # pragma: no cover - torch is a dependency
    GPUS = 0

try:
    import transformer_engine  # noqa: F401

    HAS_TE = True
except ImportError:
    HAS_TE = False

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU (run scripts/gpu_check.sh there)"),
]
# Two ranks: on two GPUs, or on one shared by both ranks ($MEGATRON_NITP_SHARED_GPU=1, which
# scripts/gpu_check.sh sets on a one-GPU machine: NCCL over sockets on loopback)
SHARED_GPU = os.environ.get("MEGATRON_NITP_SHARED_GPU") == "1"
two_gpus = pytest.mark.skipif(GPUS < 2 and not SHARED_GPU,
                              reason=f"needs 2 CUDA GPUs ({GPUS} here) or "
                                     "MEGATRON_NITP_SHARED_GPU=1")


# ------------------------------------------------------------------ 2 ranks: layouts vs one rank
#
# Each layout trains 3 steps from the one-rank reference's initial checkpoint and is compared
# with it as the CPU suite compares (tests/test_parallel.py, test_moe.py): every iteration's
# losses and grad norm, and the whole state after the steps (assert_state_close, the CPU
# bounds). Tolerances: these runs are fp32 with TF32 off (torch's default; nothing here turns
# it on), so a layout differs from one rank only in the order of its sums (TP's split GEMMs,
# NCCL's ring reductions, atomics in the embedding's and the token permutation's backward):
# last-ulp differences per operation, the same class as gloo's on the CPU. The per-iteration
# figures get rel 1e-4: after the first update Adam turns those ulps into weight differences of
# a small fraction of lr (see assert_state_close), and the grad norm, a sum of squares over
# every entry, carries them (DP2 with the distributed optimizer on the CPU: 1.1e-5 at step 2);
# a missing or doubled gradient term moves it by O(1). bf16 is not compared across layouts:
# its rounding (2^-8 relative per operation) on differently ordered sums moves losses by ~1e-3,
# a bound that would also pass a missing gradient term of the NITP loss; bf16 is checked where
# it is exact instead (the 20-iteration runs below, the resume at rel 1e-4).

PARALLEL = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
            "--lr", "3e-3", "--lr-warmup-iters", "0", "--nitp-target-layer", "1"]
# Every token to every expert (top-4 of 4): the dispatchers still move every token across the
# EP ranks and back, and no near-tie in the router's top-k can flip between two layouts' last
# ulps (with top-2, on CPU, one token's flip moved layer 2's experts by O(lr)); top-2 routing
# under EP is compared on CPU (tests/test_moe.py).
MOE_PARALLEL = PARALLEL + ["--num-experts", "4", "--moe-router-topk", "4",
                           "--moe-ffn-hidden-size", "32", "--moe-layer-freq", "[0]*1+[1]*3"]
# the reference models: dense, and MoE with each token dispatcher
MODELS = {"dense": PARALLEL,
          "moe-alltoall": MOE_PARALLEL + ["--moe-token-dispatcher-type", "alltoall"],
          "moe-allgather": MOE_PARALLEL + ["--moe-token-dispatcher-type", "allgather"]}
# name: (model, layout flags), in the order the shared launch runs them: the routed target first
LAYOUTS = {
    "pp2-routing": ("dense", ["--pipeline-model-parallel-size", "2"]),  # k = 1 on stage 0
    # the interleaved schedule: rank 0 holds layers 1 and 3 as two chunks, k = 1 is routed from
    # its first chunk to rank 1's last by micro-batch identity (megatron_nitp/nitp/routing.py)
    "pp2-vpp2-routing": ("dense", ["--pipeline-model-parallel-size", "2",
                                   "--num-virtual-stages-per-pipeline-rank", "2"]),
    "tp2": ("dense", ["--tensor-model-parallel-size", "2"]),
    "tp2-sp": ("dense", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "dp2-distopt-overlap": ("dense", ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                      "--overlap-param-gather"]),
    "ep2-alltoall": ("moe-alltoall", ["--expert-model-parallel-size", "2"]),
    "ep2-allgather": ("moe-allgather", ["--expert-model-parallel-size", "2"]),
    "pp2-evaluate": ("dense", ["--pipeline-model-parallel-size", "2", "--evaluate-at", "1",
                               "--eval-iters", "2"]),
    "cp2": ("dense", ["--context-parallel-size", "2"]),  # TE's attention only
}
# The weights' bound: 1e-4, 3% of the learning rate, with isolated weights allowed up to lr
# (assert_state_close). Adam turns a gradient entry that is rounding noise in both runs into
# an update of up to lr, so single weights can differ by that much with no bug (CPU, TP2:
# 2.9e-5 after 3 steps, at the CPU suite's 3e-5); a wrong or missing gradient term moves many
# weights by O(lr), and the moments and grad norm see it too.
WEIGHT_ATOL, LR = 1e-4, 3e-3
# PP2 (with or without VPP) routes layer 1's output from stage 0: one [s, b, h] fp32 target per
# micro-batch
ROUTED_BYTES = 64 * 2 * 64 * 4 * (8 // 2)
# a hang in a collective becomes an error in 2 minutes, not the default 10
TIMEOUT = ["--distributed-timeout-minutes", "2"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Results by run name (``ref-<model>``, a layout): one launch of one rank runs the
    references (each writes its initial checkpoint), one launch of two ranks every layout
    (:class:`tests.parallel_runs.Launcher`: a crash fails only the layouts it left unfinished).
    Shared launches: on a one-GPU machine each launch costs ~20 s of start-up, and the whole
    check must fit the minutes a lent GPU gives."""
    root = tmp_path_factory.mktemp("gpu-layouts")
    init = {model: str(root / f"init-{model}") for model in MODELS}
    groups = {1: {f"ref-{model}": flags + TIMEOUT + ["--save-init", init[model]]
                  for model, flags in MODELS.items()},
              2: {name: MODELS[model] + layout + TIMEOUT + ["--load", init[model]]
                  for name, (model, layout) in LAYOUTS.items() if name != "cp2" or HAS_TE}}
    return Launcher(root, groups, timeout=420)


@two_gpus
@pytest.mark.parametrize("name", [
    *[n for n in LAYOUTS if n != "cp2"],
    pytest.param("cp2", marks=pytest.mark.skipif(
        not HAS_TE, reason="context parallelism needs Transformer Engine's attention")),
])
def test_two_rank_layout_equals_one_rank(layouts, name):
    model, layout = LAYOUTS[name]
    ref_metrics, ref_state, _ = layouts(f"ref-{model}")
    metrics, state, evaluation = layouts(name)
    assert len(metrics) == len(ref_metrics) == 3
    keys = ["lm loss", "nitp loss", "grad norm"] + (["load balancing loss"] if "moe" in model
                                                    else [])
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        assert got["nitp loss"] > 0, (name, step)
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-4), (name, step, key)
    if "--pipeline-model-parallel-size" in layout:  # the target crossed NCCL
        assert metrics[0]["routed bytes per step"] == ROUTED_BYTES
    if evaluation is not None:  # evaluate() after step 1 left every rank's state alone
        assert evaluation["metrics"]["lm loss"] > 0 and not evaluation["changed"], evaluation
    assert_state_close(state, ref_state, name, weight_atol=WEIGHT_ATOL, lr=LR)


# ------------------------------------------------------------------ one rank, bf16

# Tiny models, bf16, NCCL: 20 iterations with geometry and evaluation on.
COMMON = ["--bf16", "--train-iters", "20", "--lr", "1e-3", "--lr-warmup-iters", "2",
          "--log-interval", "1", "--geometry-interval", "5", "--eval-interval", "10",
          "--eval-iters", "2", "--no-plot", "--no-progress-bar"]
DENSE = ["--preset", "tiny-dense", "--use-distributed-optimizer"] + COMMON
MOE = ["--preset", "tiny-moe"] + COMMON


def _launch(script, run_dir, flags, nproc=1):
    """Runs an entry point (torchrun for nproc > 1); returns (stdout, stderr)."""
    cmd = python_command(os.path.join(ROOT, script), nproc)
    env = clean_env(CUBLAS_WORKSPACE_CONFIG=":4096:8")
    proc = run_in_own_session(cmd + ["--run-dir", str(run_dir)] + list(flags), timeout=180,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, out[-4000:] + err[-6000:]
    return out, err


def _history(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        history = json.load(f)["history"]
    return {key: dict((int(i), v) for i, v in points) for key, points in history.items()}


def _assert_trained(history, nitp=True):
    lm = history["lm loss"]
    assert sorted(lm) == list(range(1, 21))
    assert all(v == v and v < 20 for v in lm.values())  # finite
    first, last = sum(lm[i] for i in (1, 2, 3)) / 3, sum(lm[i] for i in (18, 19, 20)) / 3
    assert last < first - 0.5, (first, last)
    if nitp:
        assert all(0 < v < 2 for v in history["nitp loss"].values())
    assert all(v == 0 for v in history["skipped"].values())
    assert 1 < history["effective rank"][20]  # geometry on the last stage
    assert "validation lm loss" in history and 10 in history["validation lm loss"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """tiny-dense, bf16, distributed optimizer, 20 iterations, a checkpoint at 10 and 20 written
    in the background (``--async-save``: the copy to host memory, then a writer forked from a
    process that holds a CUDA context, finalized by a collective on the device; the synchronous
    save is the layouts' ``--save-init``)."""
    root = tmp_path_factory.mktemp("gpu-dense")
    out, _ = _launch("pretrain_gpt_nitp.py", root / "run",
                     DENSE + ["--save", str(root / "ckpt"), "--save-interval", "10",
                              "--async-save"])
    return root, out, _history(root / "run")


def test_dense_bf16_trains_on_nccl(dense_run):
    _, out, history = dense_run
    _assert_trained(history)
    assert "backend nccl" in out and "device cuda" in out, out[:2000]
    # the caching allocator's figures per logging interval (MB, max over ranks; memory.py)
    allocated, peak = history["memory allocated (MB)"], history["memory max allocated (MB)"]
    assert sorted(peak) == list(range(1, 21))
    assert all(0 < allocated[i] <= peak[i] <= history["memory max reserved (MB)"][i]
               for i in peak)
    assert "| memory (MB, max over ranks) allocated: " in out
    planned = [line for line in out.splitlines() if line.startswith("> memory after iteration")]
    # the caching allocator's peak (MiB for this tiny model) beside the plan's total
    assert len(planned) == 1 and re.search(
        r"peak [\d.]+ [MG]iB allocated, [\d.]+ [MG]iB reserved measured .* vs [\d.]+ GiB "
        r"planned per rank by --dry-run", planned[0]), planned


def test_distributed_optimizer_resume_is_exact(dense_run):
    """Resume at iteration 10 (a distributed-optimizer checkpoint: TE's FusedAdam when TE is
    installed) and continue to 20: the same losses and grad norms as the uninterrupted run."""
    root, _, full = dense_run
    # The run's folder holds iterations 10 and 20 (latest): resume from a copy holding 10.
    at10 = root / "ckpt10"
    shutil.copytree(root / "ckpt" / "iter_0000010", at10 / "iter_0000010")
    (at10 / "latest_checkpointed_iteration.txt").write_text("10")
    out, _ = _launch("pretrain_gpt_nitp.py", root / "resumed",
                     DENSE + ["--load", str(at10), "--save", str(root / "ckpt2")])
    assert "at iteration 10" in out
    got = _history(root / "resumed")
    assert sorted(got["lm loss"]) == list(range(11, 21))
    for key in ("lm loss", "nitp loss", "grad norm"):
        for it in range(11, 21):
            assert got[key][it] == pytest.approx(full[key][it], rel=1e-4), (key, it)


def test_moe_bf16_trains_on_nccl(tmp_path):
    _launch("pretrain_moe_nitp.py", tmp_path / "run", MOE)
    history = _history(tmp_path / "run")
    _assert_trained(history)
    assert all(v > 0 for v in history["load balancing loss"].values())


@pytest.mark.skipif(not HAS_TE, reason="Transformer Engine is not installed")
def test_dense_trains_with_local_spec_beside_te(tmp_path):
    """With TE present the default is TE's spec (the fixture run); megatron-core's local spec
    must train too."""
    _launch("pretrain_gpt_nitp.py", tmp_path / "run", DENSE + ["--transformer-impl", "local"])
    _assert_trained(_history(tmp_path / "run"))


def test_export_of_a_gpu_checkpoint_gives_the_same_logits(dense_run, tmp_path):
    """tools/export_checkpoint.py on the bf16 distributed-optimizer checkpoint; the Hugging
    Face model's logits on the GPU equal our model's."""
    pytest.importorskip("transformers")
    root, _, _ = dense_run
    code = f"""
import sys, torch, transformers
sys.path.insert(0, {ROOT!r})
sys.argv = ['export']
import importlib.util
spec = importlib.util.spec_from_file_location('export', {ROOT!r} + '/tools/export_checkpoint.py')
tool = importlib.util.module_from_spec(spec); spec.loader.exec_module(tool)
tool.main(['--load', {str(root / 'ckpt')!r}, '--output', {str(tmp_path / 'hf')!r}])
from megatron_nitp.export import load_checkpoint_model
ours, args = load_checkpoint_model({str(root / 'ckpt')!r})
ours.eval()
hf = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r},
                                                       dtype=torch.float32).cuda().eval()
g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, 4000, (2, 24), generator=g).cuda()
positions = torch.arange(24, device='cuda').expand(2, -1)
with torch.no_grad():
    mine = ours(tokens, positions, None).float()
    theirs = hf(input_ids=tokens).logits.float()
print('max abs diff', (mine - theirs).abs().max().item(), 'device', next(ours.parameters()).device)
assert (mine - theirs).abs().max().item() < 2e-3
"""
    proc = run_python_code(code, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "device cuda" in proc.stdout


def test_check_env_tiny_run_on_gpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_env.py")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "tiny run OK" in proc.stdout and "backend nccl" in proc.stdout
