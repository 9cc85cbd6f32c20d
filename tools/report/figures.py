"""The report's own figures: the NITP loss phases next to the collapse of the hidden states,
and the per-layer geometry of the probe batch.

The training curves of both arms are ``tools/compare_runs.py``'s figure; the first shows what
App. F of the paper describes, on the NITP runs only.
"""

from __future__ import annotations

import numpy as np


def plot_phases(runs, seeds, seed_of, path, warmup, decay_start, iters):
    """Left: the NITP loss of every NITP seed (log x). Right: the seeds' mean NITP loss next to
    the mean pairwise cosine of the last hidden states of the same runs. ``seeds``: the run
    folders' labels; ``seed_of``: the seed each was trained with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.3))
    ax = axes[0]
    for i, seed in enumerate(seeds):
        points = runs["nitp"][seed]["history"].get("nitp loss", [])
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.0, color=f"C{i}",
                alpha=0.85, label=f"seed {seed_of[seed]}")
    ax.set_title("NITP loss per seed (log x)")
    ax.legend(fontsize=9, loc="lower left")

    def mean_series(key):
        series = [dict(map(tuple, runs["nitp"][s]["history"].get(key, []))) for s in seeds]
        steps = sorted(set.intersection(*[set(d) for d in series])) if series else []
        return steps, [float(np.mean([d[t] for d in series])) for t in steps]

    ax = axes[1]
    x, y = mean_series("nitp loss")
    ax.plot(x, y, color="C1", lw=1.2, label="nitp loss (mean of seeds)")
    twin = ax.twinx()
    x, y = mean_series("cosine similarity")
    twin.plot(x, y, "s-", color="C4", ms=2.5, lw=1, label="mean pairwise cosine, last hidden")
    twin.set_ylabel("mean pairwise cosine")
    twin.set_ylim(0, 1.05)
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=9, loc="lower left")
    ax.set_title("NITP runs: NITP loss vs. collapse of the last hidden states")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlim(1, iters)
        ax.set_ylim(0, 1.05)
        if warmup:
            ax.axvline(warmup, color="0.4", ls="--", lw=1)
            ax.text(warmup, 1.03, " end of warm-up", fontsize=8, va="top", color="0.3")
        if decay_start is not None:
            ax.axvline(decay_start, color="0.4", ls=":", lw=1)
            ax.text(decay_start, 1.03, " LR decay", fontsize=8, va="top", color="0.3",
                    ha="right")
        ax.set_xlabel("iteration (log scale)")
        ax.set_ylabel("nitp loss (1 - cos), train")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PROBE_FIGURE = "probe_geometry.png"


def probe_layers(runs, seeds) -> list[str]:
    """The probed layers of the runs (``layer k`` ..., then ``final``), [] without a probe."""
    prefix = "probe effective rank "
    names = {key[len(prefix):] for kind in runs for s in seeds
             for key in runs[kind][s]["history"] if key.startswith(prefix)}
    tapped = sorted((n for n in names if n != "final"), key=lambda n: int(n.split()[-1]))
    return tapped + (["final"] if "final" in names else [])


def plot_probe(runs, seeds, path):
    """Effective rank (left) and drift (right) of each probed layer over training, mean over
    seeds, NTP dashed and NITP solid. None (nothing drawn) without a probe."""
    layers = probe_layers(runs, seeds)
    if not layers:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.3))
    for ax, what in zip(axes, ("effective rank", "drift")):
        for i, layer in enumerate(layers):
            for kind, style in (("ntp", "--"), ("nitp", "-")):
                series = [dict(map(tuple, runs[kind][s]["history"].get(f"probe {what} {layer}",
                                                                      [])))
                          for s in seeds]
                if not all(series):
                    continue
                steps = sorted(set.intersection(*[set(d) for d in series]))
                ax.plot(steps, [float(np.mean([d[t] for d in series])) for t in steps], style,
                        color=f"C{i}", lw=1.2, label=f"{kind.upper()} {layer}")
        ax.set_title(f"probe batch: {what} per layer (mean of seeds)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(what if what != "drift" else "drift (1 - cos to the first probe)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
