"""Layout-invariant initial weights: every parameter drawn from the seed and its global identity.

megatron-core initializes each rank's parameters from that rank's RNG stream: with
``use_cpu_initialization`` the full master weight is drawn and split over TP, on GPU each TP
shard is drawn on its own, and in both cases a pipeline stage draws its layers from wherever its
stream happens to be. A stage without the embedding then starts its layers from the same RNG
state as stage 0, so its layers duplicate stage 0's, and no layout but one process gives one
process's weights (a 4-layer d=64 model: lm loss 8.3265 under PP=2 vs 8.3322 in one process, at
iteration 1).

``initialize_weights(model, seed)`` overwrites every parameter after the model is built. It
walks ``model.sharded_state_dict()``, whose keys and offsets are the layout-independent names
dist_checkpointing stores: the global layer index (in the key, or as a prepended axis of a
homogeneous block), the global expert index (a prepended axis), and each TP shard's place in the
global tensor (``global_offset``). For each tensor it

1. seeds a ``torch.Generator`` on the parameter's device from a stable hash (BLAKE2b, never
   Python's salted ``hash``) of ``(seed, key, prepended-axis offsets, row block)``,
2. draws the global tensor (without the prepended axes) in fp32, in blocks of whole rows
   (``_BLOCK_ELEMENTS`` elements at most, so an embedding is never materialized at once on
   every rank), with the rule megatron-core uses for that tensor (table below),
3. copies this rank's slice (``global_offset`` and the local shape) into the parameter, cast to
   its dtype (bf16/fp16 parameters get the rounded fp32 draw: the same under every layout).

Only the row blocks that overlap the local slice are drawn. The block size depends on the row
length only, so the rows of a vocabulary padded differently for another TP size keep their
values. A block is drawn with one call of the rule on the whole block, so the result depends on
the device's generator (CPU and CUDA give different, equally distributed, weights).

Rules (``config`` is the model's TransformerConfig; the sources are megatron-core 0.16/0.19)::

    tensor (key ends with)                         rule                          megatron source
    embedding.word_embeddings.weight (also the     config.embedding_init_method  LanguageModelEmbedding
      tied output layer: it has the same key)        (= init_method by default)
    embedding.position_embeddings.weight           config.embedding_init_method  idem
    self_attention.linear_proj.weight              config.output_layer_init_method  Attention
    mlp.linear_fc2.weight (dense, shared expert,   config.output_layer_init_method  MLP, SequentialMLP
      every routed expert)
    projector.down.weight (NITP)                   config.output_layer_init_method  nitp/projector.py
    *norm.weight, *.layer_norm_weight (TE's fused  ones (zeros with               WrappedTorchNorm, TE
      pre-linear norm), q/k_layernorm.weight         layernorm_zero_centered_gamma)
    *norm.bias, *.layer_norm_bias, *.bias          zeros                         tensor_parallel layers
    mlp.router.bias                                config.init_method            TopKRouter
    any other weight (linear_qkv, linear_fc1 both  config.init_method            (N(0, init_method_std))
      GLU halves, router, shared-expert gate,
      untied output_layer, projector gate/up/proj)

``init_method`` and ``output_layer_init_method`` are called with ``generator=``: megatron-core's
are ``functools.partial(torch.nn.init.normal_, mean=0, std=...)`` (``output_layer_init_method``
has ``std = init_method_std / sqrt(2 * num_layers)``), so the table keeps megatron's
distributions exactly; only where each number comes from changes.

The fused GLU ``linear_fc1.weight`` is a ``ShardedTensorFactory``: its build function yields the
gate and up halves as views of the parameter, each a shard of the one global ``[2 * ffn, h]``
tensor (gate rows first). Entries that are not views of a model parameter (``_extra_state``,
buffers such as the router's ``expert_bias``) are skipped; every parameter must be covered
element for element, or initialization fails naming it. Nothing is logged per tensor.

Not covered: grouped-GEMM experts (``moe_grouped_gemm``; this repository uses SequentialMLP).
"""

from __future__ import annotations

import hashlib

import torch

# Elements per drawn block: 16 Mi fp32 = 64 MiB of temporary memory at most.
_BLOCK_ELEMENTS = 1 << 24

_ONES = "ones"
_ZEROS = "zeros"


def _stream_seed(seed: int, key: str, prepended: tuple, block: int) -> int:
    """A 63-bit generator seed, stable across processes, runs and Python versions."""
    text = f"{seed}|{key}|{','.join(map(str, prepended))}|{block}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def init_rule(key: str, config):
    """What megatron-core draws for the tensor of sharded-state-dict key ``key`` under
    ``config`` (the model's megatron-core ``TransformerConfig``): a callable
    ``f(tensor, generator=g)``, or ``"ones"`` / ``"zeros"``."""
    parts = key.split(".")
    module, name = (parts[-2] if len(parts) > 1 else ""), parts[-1]
    if name in ("layer_norm_weight",) or (name == "weight" and module.endswith("norm")):
        return _ZEROS if config.layernorm_zero_centered_gamma else _ONES
    if name == "layer_norm_bias" or name == "bias":
        return config.init_method if module == "router" else _ZEROS
    if name == "weight" and module in ("word_embeddings", "position_embeddings",
                                       "tokentype_embeddings"):
        return config.embedding_init_method or config.init_method
    if name == "weight" and (module in ("linear_proj", "linear_fc2")
                             or (parts[0] == "projector" and module == "down")):
        return config.output_layer_init_method
    if name in ("weight", "gate_weight"):
        return config.init_method
    raise ValueError(f"initialize_weights: no initialization rule for {key!r}; add one to "
                     "megatron_nitp/models/initialization.py")


def _sharded_tensors(tree):
    """Every ShardedTensor in a (nested) sharded state dict, factories built."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(tree, dict):
        for value in tree.values():
            yield from _sharded_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _sharded_tensors(value)
    elif isinstance(tree, ShardedTensorFactory):
        yield from _sharded_tensors(tree.build())
    elif isinstance(tree, ShardedTensor):
        yield tree


def _draw(rule, block: torch.Tensor, generator: torch.Generator) -> None:
    if rule == _ONES:
        block.fill_(1.0)
    elif rule == _ZEROS:
        block.zero_()
    else:
        try:
            rule(block, generator=generator)
        except TypeError as err:
            raise TypeError(
                f"initialize_weights: init method {rule!r} does not accept generator=; "
                "megatron-core's init_method_normal / scaled_init_method_normal do") from err


@torch.no_grad()
def _fill(sh_ten, seed: int, config) -> None:
    """Writes this rank's slice of the global tensor of ``sh_ten`` into ``sh_ten.data``."""
    data = sh_ten.data
    axes = sh_ten.prepend_axis_num
    prepended = tuple(sh_ten.global_offset[:axes])
    shape = tuple(sh_ten.global_shape[axes:])
    start = tuple(sh_ten.global_offset[axes:])
    local = tuple(data.shape)
    if getattr(sh_ten, "flattened_range", None) is not None:
        raise ValueError(f"initialize_weights: {sh_ten.key} is a flattened shard")
    if len(shape) != len(local):
        raise ValueError(f"initialize_weights: {sh_ten.key}: global shape {shape} vs local "
                         f"{local}")
    rule = init_rule(sh_ten.key, config)
    if rule in (_ONES, _ZEROS):
        data.fill_(1.0 if rule == _ONES else 0.0)
        return
    if not shape:
        shape, start, local, data = (1,), (0,), (1,), data.view(1)
    row_numel = 1
    for size in shape[1:]:
        row_numel *= size
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, row_numel))
    first, last = start[0], start[0] + local[0]  # this rank's rows of the global tensor
    columns = tuple(slice(o, o + n) for o, n in zip(start[1:], local[1:]))
    generator = torch.Generator(device=data.device)
    for block in range(first // rows_per_block, -(-last // rows_per_block)):
        lo = block * rows_per_block
        hi = min(lo + rows_per_block, shape[0])
        values = torch.empty((hi - lo, *shape[1:]), dtype=torch.float32, device=data.device)
        generator.manual_seed(_stream_seed(seed, sh_ten.key, prepended, block))
        _draw(rule, values, generator)
        a, b = max(lo, first), min(hi, last)
        data[a - first:b - first].copy_(values[(slice(a - lo, b - lo), *columns)])


def initialize_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter of ``model`` (one unwrapped pipeline stage of megatron-core's
    GPTModel, NITP projector included) with values that depend only on ``seed`` and the
    parameter's global identity, never on the parallel layout. Call after building the model and
    before wrapping it (Float16Module, DDP)."""
    config = model.config
    params = {}
    for name, param in model.named_parameters():
        params[param.untyped_storage().data_ptr()] = [name, param, 0]
    for sh_ten in _sharded_tensors(model.sharded_state_dict()):
        data = sh_ten.data
        if not isinstance(data, torch.Tensor):
            continue
        owner = params.get(data.untyped_storage().data_ptr())
        if owner is None:
            continue  # a buffer (e.g. the router's expert_bias), not a parameter
        _fill(sh_ten, seed, config)
        owner[2] += data.numel()
    missing = [f"{name} ({done} of {param.numel()} elements)"
               for name, param, done in params.values() if done != param.numel()]
    if missing:
        raise RuntimeError("initialize_weights: not covered by the sharded state dict: "
                           + ", ".join(missing))
