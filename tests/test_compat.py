"""The compatibility layer: which patches a machine gets (pure rule, every combination of CUDA,
Transformer Engine and Apex), on which megatron-core versions, and that each one documents the
call it fixes."""


import pytest
from packaging.version import Version

from megatron_nitp import compat
from megatron_nitp.compat import cpu, te
from tests.helpers import run_python_code

CUDA_ONLY = {"patch_cuda_runtime", "patch_rng_tracker", "patch_moe_split_sizes",
             "patch_default_causal_mask", "enter_cuda_to_cpu_mode"}
TE_APEX = {"patch_moe_router_without_te", "patch_torch_norm_sequence_parallel",
           "patch_distributed_optimizer_step_state", "patch_distributed_optimizer_shared_step"}


def names(*args):
    return {patch.name for patch in compat.select(*args)}


def test_every_patch_is_in_the_table_once_and_documents_its_call():
    table = [patch.name for patch in compat.PATCHES]
    assert sorted(table) == sorted(CUDA_ONLY | TE_APEX)
    for patch in compat.PATCHES:
        doc = patch.fn.__doc__ or ""
        assert "``" in doc, f"{patch.name}: the docstring must name the megatron-core call"
        assert patch.needs.name


@pytest.mark.parametrize("version", ["0.16.1", "0.19.2"])
def test_cpu_without_te_gets_everything_it_needs(version):
    want = CUDA_ONLY | TE_APEX
    if version != "0.16.1":  # te_general_gemm is defined (None) by megatron-core from 0.17 on
        want -= {"patch_moe_router_without_te"}
    assert names(False, False, False, version) == want


@pytest.mark.parametrize("version", ["0.16.1", "0.19.2"])
def test_gpu_without_te_or_apex_gets_the_te_apex_patches_and_no_cuda_one(version):
    got = names(True, False, False, version)
    assert not got & CUDA_ONLY
    want = set(TE_APEX)
    if version != "0.16.1":
        want -= {"patch_moe_router_without_te"}
    assert got == want


def test_gpu_with_te_and_apex_gets_nothing():
    for version in ("0.16.1", "0.17.0", "0.19.2"):
        assert names(True, True, True, version) == set()
        assert names(True, True, False, version) == set()  # TE's FusedAdam suffices


def test_gpu_with_apex_but_no_te():
    # Apex's FusedAdam: no torch Adam "step"; the local spec and (0.16) the router still need TE
    assert names(True, False, True, "0.16.1") == {"patch_moe_router_without_te",
                                                  "patch_torch_norm_sequence_parallel"}
    assert names(True, False, True, "0.19.2") == {"patch_torch_norm_sequence_parallel"}


def test_cpu_with_te_installed_still_uses_the_local_spec():
    # kernels.use_transformer_engine() needs CUDA too: the local norm is patched
    got = names(False, True, False, "0.16.1")
    assert got == CUDA_ONLY | {"patch_torch_norm_sequence_parallel"}


def test_version_ranges():
    router = next(p for p in compat.PATCHES if p.name == "patch_moe_router_without_te")
    env = dict(cuda=True, te=False, apex=False)
    assert router.applies(compat.Environment(mcore=Version("0.16.1"), **env))
    assert router.applies(compat.Environment(mcore=Version("0.16.0rc0"), **env))
    assert not router.applies(compat.Environment(mcore=Version("0.17.0"), **env))
    assert not router.applies(compat.Environment(mcore=Version("0.19.2"), **env))


def test_this_machine():
    env = compat.environment()
    assert env.mcore == compat.megatron_core_version()
    chosen = compat.select(env.cuda, env.te, env.apex, env.mcore)
    assert [p.name for p in chosen] == [p.name for p in compat.PATCHES if p.applies(env)]


@pytest.mark.distributed
def test_apply_decides_by_itself_in_a_fresh_process():
    """apply() may be called unconditionally: here (no CUDA, no TE) it applies the table's
    choice, once; is_applied()/applied() report it."""
    code = (
        "import megatron_nitp\n"
        "from megatron_nitp import compat\n"
        "assert not compat.is_applied() and compat.applied() == ()\n"
        "env = compat.environment()\n"
        "want = tuple(p.name for p in compat.select(env.cuda, env.te, env.apex, env.mcore))\n"
        "assert compat.apply() is True and compat.apply() is True\n"
        "assert compat.is_applied() and compat.applied() == want, compat.applied()\n"
        "import torch\n"
        "assert torch.zeros(1, device='cuda').device.type == 'cpu'\n"
        "from megatron.core.transformer.moe import moe_utils\n"
        "print(env.mcore, ','.join(want), moe_utils.te_general_gemm)\n"
    )
    proc = run_python_code(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("None")


def test_modules_split_by_cause():
    assert all(p.fn.__module__ == cpu.__name__ for p in compat.PATCHES if p.name in CUDA_ONLY)
    assert all(p.fn.__module__ == te.__name__ for p in compat.PATCHES if p.name in TE_APEX)


def test_megatron_jit_runs_eagerly_without_cuda_and_other_code_still_compiles():
    """compat.cpu.skip_megatron_jit: megatron-core's jit_fuser (torch.compile) returns its own
    helpers unchanged on CPU, so no process compiles C++ for them; torch.compile of anything
    else still compiles."""
    import torch

    from megatron_nitp.device import has_cuda

    if has_cuda():
        pytest.skip("the patch applies without CUDA only")
    from megatron.core.fusions import fused_bias_dropout
    from megatron.core.jit import jit_fuser

    def mine(x):
        return x + 1

    assert jit_fuser(fused_bias_dropout._bias_dropout_add_func) is \
        fused_bias_dropout._bias_dropout_add_func
    assert fused_bias_dropout.bias_dropout_add_fused_train.__module__.startswith("megatron.core")
    assert torch.compile(mine) is not mine and torch.compile()(mine) is not mine
    cpu.skip_megatron_jit()  # idempotent: no second wrapper
    assert not hasattr(getattr(torch.compile, "__wrapped__", None), "_nitp_skips_megatron")
