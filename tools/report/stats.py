"""Seed statistics of the two arms and the rule-based reading of their paired differences.

``runs`` is :func:`.runs.load_runs`'s ``{kind: {label: run}}``; a value is found by ``where``
(``"summary"`` or ``"eval"``) and a key path into it. Runs of the same label share a seed, so the
arms are compared seed by seed (paired) rather than mean against mean.
"""

from __future__ import annotations

import numpy as np

KINDS = ("ntp", "nitp")


def get(obj, path):
    """``obj[path[0]][path[1]]...``, None where a level is missing."""
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key)
    return obj


def values(runs, kind, where, path, labels) -> list:
    """One value per label of arm ``kind`` (None where a run lacks it)."""
    out = []
    for label in labels:
        value = get(runs[kind][label][where], path)
        out.append(None if value is None else float(value))
    return out


def mean_std(xs):
    """Mean and sample standard deviation of the values present; (None, None) without any."""
    xs = [v for v in xs if v is not None]
    if not xs:
        return None, None
    arr = np.asarray(xs)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def paired(runs, where, path, labels) -> list:
    """NITP - NTP per label, where both arms have the value."""
    ntp = values(runs, "ntp", where, path, labels)
    nitp = values(runs, "nitp", where, path, labels)
    return [b - a for a, b in zip(ntp, nitp) if a is not None and b is not None]


def arm_spread(runs, where, path, labels) -> float:
    """The larger of the two arms' seed standard deviations: how large a difference must be
    to stand out from the seeds."""
    stds = [mean_std(values(runs, k, where, path, labels))[1] for k in KINDS]
    stds = [s for s in stds if s is not None]
    return max(stds) if stds else 0.0


def verdict(diffs, expectation, spread, digits) -> str:
    """Rule-based reading of paired NITP - NTP differences against the paper's direction
    (``"higher"``, ``"lower"``, ``"same"``). ``spread``: :func:`arm_spread`."""
    if not diffs or expectation is None:
        return ""
    mean = float(np.mean(diffs))
    signs = {int(np.sign(d)) for d in diffs}
    agree = len(signs) == 1 and 0 not in signs
    big = abs(mean) > spread
    size = f"\\|Δ\\| {'>' if big else '≤'} seed spread {spread:.{digits}f}"
    if expectation == "same":
        if not big:
            return f"unchanged ({size})"
        word = "higher" if mean > 0 else "lower"
        return f"NITP {word} on {'every seed' if agree else 'average'} ({size})"
    wanted = 1 if expectation == "higher" else -1
    if agree and signs == {wanted}:
        return ("**reproduces**" if big else "paper's sign on every seed, but small") + \
            f" ({size})"
    if agree:
        return ("**opposite** to the paper on every seed" if big
                else "opposite sign on every seed, but small") + f" ({size})"
    return f"inconclusive: seeds disagree ({size})"
