"""Core attention through torch's ``scaled_dot_product_attention`` for the local layer spec.

megatron-core's local spec computes attention with ``DotProductAttention``, which materializes
the ``[b, heads, s, s]`` scores (at the paper's sequence 8192, 14 heads and micro-batch 1: 3.5
GiB per layer in bf16) and runs an unfused softmax. Without Transformer Engine that is what a
GPU machine with PyPI torch runs; torch's SDPA runs flash / memory-efficient kernels there and a
fused kernel on CPU, with the same result. ``--attention-backend sdpa`` (``auto`` without TE)
puts :class:`SDPAttention` in the spec's ``core_attention`` slot: the same module interface,
the same parameters (none), the same scale and causal mask, the same dropout RNG stream
(megatron-core's tracker, forked under TP).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` with its forward computed by ``F.scaled_dot_product_attention``
    (causal self-attention only: what GPT training uses; anything else is refused at the call).
    An explicit ``attention_mask`` (``--reset-attention-mask``: causal within each packed
    document) replaces the causal one, as in megatron-core's unfused softmax."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``query`` ``[sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]`` (this TP rank's
        heads and query groups) -> ``[sq, b, np * hn]``. ``attention_mask``: None (causal), or
        megatron-core's bool ``[b or 1, 1, sq, sk]`` with True = masked out."""
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type != AttnMaskType.causal or attention_bias is not None or (
                packed_seq_params is not None) or self.softmax_offset is not None:
            raise ValueError("--attention-backend sdpa serves causal self-attention without "
                             "bias, packed sequences or softmax offsets; use "
                             "--attention-backend unfused for this model.")
        if query.shape[0] != key.shape[0]:
            raise ValueError(f"--attention-backend sdpa: {query.shape[0]} queries against "
                             f"{key.shape[0]} keys (a KV cache); use --attention-backend unfused.")
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # GQA: each query group's key/value serves `groups` heads
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        scale = self.softmax_scale
        if self.config.apply_query_key_layer_scaling:  # the softmax multiplies it back
            scale *= self.layer_number
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout
               and not self.config.sequence_parallel else contextlib.nullcontext())
        # SDPA's boolean mask is the opposite of megatron-core's: True = may attend
        allowed = None if attention_mask is None else ~attention_mask.bool()
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                     dropout_p=dropout,
                                                     is_causal=allowed is None, scale=scale)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1],
                                                    self.hidden_size_per_partition)


def use_sdpa(spec) -> None:
    """Puts :class:`SDPAttention` in the ``core_attention`` slot of a layer spec, or of every
    layer of a block spec (MoE: ``layer_specs``), in place."""
    layers = getattr(spec, "layer_specs", None) or [spec]
    for layer in layers:
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
