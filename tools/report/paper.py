"""What the paper reports, kept apart from the facts of the runs it is compared with.

Claims are quoted (:data:`PAPER`); its model sizes, context lengths and NITP defaults are read
from the presets that transcribe its Table 4 and from ``NITPConfig``, so they cannot drift from
what the code trains.
"""

from __future__ import annotations

import dataclasses

# arXiv 2605.xxxx, quoted in the reading
PAPER = {
    "nitp_loss_9b": "< 0.05 at 9B",           # App. F: final NITP loss of the 9B-A1B MoE
    "nitp_loss_9b_value": 0.05,
    "same_loss_example": "2.006 vs 2.006 at 3B MoE",  # Table 2: NTP vs NITP validation loss
    "train_tokens": "105–330B",               # Table 4: training tokens of its models
}


def paper_nitp_defaults(config) -> bool:
    """Whether the NITP settings other than the target layer are NITPConfig's defaults (the
    paper's: lambda, loss, projector, shift, stop-gradient, objective, hidden state)."""
    from megatron_nitp.nitp.config import NITPConfig

    ours = dataclasses.asdict(config.nitp_config)
    paper = dataclasses.asdict(NITPConfig())
    return all(ours[k] == paper[k] for k in paper if k not in ("enabled", "target_layer"))


def paper_presets():
    """The smallest activated parameter count and the context lengths of the paper's models."""
    from megatron_nitp.config import preset_config
    from megatron_nitp.accounting.parameters import parameter_counts
    from megatron_nitp.config.presets import PRESETS

    names = [n for n, p in PRESETS.items() if p.get("description", "").startswith("paper")]
    configs = [preset_config(n) for n in names]
    active = min(parameter_counts(c.flat())["activated"] for c in configs)
    contexts = sorted({c.model.seq_length for c in configs})
    return active, contexts
