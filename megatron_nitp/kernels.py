"""The one place that decides which fast kernels this process has.

megatron-core's fast paths need libraries that a CPU machine, and a GPU machine with plain PyPI
torch, lack: Transformer Engine (its layer spec, grouped-GEMM experts, fused permutation, fused
RoPE, FP8, TE's cross entropy, context-parallel attention), Apex (FusedAdam; the
``fused_weight_gradient_mlp_cuda`` kernel of gradient-accumulation fusion in megatron-core's
own linear layers; the masked-softmax kernels of the local spec) and the ``grouped_gemm``
package (the local GroupedMLP). Every other module asks here (the config checks in
``config/``, the compatibility patches in ``compat``, the layer spec and fusions in
``training/model.py``, ``tools/check_env.py``): :func:`available` for the whole answer,
:func:`use_transformer_engine`, :func:`fused_softmax_available` and :func:`why_not_te` for the
decisions several of them take; none imports those libraries to find out.

Tests decide for a machine they are not on with :func:`simulate`: the config checks, the auto
fusions and the patch selection then answer as they would there (nothing is built with the
simulated kernels: a model needs the real libraries). A subprocess inherits a simulation through
``$MEGATRON_NITP_SIMULATE_KERNELS`` (``name=0|1,...``, compute capability as ``cc=9.0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os

ENV_VAR = "MEGATRON_NITP_SIMULATE_KERNELS"


@dataclasses.dataclass(frozen=True)
class Kernels:
    """What this process provides. A kernel is usable only where ``cuda`` is true too: a CPU
    machine with TE installed still runs the local spec (:attr:`te_layers`)."""

    cuda: bool
    te: bool
    """Transformer Engine importable (what megatron-core's ``HAVE_TE`` checks)"""
    apex_fused_adam: bool
    """Apex's ``FusedAdam`` (megatron-core's optimizer takes TE's, else Apex's, else torch's)"""
    apex_fused_wgrad: bool
    """Apex's ``fused_weight_gradient_mlp_cuda``: gradient-accumulation fusion in megatron-core's
    own ``ColumnParallelLinear``/``RowParallelLinear``, which the output layer and the NITP
    projector are even with TE's layer spec (their constructors raise without it)"""
    grouped_gemm: bool
    """the ``grouped_gemm`` package (megatron-core's local GroupedMLP)"""
    fused_softmax: bool
    """Apex's ``scaled_masked_softmax_cuda`` and ``scaled_upper_triang_masked_softmax_cuda``"""
    compute_capability: tuple[int, int] | None = None
    """the current GPU's (major, minor), e.g. (9, 0) for Hopper; None without CUDA"""

    def te_layers(self, transformer_impl: str = "transformer_engine") -> bool:
        """Whether the model is built from TE's layers: asked for (``--transformer-impl``) and
        TE and CUDA both present."""
        return transformer_impl == "transformer_engine" and self.cuda and self.te


def _importable(module: str, attr: str | None = None, load: bool = False) -> bool:
    """The module is found (``load``: and imports, with ``attr``); a broken install, e.g. TE
    without its CUDA libraries, counts as missing. CUDA extensions are only looked up."""
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        if not (load or attr or "." in module):
            return True
        loaded = importlib.import_module(module)
        return attr is None or hasattr(loaded, attr)
    except Exception:  # noqa: BLE001 - ImportError, or OSError from a broken CUDA install
        return False


@functools.lru_cache(maxsize=None)
def detect() -> Kernels:
    """What this machine really has (import checks; once per process)."""
    from megatron_nitp import device

    return Kernels(
        cuda=device.has_cuda(),
        te=_importable("transformer_engine", load=True),
        apex_fused_adam=_importable("apex.optimizers", "FusedAdam"),
        apex_fused_wgrad=_importable("fused_weight_gradient_mlp_cuda"),
        grouped_gemm=_importable("grouped_gemm"),
        fused_softmax=all(_importable(name) for name in (
            "scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")),
        compute_capability=device.compute_capability(),
    )


_SIMULATED: Kernels | None = None


def parse(text: str, base: Kernels) -> Kernels:
    """``base`` with the settings of ``text`` (``cuda=1,te=0,cc=9.0``), the format of
    ``$MEGATRON_NITP_SIMULATE_KERNELS``."""
    fields = {f.name for f in dataclasses.fields(Kernels)}
    changes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name == "cc":
            major, _, minor = value.partition(".")
            changes["compute_capability"] = (int(major), int(minor or 0))
        elif name in fields and value in ("0", "1"):
            changes[name] = value == "1"
        else:
            raise ValueError(f"${ENV_VAR}: '{item}' is not name=0|1 or cc=MAJOR.MINOR "
                             f"(names: {', '.join(sorted(fields - {'compute_capability'}))})")
    return dataclasses.replace(base, **changes)


def available() -> Kernels:
    """The kernels every decision uses: the simulated ones inside :func:`simulate` or under
    ``$MEGATRON_NITP_SIMULATE_KERNELS``, else :func:`detect`'s."""
    if _SIMULATED is not None:
        return _SIMULATED
    text = os.environ.get(ENV_VAR)
    return parse(text, detect()) if text else detect()


@contextlib.contextmanager
def simulate(**settings):
    """Decide as a machine with these kernels would (fields of :class:`Kernels`; the rest as
    this machine). With ``cuda=True`` and no ``compute_capability``, Hopper's (9, 0)."""
    global _SIMULATED
    base = available()
    if settings.get("cuda") and "compute_capability" not in settings:
        settings["compute_capability"] = base.compute_capability or (9, 0)
    previous, _SIMULATED = _SIMULATED, dataclasses.replace(base, **settings)
    try:
        yield _SIMULATED
    finally:
        _SIMULATED = previous


def use_transformer_engine(impl: str = "transformer_engine") -> bool:
    """Transformer Engine layers when asked for (``--transformer-impl``, the default) and TE and
    CUDA are both present."""
    return available().te_layers(impl)


def why_not_te(impl: str = "transformer_engine") -> str:
    """Why :func:`use_transformer_engine` says no, for an error message that names the fix."""
    if not available().cuda:
        return "this machine has no CUDA"
    if impl == "local":
        return "--transformer-impl local was given"
    return "Transformer Engine is not importable here"


def fused_softmax_available() -> bool:
    """megatron-core's fused masked softmax (local spec) calls Apex's CUDA extensions
    ``scaled_masked_softmax_cuda`` / ``scaled_upper_triang_masked_softmax_cuda`` and fails with
    ModuleNotFoundError at the first attention where they are missing, e.g. on a GPU with plain
    PyPI torch: fuse only when they import."""
    k = available()
    return k.cuda and k.fused_softmax
