"""A PNG of a run: lm loss, nitp loss and representation geometry over iterations."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(history, key):
    points = history.get(key, [])
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(history: dict, path: str, title: str) -> str:
    """Three panels: lm loss (train and validation), nitp loss, effective rank and cosine."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(*_series(history, "lm loss"), label="train", lw=1.2)
    x, y = _series(history, "validation lm loss")
    if x:
        ax.plot(x, y, "o-", label="validation", ms=4)
    ax.set(title="lm loss", xlabel="iteration", ylabel="cross-entropy (nats)")
    ax.legend()
    ax = axes[1]
    x, y = _series(history, "nitp loss")
    if x and any(v > 0 for v in y):
        ax.plot(x, y, color="C2", lw=1.2)
        ax.set(title="nitp loss (1 - cos)", xlabel="iteration")
    else:
        ax.text(0.5, 0.5, "NITP off (baseline)", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="nitp loss", xlabel="iteration")
    ax = axes[2]
    x, y = _series(history, "effective rank")
    ax.plot(x, y, "o-", color="C3", ms=3, label="effective rank")
    ax.set(title="last hidden states", xlabel="iteration", ylabel="effective rank")
    twin = ax.twinx()
    x, y = _series(history, "cosine similarity")
    twin.plot(x, y, "s--", color="C4", ms=3, label="mean pairwise cosine")
    twin.set_ylabel("mean pairwise cosine")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
