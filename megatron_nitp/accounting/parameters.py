"""Parameter counts from the shapes: one layer on one rank of a TP x EP layout
(:func:`layer_parameters`), the whole model (:func:`parameter_counts`) and one rank of a
pipeline stage of a run (:func:`stage_parameters`).

The one parameter model: the preset table (``--list-presets``), ``--dry-run``'s plan, the
checkpoint size, the FLOPs and ``tools/flops_overhead.py`` all count with it, and the tests hold
it to megatron-core's built modules (``tests/helpers.py``'s ``measured_counts``). The NITP
projector's count is the method's own (``nitp.config.projector_parameters``).
"""

from __future__ import annotations

from megatron_nitp.accounting.parallel import Layout, stage_layers
from megatron_nitp.accounting.shape import shape_of, vocab_of
from megatron_nitp.config import RunConfig
from megatron_nitp.config.resolve import moe_pattern
from megatron_nitp.nitp.config import projector_parameters


def layer_parameters(model, moe: bool, tp: int = 1, ep: int = 1,
                     etp: int | None = None) -> tuple[int, int]:
    """``(dense, expert)`` parameters of one layer on one rank of a TP x EP layout: dense ones
    (norms, attention, dense FFN, router, shared expert) are replicated over data-parallel
    ranks, routed experts over the expert data-parallel ranks. Matrices are split over TP
    (norms and the router are replicated); routed experts over EP and the expert TP (= TP).
    The one per-layer count: :func:`parameter_counts` (TP = EP = 1) and the memory plan
    (:func:`stage_parameters`) both use it. ``model``: anything ``shape.shape_of`` takes."""
    m = shape_of(model)
    d, q, kv = m.hidden_size, m.q_size, m.kv_size
    attention = (d * (q + 2 * kv) + q * d + (q + 2 * kv if m.add_qkv_bias else 0)) // tp
    norms = 2 * d
    if not moe:
        return norms + attention + 3 * d * m.ffn_hidden_size // tp, 0
    shared = 3 * d * m.shared_ffn // tp
    router = m.num_moe_experts * d
    experts = m.num_moe_experts // ep * 3 * d * m.moe_ffn_hidden_size // (etp or tp)
    return norms + attention + router + shared, experts


def parameter_counts(model) -> dict[str, int]:
    """Parameters of the model as built (local or TE spec, TP = 1), analytically.

    Returns ``total`` (all parameters of the NTP / inference model: embedding, layers, final
    norm, untied output layer), ``activated`` (parameters one token uses: ``total`` minus the
    ``E - k`` routed experts it skips in each MoE layer; embedding included), ``embedding``
    (``V_pad d``), ``output_layer`` (``V_pad d`` if untied, else 0), ``non_embedding``
    (``total`` - embedding - output layer) and ``nitp_projector`` (the SwiGLU projector's
    ``3 r d^2``, training only: not in ``total``).

    Per layer: RMSNorm ``d`` twice; attention ``d (q + 2 kv)`` (+ ``q + 2 kv`` with
    ``add_qkv_bias``) and ``q d``; dense SwiGLU ``3 d f``; MoE: router ``E d``, experts
    ``E x 3 d f_e``, shared expert ``3 d f_s``. ``model``: anything ``shape.shape_of`` takes.
    """
    m = shape_of(model)
    d = m.hidden_size
    total = activated = 0
    for moe in m.moe_layers:
        dense, experts = layer_parameters(m, bool(moe))
        skipped = ((m.num_moe_experts - m.moe_router_topk) * 3 * d * m.moe_ffn_hidden_size
                   if moe else 0)
        total += dense + experts
        activated += dense + experts - skipped
    embedding = m.padded_vocab_size * d
    output_layer = embedding if m.untie_embeddings_and_output_weights else 0
    outside = embedding + output_layer + d  # + final norm
    return dict(
        total=total + outside,
        activated=activated + outside,
        embedding=embedding,
        output_layer=output_layer,
        non_embedding=total + d,
        nitp_projector=projector_parameters("swiglu", d, m.nitp_projector_ffn_ratio),
    )


def run_projector_parameters(args: RunConfig, tp: int = 1) -> int:
    """The NITP projectors of a run (training only), split over TP: one per NITP term (target
    layer x horizon), each its kind's count (``nitp.config.projector_parameters``); 0 without
    NITP or with the cosine regularization alone (no projector)."""
    nitp = args.nitp_config
    if not nitp.enabled or nitp.objective != "nitp":
        return 0
    terms = len(nitp.target_layers) * nitp.horizon
    return terms * projector_parameters(nitp.projector, args.model.hidden_size,
                                        nitp.projector_ffn_ratio) // tp


def moe_layers(args: RunConfig) -> list[int]:
    """Per layer of a run, 1 for an MoE layer and 0 for a dense one."""
    return list(moe_pattern(args) or [0] * args.model.num_layers)


def mtp_parameters(args: RunConfig, layout: Layout) -> tuple[int, int]:
    """``(dense, expert)`` parameters of one rank's MTP blocks (``--mtp-num-layers``, on the
    last stage, training only): per depth megatron-core's ``MultiTokenPredictionLayer``, a
    layer of the decoder's last kind (:func:`layer_parameters`), the ``[d, 2d]`` projection of
    the embedded next token beside the hidden state (split over TP) and three norms."""
    depth = args.mtp.mtp_num_layers or 0
    d = args.model.hidden_size
    dense, expert = layer_parameters(args, bool(moe_layers(args)[-1]), layout.tp, layout.ep,
                                     layout.expert_tp)
    return depth * (dense + 2 * d * d // layout.tp + 3 * d), depth * expert


def stage_parameters(args: RunConfig, layout: Layout, stage: int) -> tuple[int, int]:
    """``(dense, expert)`` parameters of one rank of pipeline stage ``stage``: its layers
    (:func:`layer_parameters`), the embedding on the first stage, and on the last the final
    norm, the NITP projector, the output layer (untied, or with PP > 1 a copy of the tied
    embedding) and the MTP blocks (:func:`mtp_parameters`, with PP > 1 beside their own copy of
    the embedding for the next tokens)."""
    dense = expert = 0
    for moe in moe_layers(args)[stage_layers(args, layout, stage)]:
        a, b = layer_parameters(args, bool(moe), layout.tp, layout.ep, layout.expert_tp)
        dense, expert = dense + a, expert + b
    d = args.model.hidden_size
    vocab_rows = vocab_of(args, layout.tp)[1] // layout.tp * d
    if stage == 0:
        dense += vocab_rows
    if stage == layout.pp - 1:
        dense += d + run_projector_parameters(args, layout.tp)  # final norm, NITP projector
        if args.model.untie_embeddings_and_output_weights or layout.pp > 1:
            dense += vocab_rows  # output layer (a copy of the tied embedding when PP > 1)
        if args.mtp.mtp_num_layers:
            mtp_dense, mtp_expert = mtp_parameters(args, layout)
            dense += mtp_dense + (vocab_rows if stage > 0 else 0)
            expert += mtp_expert
    return dense, expert


def model_parameters(args: RunConfig) -> dict[str, int]:
    """Total and active parameters of the model for inference (no projector), TP = 1:
    :func:`parameter_counts` with this run's vocabulary; and the run's projector."""
    counts = parameter_counts(args)
    return {"total": counts["total"], "active": counts["activated"],
            "projector": run_projector_parameters(args)}


def format_count(n: float) -> str:
    """A parameter count in readable units: ``1.23B``, ``4.56M``, ``7.89K``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
