"""Training curves: the figure of ``tools/compare_runs.py``."""

from __future__ import annotations


def render(facts) -> list[str]:
    rel = facts.rel
    return [
        "## Training curves",
        "",
        f"![NTP vs NITP, mean ± std over {len(facts.labels)} seeds]({rel}/compare.png)",
        "",
        f"`{rel}/compare.png` (and `.svg`): `tools/compare_runs.py`, mean ± std over seeds; "
        "the training losses are smoothed with an EMA in the plot only (its weight is in the "
        "panels' titles).",
        "",
    ]
