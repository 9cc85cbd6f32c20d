"""NITP loss phases (paper App. F): the figure and each seed's phases."""

from __future__ import annotations


def render(facts) -> list[str]:
    lines = [
        "## NITP loss phases (paper App. F)",
        "",
        f"![NITP loss per seed]({facts.rel}/nitp_loss_phases.png)",
        "",
        "| seed | initial | early minimum (iteration) | later peak (iteration) | final (mean of "
        "last 5%) |",
        "|---|---|---|---|---|",
    ]
    for s in facts.labels:
        phase = facts.phases[s]
        if phase:
            lines.append(
                f"| {facts.seed_of[s]} | {phase['initial']:.3f} | {phase['min']:.3f} "
                f"({phase['min_iter']}) | {phase['peak']:.3f} ({phase['peak_iter']}) | "
                f"{phase['final']:.3f} |")
    return lines + [""]
