"""Per-layer geometry on the fixed probe batch (``megatron_nitp/training/probe.py``): the
figure and each arm's last probe, mean over seeds. Nothing when the runs have no probe."""

from __future__ import annotations

import numpy as np

from ..figures import PROBE_FIGURE, probe_layers


def _last(facts, kind, key):
    """Mean over seeds of the last probe value of ``key`` in arm ``kind`` (None if absent)."""
    values = [facts.runs[kind][s]["history"][key][-1][1] for s in facts.labels
              if facts.runs[kind][s]["history"].get(key)]
    return float(np.mean(values)) if values else None


def render(facts) -> list[str]:
    layers = probe_layers(facts.runs, facts.labels)
    if not layers:
        return []
    lines = [
        "## Per-layer geometry on the probe batch",
        "",
        f"![probe geometry per layer]({facts.rel}/{PROBE_FIGURE})",
        "",
        "Every geometry interval, one forward pass over a fixed global batch (the validation "
        "data's first, else the training data's first) measures each tapped layer and the last "
        "hidden state over all its counted tokens: effective rank, mean pairwise cosine (all "
        "pairs), mean norm, and the drift 1 - cos(x, x at the first probe) of each token's "
        "state. Last probe, mean over seeds:",
        "",
        "| arm | layer | effective rank | mean cosine | mean norm | drift |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("ntp", "nitp"):
        for layer in layers:
            row = [_last(facts, kind, f"probe {what} {layer}")
                   for what in ("effective rank", "cosine similarity", "norm", "drift")]
            if row[0] is not None:
                lines.append(f"| {kind.upper()} | {layer} | "
                             + " | ".join(f"{v:.3f}" for v in row) + " |")
    cos = [_last(facts, "nitp", f"probe cos(P(h),z) {q}") for q in ("p10", "p50", "p90")]
    if None not in cos:
        lines += ["", "NITP's cos(P(h_t), z_{t+1}) on the probe batch at the last probe "
                  f"(percentiles 10 / 50 / 90, mean over seeds): {cos[0]:.3f} / {cos[1]:.3f} / "
                  f"{cos[2]:.3f}."]
    return lines + [""]
