"""Training FLOPs per token of the NTP baseline and of NITP's additions.

Two conventions, both per token of a training step (forward + backward):

**paper** - the paper's Appendix G: training FLOPs = 6 x (parameters used in the forward pass),
with no sequence-length term. For the 9B-A1B MoE (d = 1280, d_e = 640, k = 8 routed + 1
shared = 9, L = 24, V = 152064) it gives backbone 3.89e9, unembedding 1.17e9, NTP total
5.06e9, NITP 1.18e8: overhead 2.3%. See :func:`paper_flops`.

**exact** - from the model's real shapes, in the convention of Megatron-LM's
``num_floating_point_operations`` (``megatron/training/training.py``): only matrix products
count, 2 FLOPs per multiply-add, training = 3 x forward (forward, backward data-gradient,
backward weight-gradient), causal attention scores count half the ``s x s`` square. See
:func:`exact_flops`.

Notation: ``shape``'s (d hidden size, L layers, s sequence length, V vocabulary, ...). The
parameter counts are in ``parameters``; both take the projector's from the method's one count,
``nitp.config.projector_parameters``.
"""

from __future__ import annotations

import dataclasses

from megatron_nitp.accounting.parameters import parameter_counts
from megatron_nitp.accounting.shape import ModelShape, shape_of
from megatron_nitp.nitp.config import projector_parameters


@dataclasses.dataclass(frozen=True)
class Flops:
    """Training FLOPs per token under one convention."""

    convention: str
    backbone: float  # transformer layers
    unembedding: float  # output layer (logits)
    projector: float  # NITP projection head, forward + backward
    cosine: float  # NITP cosine loss, forward + backward

    @property
    def ntp_total(self) -> float:
        """The NTP baseline: backbone + unembedding."""
        return self.backbone + self.unembedding

    @property
    def nitp(self) -> float:
        """What NITP adds: projector + cosine."""
        return self.projector + self.cosine

    @property
    def overhead(self) -> float:
        """NITP / NTP (0.023 = 2.3%)."""
        return self.nitp / self.ntp_total

    def as_dict(self) -> dict:
        return dict(
            convention=self.convention,
            backbone=self.backbone,
            unembedding=self.unembedding,
            ntp_total=self.ntp_total,
            projector=self.projector,
            cosine=self.cosine,
            nitp=self.nitp,
            overhead=self.overhead,
        )


# --------------------------------------------------------------------------------------------
# The paper's convention (Appendix G)
# --------------------------------------------------------------------------------------------


def paper_flops(model) -> Flops:
    """Appendix G: training FLOPs per token = 6 x forward parameters; no sequence-length term.

    - attention: ``6 (d q + 2 d kv + q d)`` per layer; for the paper's GQA (8 query heads, 4
      key-value heads, q = d) that is ``6 x 3 d^2 = 18 d^2``;
    - MLP: MoE ``18 d (k f_e + f_s)`` per layer, i.e. ``18 k d d_e`` with k = routed top-k +
      shared experts when f_s = f_e (the router is not counted); dense SwiGLU ``18 d f``;
    - backbone: for an MoE model the paper applies the MoE formula to **all L layers**,
      including the dense first layer(s): ``L (18 d^2 + 18 k d d_e)``. This is reproduced as is,
      so the 9B-A1B figures come out exactly (:func:`exact_flops` counts the dense layer);
    - unembedding: ``6 V d`` (V unpadded, 152064 in the paper);
    - NITP: projector ``6 x 3 r d^2 = 72 d^2`` (r = 4) plus cosine ``18 d``.

    ``model``: a :class:`ModelShape`, a preset dict or ``vars(args)``.
    """
    m = shape_of(model)
    d = m.hidden_size
    attention = 6 * (2 * d * m.q_size + 2 * d * m.kv_size)
    if m.is_moe:
        mlp = 18 * d * (m.moe_router_topk * m.moe_ffn_hidden_size + m.shared_ffn)
    else:
        mlp = 18 * d * m.ffn_hidden_size
    return Flops(
        convention="paper",
        backbone=float(m.num_layers * (attention + mlp)),
        unembedding=float(6 * m.vocab_size * d),
        projector=float(6 * projector_parameters("swiglu", d, m.nitp_projector_ffn_ratio)),
        cosine=float(18 * d),
    )


# --------------------------------------------------------------------------------------------
# The exact convention (real shapes, Megatron-LM's counting rules)
# --------------------------------------------------------------------------------------------

#: FLOPs per hidden element of the NITP cosine, forward: the dot products p.z, p.p, z.z (one
#: multiply and one add each).
COSINE_FORWARD_PER_ELEMENT = 6
#: ... and backward, into the prediction p only (the target z is stop-gradient):
#: d cos / d p = z / (|p||z|) - cos p / |p|^2, an axpy of z and p (2 multiplies, 1 add) plus the
#: upstream scale, rounded to 6.
COSINE_BACKWARD_PER_ELEMENT = 6


def layer_forward_flops(m: ModelShape, moe: bool, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per token of one transformer layer, by part (2 FLOPs per multiply-add).

    - ``attention_linear``: q, k, v and output projections ``2 d (q + 2 kv) + 2 q d``;
    - ``attention_scores``: ``Q K^T`` and ``A V`` over ``s`` keys, ``2 x 2 q s``, halved for a
      causal mask (Megatron-LM: "causal mask (only half of the mask is non-zero)"); the local
      CPU/unfused attention in fact computes the whole square: ``causal=False`` counts that;
    - ``mlp``: dense SwiGLU ``2 x 3 d f`` (gate, up, down); MoE: routed experts
      ``2 x 3 d f_e k``, shared expert ``2 x 3 d f_s`` and the router ``2 d E`` (Megatron-LM
      leaves the router out; it is < 1% of an MoE layer here).

    Norms, activations, softmax, RoPE, biases and residual adds are not counted.
    """
    d, q, kv, s = m.hidden_size, m.q_size, m.kv_size, m.seq_length
    parts = {
        "attention_linear": 2 * d * (q + 2 * kv) + 2 * q * d,
        "attention_scores": 2 * 2 * q * s / (2 if causal else 1),
    }
    if moe:
        parts["mlp"] = 2 * 3 * d * (m.moe_router_topk * m.moe_ffn_hidden_size + m.shared_ffn)
        parts["router"] = 2 * d * m.num_moe_experts
    else:
        parts["mlp"] = 2 * 3 * d * m.ffn_hidden_size
    return {k: float(v) for k, v in parts.items()}


def exact_flops(model, causal: bool = True) -> Flops:
    """Training FLOPs per token from the real shapes, in Megatron-LM's
    ``num_floating_point_operations`` convention (``megatron/training/training.py``, with the
    causal halving of the attention scores it has used since 2025; ``causal=False`` gives the
    full-square count of its earlier versions and of Narayanan et al. 2021, App. A):

    - training = 3 x forward: every matmul runs forward, backward for the input gradient, and
      backward for the weight gradient;
    - backbone: the sum of :func:`layer_forward_flops` over the layers, each layer dense or MoE
      as ``moe_layer_freq`` says (the MoE presets' first layer is dense, with width f);
    - unembedding: ``2 d V_pad`` forward (V padded to a multiple of 128, as the model is built);
      the input embedding is a lookup (no matmul), tied or not; the final norm is ignored;
    - NITP projector: three ``d x r d`` matrices, ``3 x 2 x 3 r d^2 = 18 r d^2`` (72 d^2 at r = 4;
      the backward does produce an input gradient: it flows into the backbone);
    - NITP cosine: ``(6 + 6) d``: forward p.z, p.p, z.z; backward into p only (stop-gradient on
      the target z, so nothing flows back into layer k from it). The target costs nothing
      else: it is layer k's output of the same forward pass.
    """
    m = shape_of(model)
    d = m.hidden_size
    forward = sum(sum(layer_forward_flops(m, bool(moe), causal).values()) for moe in m.moe_layers)
    return Flops(
        convention="exact" if causal else "exact-full-square",
        backbone=3 * forward,
        unembedding=float(3 * 2 * d * m.padded_vocab_size),
        projector=float(3 * 2 * projector_parameters("swiglu", d, m.nitp_projector_ffn_ratio)),
        cosine=float((COSINE_FORWARD_PER_ELEMENT + COSINE_BACKWARD_PER_ELEMENT) * d),
    )


def mtp_flops(model, num_layers: int = 1, causal: bool = True) -> float:
    """Training FLOPs per token that megatron-core's multi-token prediction adds (exact
    convention), as Megatron-LM counts it: per MTP depth one more transformer layer (of the
    last layer's kind), the ``2d -> d`` projection ``eh_proj`` (``2 x 2 d^2`` forward) and one
    more unembedding (``2 d V_pad``); norms ignored; x 3 for training."""
    m = shape_of(model)
    d = m.hidden_size
    layer = sum(layer_forward_flops(m, bool(m.moe_layers[-1]), causal).values())
    return float(num_layers * 3 * (layer + 2 * 2 * d * d + 2 * d * m.padded_vocab_size))


def flops_report(model, causal: bool = True) -> dict:
    """Both conventions and the parameter counts of one model, as plain numbers (JSON-ready)."""
    return dict(
        paper=paper_flops(model).as_dict(),
        exact=exact_flops(model, causal).as_dict(),
        parameters=parameter_counts(model),
    )
