"""Patches that let megatron-core's real code paths run on a machine without CUDA (gloo).

megatron-core is written for CUDA: it allocates with ``device=torch.cuda.current_device()``,
hard-codes ``device="cuda"`` in the schedules, keeps its RNG tracker in CUDA generators and
synchronizes CUDA streams. None of that exists in a CPU wheel of torch. Each patch below names
the megatron-core call it fixes and is the smallest change that makes that call run on CPU.

`megatron_nitp.compat` applies them only when there is no CUDA (``PATCHES`` there); on a GPU
none of them touches megatron-core. The patches about a missing Transformer Engine or Apex
(which a GPU machine can lack too) live in `megatron_nitp.compat.te`.

Also here, called by ``megatron_nitp/__init__.py`` before megatron-core is first imported:
``install_import_stubs`` (where triton is missing) and ``quiet_import_warnings`` (without CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

_MODE = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device argument to CPU.

    Fixes, among ~175 call sites:
    - ``torch.empty/zeros/ones/tensor(..., device=torch.cuda.current_device())`` in DDP param
      and grad buffers, the global memory buffer of core attention, p2p receive buffers and the
      optimizer (``megatron.core.distributed``, ``megatron.core.optimizer``, ``pipeline_parallel.p2p_communication``);
    - ``torch.zeros([], dtype=torch.int, device="cuda")`` in every schedule of
      ``pipeline_parallel.schedules`` (total_num_tokens);
    - ``transformer.utils.get_default_causal_mask`` (``device="cuda"``; also patched by
      ``patch_default_causal_mask`` for the recomputation in the backward pass);
    - ``tensor.cuda()`` / ``tensor.to("cuda")`` in ``optimizer.clip_grads`` and DDP;
    - ``param.type() == 'torch.cuda.FloatTensor'`` in the distributed optimizer's dtype checks,
      answered with the CUDA type name so the CPU tensors pass them.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: every method is a no-op on CPU and returns
    another null object, so chains such as ``stream.record_event().synchronize()`` (the MoE
    alltoall dispatcher's device-to-host sync) work."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: _NullStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def patch_cuda_runtime() -> None:
    """torch.cuda entry points that megatron-core calls unconditionally: ``torch.cuda.
    current_device()`` as an allocation device (DDP buffers, optimizer, p2p), ``synchronize``
    (``p2p_communication`` with batch_p2p_sync, timers), ``Stream``/``Event``/``current_stream``
    (the MoE alltoall dispatcher, DDP overlap), and the CUDA RNG calls of
    ``tensor_parallel.random`` (``manual_seed``, ``get_rng_state``/``set_rng_state``)."""
    cuda = torch.cuda
    # device=torch.cuda.current_device() at ~175 call sites: answer the CPU device itself, so the
    # allocation is right even where the mode is not active - inside a mode handler (e.g. in the
    # custom autograd backward functions that torch.autograd.backward runs) modes are disabled.
    cuda.current_device = lambda: torch.device("cpu")
    # p2p_communication (batch_p2p_sync), DDP and timers call torch.cuda.synchronize().
    cuda.synchronize = lambda *args, **kwargs: None
    # MoE alltoall dispatcher, DDP overlap and the optimizer create and wait on streams/events.
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *args, **kwargs: _NullStream()
    cuda.default_stream = lambda *args, **kwargs: _NullStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *args, **kwargs: None
    # tensor_parallel.random's tracker seeds and forks CUDA generators: use the CPU one.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.memory_allocated = lambda *args, **kwargs: 0
    cuda.max_memory_allocated = lambda *args, **kwargs: 0


def patch_rng_tracker() -> None:
    """``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`` (used by
    ``CudaRNGStatesTracker.add/fork`` and ``model_parallel_cuda_manual_seed``) read and write
    ``torch.cuda.default_generators``; route them to the CPU generator."""
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    class _DropForkWarning(logging.Filter):
        # CudaRNGStatesTracker.fork warns when the CPU RNG moved inside a fork; on CPU the
        # forked generator *is* the CPU generator, so the warning is always true and meaningless.
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(tp_random.__name__).addFilter(_DropForkWarning())


# The megatron modules that import triton unconditionally and are imported by megatron.core
# itself (through pipeline_parallel/schedules.py): 0.18 has the first, 0.19 the second.
_TRITON_MODULES = (
    "megatron.core.transformer.moe.paged_stash",
    "megatron.core.transformer.moe.ops.paged_stash",
)


def install_import_stubs() -> None:
    """megatron-core 0.18 and 0.19: ``pipeline_parallel/schedules.py`` (imported by
    ``megatron.core`` itself) imports the MoE paged stash (``transformer/moe/paged_stash.py`` in
    0.18, ``transformer/moe/ops/paged_stash.py`` in 0.19), which imports ``triton``
    unconditionally; the CPU wheel of torch has no triton. A stub of that one megatron module (a
    fake top-level ``triton`` would break torch's own compiler imports) lets megatron-core
    import. It must be registered before the first ``import megatron.core``, which is why
    ``megatron_nitp/__init__.py`` calls this. Nothing is stubbed when triton exists (whether or
    not there is CUDA) or when megatron-core has no such module (0.16, 0.17)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is not None:
        return
    megatron_spec = importlib.util.find_spec("megatron")
    if megatron_spec is None or not megatron_spec.submodule_search_locations:
        return
    for name in _TRITON_MODULES:
        relative = os.path.join(*name.split(".")[1:]) + ".py"
        if name in sys.modules or not any(
                os.path.exists(os.path.join(root, relative))
                for root in megatron_spec.submodule_search_locations):
            continue
        stub = types.ModuleType(name)

        def _unavailable(*args, **kwargs):
            raise RuntimeError("megatron-core's paged stash needs triton and CUDA; not here")

        def _getattr(attr, _unavailable=_unavailable):
            if attr.startswith("__"):  # inspect and pickle probe dunders: a plain module
                raise AttributeError(attr)
            return _unavailable

        stub.__getattr__ = _getattr  # type: ignore[assignment]
        sys.modules[name] = stub


def skip_megatron_jit() -> None:
    """megatron-core's ``megatron.core.jit.jit_fuser`` is ``torch.compile`` (torch >= 2.2), and
    its fused bias-dropout-add, activations, norms and router helpers are decorated with it at
    import. On a CUDA GPU that fuses them into one kernel; without CUDA, torch.compile imports
    the inductor at import time and, at the first call in every process, traces the function and
    compiles C++ for the CPU: seconds per process for no gain on a CPU run. Without CUDA,
    ``torch.compile`` applied to a function of megatron-core returns the function as it is (the
    same computation, eager); anything else is compiled as asked. Must run before megatron-core
    is first imported (``megatron_nitp/__init__.py``)."""
    import functools
    import inspect

    import torch

    compile_ = torch.compile
    if getattr(compile_, "_nitp_skips_megatron", False):
        return

    def _megatron_function(fn) -> bool:
        return inspect.isfunction(fn) and (fn.__module__ or "").startswith("megatron.core")

    @functools.wraps(compile_)
    def compile_except_megatron(model=None, **kwargs):
        if model is None:  # @torch.compile(...) as a decorator factory
            return lambda fn: fn if _megatron_function(fn) else compile_(fn, **kwargs)
        return model if _megatron_function(model) else compile_(model, **kwargs)

    compile_except_megatron._nitp_skips_megatron = True
    torch.compile = compile_except_megatron


def quiet_import_warnings() -> None:
    """Without CUDA, megatron-core warns at import that Transformer Engine and Apex are missing
    (expected on CPU, not news to the user). Silence those messages in this process and in the
    worker processes dist_checkpointing starts (through PYTHONWARNINGS)."""
    import os
    import warnings

    messages = (
        "Transformer Engine and Apex are not installed",
        "Apex is not installed",
        "Transformer Engine is not installed",
        "full scope is deprecated",
    )
    for message in messages:
        warnings.filterwarnings("ignore", message=".*" + message)
    inherited = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    wanted = [f"ignore:{m}" for m in messages if f"ignore:{m}" not in inherited]
    os.environ["PYTHONWARNINGS"] = ",".join(inherited + wanted)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)


def patch_default_causal_mask() -> None:
    """``transformer.utils.get_default_causal_mask`` (imported by name in
    ``fusions.fused_softmax``) builds the ``[sq, sq]`` mask with ``device="cuda"``. The CUDA-to-CPU
    function mode maps that in the forward pass, but activation recomputation runs attention
    again inside the backward pass, where torch function modes are off: build it on the CPU."""
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=4)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def patch_moe_split_sizes() -> None:
    """``transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher`` (EP > 1) turns its split
    sizes into NumPy through ``moe_utils.maybe_move_tensor_to_cpu(as_numpy=True)``, which only
    converts CUDA tensors; CPU tensors reach ``all_to_all_single`` as tensors (TypeError).
    Convert CPU tensors too.

    With TP > 1 the same dispatcher gathers each expert-TP rank's (uneven) share of the tokens
    through ``tensor_parallel.mappings._gather_along_first_dim(output_split_sizes=...)``, also
    in the backward of its reduce-scatter; that calls ``all_gather`` with tensors of different
    sizes, which gloo refuses ("ProcessGroupGloo::allgather: invalid tensor size"). Gather
    zero-padded equal-size blocks and cut each rank's rows out instead."""
    try:
        from megatron.core.tensor_parallel import mappings
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
    except ImportError:
        return
    gather = mappings._gather_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, *args, **kwargs):
        if output_split_sizes is None or len(set(output_split_sizes)) <= 1:
            return gather(input_, group, output_split_sizes, *args, **kwargs)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(blocks, padded, group=group)
        return torch.cat([block[:size] for block, size in zip(blocks, output_split_sizes)])

    mappings._gather_along_first_dim = _gather_along_first_dim
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def enter_cuda_to_cpu_mode() -> None:
    """Enters `CudaToCpuMode` for the rest of the process: ``device="cuda"`` and
    ``device=torch.cuda.current_device()`` allocations (schedules, DDP, optimizer, core
    attention), ``.cuda()``/``.to("cuda")`` and ``param.type() == 'torch.cuda.FloatTensor'``
    (the distributed optimizer); its docstring lists the call sites."""
    global _MODE
    if _MODE is None:
        _MODE = CudaToCpuMode()
        _MODE.__enter__()
