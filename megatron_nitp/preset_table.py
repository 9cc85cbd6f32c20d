"""The preset table (``--list-presets``) and the measurement that checks its counts.

The table's parameter counts come from the one parameter model, ``flops.parameter_counts``
(also used by ``--dry-run``'s plan and ``tools/flops_overhead.py``). :func:`measured_counts`
counts megatron-core's built modules instead, for the tests that hold the model to them: each
preset is built at reduced depth - one dense layer and (for MoE) one MoE layer, with its
real widths, experts and vocabulary - on CPU with uninitialized storage (no weights are
computed or touched), and the counts are extrapolated to the preset's depth layer by layer:

    total  = embedding + output layer (if untied) + final norm
             + n_dense * params(dense layer) + n_moe * params(MoE layer)
    active = total - n_moe * params(routed experts) * (1 - top_k / num_experts)

"Active" counts every parameter a token's forward touches: attention, the dense FFNs, the
shared expert, the router, top-k routed experts, and the embedding and output matrices. The NITP
projector (12 d^2, training only) is listed apart: the model for inference has none.
"""

from __future__ import annotations

import json
from functools import lru_cache

from megatron_nitp.presets import PRESETS, get_preset, moe_layer_pattern


def _count(named_parameters, prefix: str) -> int:
    return sum(p.numel() for name, p in named_parameters if name.startswith(prefix))


@lru_cache(maxsize=None)
def measured_counts(name: str) -> dict:
    """Total and active parameters of preset ``name`` from its built megatron-core modules."""
    from megatron_nitp.config import preset_config, resolve
    from megatron_nitp.training.initialize import initialize_distributed
    from megatron_nitp.training.model import build_model

    preset = get_preset(name)
    moe = preset.get("model_type") == "moe"
    full_layers = preset["num_layers"]
    pattern = moe_layer_pattern(preset["moe_layer_freq"], full_layers) if moe else [0] * full_layers
    reduced = dict(num_layers=2 if moe else 1, nitp_target_layer=0, train_iters=1,
                   lr_warmup_iters=0, micro_batch_size=1, global_batch_size=1)
    if moe:
        reduced["moe_layer_freq"] = "[0]*1+[1]*1"
    args = resolve(preset_config(name, **reduced), 1)
    initialize_distributed()
    model = build_model(args, pre_process=True, post_process=True, perform_initialization=False)
    params = list(model.named_parameters())
    embedding = _count(params, "embedding.")
    output = _count(params, "output_layer.")
    final_norm = _count(params, "decoder.final_layernorm.")
    projector = _count(params, "projector.")
    dense_layer = _count(params, "decoder.layers.0.")
    moe_layer = _count(params, "decoder.layers.1.") if moe else 0
    routed = _count(params, "decoder.layers.1.mlp.experts.") if moe else 0
    n_moe = sum(pattern)
    n_dense = full_layers - n_moe
    total = embedding + output + final_norm + n_dense * dense_layer + n_moe * moe_layer
    inactive = 0
    if moe:
        inactive = n_moe * routed * (1 - args.moe_router_topk / args.num_moe_experts)
    del model
    return {
        "preset": name,
        "kind": "moe" if moe else "dense",
        "total_params": total,
        "active_params": int(round(total - inactive)),
        "projector_params": projector,
        "layers": full_layers,
        "dense_layers": n_dense,
        "moe_layers": n_moe,
        "hidden_size": args.hidden_size,
        "experts": f"{args.num_moe_experts}+{1 if args.moe_shared_expert_intermediate_size else 0}"
                   f" top-{args.moe_router_topk}" if moe else "-",
        "tied_embeddings": not args.untie_embeddings_and_output_weights,
        "nitp_target_layer": preset["nitp_target_layer"],
        "nitp_loss_weight": preset["nitp_loss_weight"],
        "lr": preset["lr"],
        "global_batch_size": preset["global_batch_size"],
    }


def preset_counts(name: str) -> dict:
    """The table's row of preset ``name``: counts from ``flops.parameter_counts``."""
    from megatron_nitp.flops import ModelShape, parameter_counts

    preset = get_preset(name)
    moe = preset.get("model_type") == "moe"
    shape = ModelShape.from_dict(preset)
    counts = parameter_counts(shape)
    pattern = shape.moe_layers
    return {
        "preset": name,
        "kind": "moe" if moe else "dense",
        "total_params": counts["total"],
        "active_params": counts["activated"],
        "projector_params": counts["nitp_projector"],
        "layers": shape.num_layers,
        "dense_layers": len(pattern) - sum(pattern),
        "moe_layers": sum(pattern),
        "hidden_size": shape.hidden_size,
        "experts": f"{shape.num_moe_experts}+{1 if shape.shared_ffn else 0} "
                   f"top-{shape.moe_router_topk}" if moe else "-",
        "tied_embeddings": not shape.untie_embeddings_and_output_weights,
        "nitp_target_layer": preset["nitp_target_layer"],
        "nitp_loss_weight": preset["nitp_loss_weight"],
        "lr": preset["lr"],
        "global_batch_size": preset["global_batch_size"],
    }


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def print_presets(as_json: bool = False) -> None:
    rows = [preset_counts(name) for name in PRESETS]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    header = ("preset", "total", "active", "layers", "hidden", "experts", "NITP k", "lambda",
              "lr", "GBS")
    lines = [header] + [
        (r["preset"], _billions(r["total_params"]), _billions(r["active_params"]),
         f"{r['layers']}" + (f" ({r['dense_layers']}+{r['moe_layers']})" if r["moe_layers"] else ""),
         str(r["hidden_size"]), r["experts"], str(r["nitp_target_layer"]),
         f"{r['nitp_loss_weight']:g}", f"{r['lr']:g}", str(r["global_batch_size"]))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
