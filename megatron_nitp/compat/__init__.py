"""Compatibility layer between megatron-core and the machine it runs on.

Every patch works around one megatron-core call that fails when something is missing: CUDA
(`compat.cpu`), or Transformer Engine / Apex (`compat.te`, which a GPU machine can lack too).
``PATCHES`` lists them with what each needs and the megatron-core versions that have the
problem; ``select`` is the pure rule that picks them for a machine, and ``apply`` applies what
``select`` picks for this process. ``apply()`` is idempotent and safe to call unconditionally:
on a GPU with Transformer Engine (or Apex) it patches nothing, so the code that trains on
clusters is megatron-core unchanged.

No megatron-core import at module level: ``megatron_nitp/__init__.py`` imports this package
before megatron-core is first imported (its triton stub must come first).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_nitp.compat import cpu, te


@dataclasses.dataclass(frozen=True)
class Environment:
    """What the patches depend on: CUDA, Transformer Engine, Apex's FusedAdam, megatron-core."""

    cuda: bool
    te: bool
    apex: bool
    mcore: Version


@dataclasses.dataclass(frozen=True)
class Need:
    """A condition on the environment under which a megatron-core call fails."""

    name: str
    test: Callable[[Environment], bool]

    def __call__(self, env: Environment) -> bool:
        return self.test(env)


NO_CUDA = Need("no CUDA", lambda e: not e.cuda)
NO_TE = Need("no Transformer Engine", lambda e: not e.te)
# kernels.use_transformer_engine(): TE's layer spec needs both CUDA and TE.
LOCAL_SPEC = Need("the local layer spec (no CUDA or no Transformer Engine)",
                  lambda e: not (e.cuda and e.te))
# megatron.core.optimizer (and its distrib_optimizer) take TE's FusedAdam, else Apex's, else
# torch's AdamW ("Falling back to Torch optimizers").
TORCH_ADAM = Need("torch's Adam (neither TE's nor Apex's FusedAdam)",
                  lambda e: not (e.te or e.apex))


@dataclasses.dataclass(frozen=True)
class Patch:
    """One workaround: ``fn`` (its docstring names the megatron-core call it fixes), applied
    when ``needs`` holds and megatron-core's version is in ``versions`` (a PEP 440 specifier
    set; "" = every version: the problem is in all the versions inspected, 0.16.1 to 0.19.2)."""

    fn: Callable[[], None]
    needs: Need
    versions: str = ""

    @property
    def name(self) -> str:
        return self.fn.__name__

    def applies(self, env: Environment) -> bool:
        return self.needs(env) and SpecifierSet(self.versions).contains(env.mcore,
                                                                        prereleases=True)


# In the order they are applied. Versions inspected: 0.16.1, 0.17.0, 0.18.0, 0.19.2.
PATCHES: tuple[Patch, ...] = (
    Patch(cpu.patch_cuda_runtime, NO_CUDA),
    Patch(cpu.patch_rng_tracker, NO_CUDA),
    Patch(cpu.patch_moe_split_sizes, NO_CUDA),
    Patch(cpu.patch_default_causal_mask, NO_CUDA),
    Patch(te.patch_moe_router_without_te, NO_TE, "<0.17"),
    Patch(te.patch_torch_norm_sequence_parallel, LOCAL_SPEC),
    Patch(te.patch_distributed_optimizer_step_state, TORCH_ADAM),
    Patch(te.patch_distributed_optimizer_shared_step, TORCH_ADAM),
    Patch(cpu.enter_cuda_to_cpu_mode, NO_CUDA),
)


def select(cuda: bool, te: bool, apex: bool, mcore_version: str | Version) -> list[Patch]:
    """The patches a process with (or without) CUDA, Transformer Engine and Apex's FusedAdam
    needs on this megatron-core version, in the order they are applied."""
    env = Environment(bool(cuda), bool(te), bool(apex), Version(str(mcore_version)))
    return [patch for patch in PATCHES if patch.applies(env)]


def megatron_core_version() -> Version:
    """The installed megatron-core's version (package metadata, else its package_info)."""
    from importlib import metadata

    try:
        return Version(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError:
        from megatron.core import package_info

        return Version(package_info.__version__)


def environment() -> Environment:
    """This process: CUDA, Transformer Engine importable (what megatron's ``HAVE_TE`` checks),
    Apex's FusedAdam importable (megatron-core's optimizer fallback after TE's), as
    ``megatron_nitp.kernels`` decides them; megatron-core's version."""
    from megatron_nitp import kernels

    k = kernels.available()
    return Environment(cuda=k.cuda, te=k.te, apex=k.apex_fused_adam,
                       mcore=megatron_core_version())


_APPLIED: tuple[str, ...] | None = None


def apply() -> bool:
    """Applies, once per process, the patches ``select`` picks for this machine. Call it
    unconditionally before megatron-core builds anything. Returns True if any patch is active."""
    global _APPLIED
    if _APPLIED is None:
        env = environment()
        cpu.install_import_stubs()  # no-op unless triton is missing (normally already done)
        chosen = select(env.cuda, env.te, env.apex, env.mcore)
        for patch in chosen:
            patch.fn()
        _APPLIED = tuple(patch.name for patch in chosen)
    return bool(_APPLIED)


def is_applied() -> bool:
    """True once ``apply`` has activated at least one patch in this process."""
    return bool(_APPLIED)


def applied() -> tuple[str, ...]:
    """The names of the patches ``apply`` activated (empty before it ran, or on a GPU with TE)."""
    return _APPLIED or ()


__all__ = ["PATCHES", "Environment", "Need", "Patch", "applied", "apply", "environment",
           "is_applied", "megatron_core_version", "select"]
