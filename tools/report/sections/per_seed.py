"""Per-seed values: every run's final and evaluated numbers, one row a run."""

from __future__ import annotations

from ..stats import KINDS, get

NAMES = {"ntp": "NTP", "nitp": "NITP"}


def _number(value, digits=4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(facts) -> list[str]:
    lines = [
        "## Per-seed values",
        "",
        "| run | lm loss | nitp loss | validation lm loss | effective rank | cosine | held-out "
        "erank | held-out cosine | held-out lm loss | probe (logreg) | cloze | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        for s in facts.labels:
            run = facts.runs[kind][s]
            sm, e = run["summary"], run["eval"] or {}
            cells = [_number(sm["lm loss"]), _number(sm["nitp loss"]),
                     _number(sm["validation lm loss"]), _number(sm["effective rank"], 2),
                     _number(sm["cosine similarity"]),
                     _number(get(e, ("geometry", "effective_rank")), 2),
                     _number(get(e, ("geometry", "cosine_similarity"))),
                     _number(get(e, ("geometry", "lm_loss"))),
                     _number(get(e, ("probe", "logreg_accuracy"))),
                     _number(get(e, ("cloze", "accuracy"))),
                     f"{sm.get('wall time (s)', 0):.0f}"]
            lines.append(f"| {NAMES[kind]} seed {facts.seed_of[s]} | " + " | ".join(cells) + " |")
    return lines + [""]
