"""The shapes that decide a model's parameters and FLOPs (:class:`ModelShape`), from a preset,
parsed flags or a run config, with the training flags' defaults filled.

Notation of the accounting modules: d hidden size, L layers, s sequence length, V vocabulary,
h head dim, n_q / n_kv query / key-value heads (q = n_q h, kv = n_kv h), f dense FFN width, E
experts, k routed top-k, f_e expert FFN width, f_s shared-expert FFN width, r projector width
ratio (paper: 4).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_nitp.config import DEFAULT_VOCAB_SIZE, RunConfig, padded_vocab
from megatron_nitp.config.presets import moe_layer_pattern
from megatron_nitp.config.schema import ModelConfig

#: the training flags' ``--make-vocab-size-divisible-by`` default
VOCAB_DIVISIBLE_BY = ModelConfig.make_vocab_size_divisible_by


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shapes that decide FLOPs and parameters, with the training flags' defaults filled."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    ffn_hidden_size: Optional[int] = None  # default 4 d
    num_query_groups: Optional[int] = None  # default n_q (no GQA)
    kv_channels: Optional[int] = None  # default d / n_q
    vocab_size: Optional[int] = None  # default DEFAULT_VOCAB_SIZE
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # default: ffn_hidden_size
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_layer_freq: object = 1  # int, list or Megatron's "[0]*1+[1]*15"
    untie_embeddings_and_output_weights: bool = False
    add_qkv_bias: bool = False
    nitp_projector_ffn_ratio: int = 4
    make_vocab_size_divisible_by: int = VOCAB_DIVISIBLE_BY
    tensor_model_parallel_size: int = 1  # the vocabulary is padded to a multiple of both

    def __post_init__(self):
        fill = {
            "ffn_hidden_size": 4 * self.hidden_size,
            "num_query_groups": self.num_attention_heads,
            "kv_channels": self.hidden_size // self.num_attention_heads,
            "vocab_size": DEFAULT_VOCAB_SIZE,
        }
        for name, default in fill.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.moe_ffn_hidden_size is None:
            object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelShape":
        """From a preset dict or parsed flags (``vars(args)``): unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    @property
    def is_moe(self) -> bool:
        return bool(self.num_moe_experts)

    @property
    def moe_layers(self) -> list[int]:
        """Per layer, 1 for an MoE layer and 0 for a dense one."""
        if not self.is_moe:
            return [0] * self.num_layers
        return moe_layer_pattern(self.moe_layer_freq, self.num_layers)

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary the model is built with (rows of the embedding and output layer),
        padded as the run config resolves it (``config.padded_vocab``)."""
        return padded_vocab(self.vocab_size, self.make_vocab_size_divisible_by,
                            self.tensor_model_parallel_size)

    @property
    def shared_ffn(self) -> int:
        return self.moe_shared_expert_intermediate_size or 0

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.kv_channels


def shape_of(model) -> ModelShape:
    """The shape of ``model``: a :class:`ModelShape` as is; a preset dict or ``vars(args)`` as
    given (its TP pads the vocabulary); a :class:`RunConfig` with its (resolved) settings and
    the vocabulary padded for TP = 1, the model as a whole."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, RunConfig):
        return ModelShape.from_dict({**model.flat(), "tensor_model_parallel_size": 1})
    return ModelShape.from_dict(model)


def vocab_of(args: RunConfig, tp: int) -> tuple[int, int]:
    """The vocabulary and its padded size (a multiple of make-vocab-size-divisible-by x TP):
    the resolved one (``--vocab-size``, else the tokenizer's) of a resolved config, else
    ``--vocab-size`` or :data:`DEFAULT_VOCAB_SIZE`."""
    if args.derived is not None:
        vocab = args.derived.vocab_size
    else:
        vocab = args.model.vocab_size or DEFAULT_VOCAB_SIZE
    return vocab, padded_vocab(vocab, args.model.make_vocab_size_divisible_by, tp)
