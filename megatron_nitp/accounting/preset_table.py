"""The preset table (``--list-presets``): each preset's size and recipe, one row a preset.

The parameter counts come from the one parameter model, ``parameters.parameter_counts`` (also
used by ``--dry-run``'s plan and ``tools/flops_overhead.py``). "Active" counts every parameter a
token's forward touches: attention, the dense FFNs, the shared expert, the router, top-k routed
experts, and the embedding and output matrices. The NITP projector (12 d^2, training only) is
listed apart: the model for inference has none. The tests hold these counts to megatron-core's
built modules (``tests/helpers.py``'s ``measured_counts``).
"""

from __future__ import annotations

import json

from megatron_nitp.accounting.parameters import parameter_counts
from megatron_nitp.accounting.shape import ModelShape
from megatron_nitp.config.presets import PRESETS, get_preset


def preset_counts(name: str) -> dict:
    """The table's row of preset ``name``: counts from ``parameters.parameter_counts``."""
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
