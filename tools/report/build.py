"""The report from its parts: the facts, the figure, then each section in turn."""

from __future__ import annotations

import os

from .facts import gather
from .figures import PROBE_FIGURE, plot_phases, plot_probe
from .sections import SECTIONS


def build_report(args) -> str:
    """The Markdown report of the runs ``args.runs``/``{ntp,nitp}-seed{S}`` (S in
    ``args.seeds``) and their results in ``args.results``, where it also draws
    ``nitp_loss_phases.png`` (and ``probe_geometry.png`` when the runs probed); ``args.output``
    is where the report will be written (its links are relative to it)."""
    facts = gather(args)
    decay = facts.decay_start
    plot_phases(facts.runs, facts.labels, facts.seed_of,
                os.path.join(facts.results, "nitp_loss_phases.png"), facts.warmup,
                decay if decay is not None and decay <= facts.iters else None, facts.iters)
    plot_probe(facts.runs, facts.labels, os.path.join(facts.results, PROBE_FIGURE))
    return "\n".join(line for section in SECTIONS for line in section.render(facts))
