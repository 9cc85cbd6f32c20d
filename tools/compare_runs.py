"""Compare training runs side by side: losses and representation geometry over iterations.

    python tools/compare_runs.py runs/a runs/b --output cmp            # one curve per run
    python tools/compare_runs.py --label NTP=runs/ntp-s1,runs/ntp-s2 \\
        --label NITP=runs/nitp-s1,runs/nitp-s2 --output cmp            # mean +- spread per label

Reads each run folder's TensorBoard events (``<run>/tensorboard``), falling back to
``summary.json`` for a run without events or a metric missing from them. Draws lm loss, nitp
loss, validation lm loss, effective rank and mean pairwise cosine of the last hidden states over
iterations (``PREFIX.png`` and ``PREFIX.svg``) and prints a table of final values: mean +- std
over the runs of each label.

Runs given as positional folders are grouped automatically by their folder name without a seed
or time-stamp suffix (``ntp-seed1``, ``ntp-seed2`` -> ``ntp``; ``tiny-dense-nitp-20250101-120000``
-> ``tiny-dense-nitp``); ``--no-group`` keeps one curve per run.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re

import megatron_nitp  # noqa: F401
from megatron_nitp.cli import ArgumentParser

import numpy as np

# (history key in summary.json, TensorBoard tag, panel title, y label)
METRICS = (
    ("lm loss", "lm loss", "lm loss (train)", "cross-entropy (nats)"),
    ("nitp loss", "nitp loss", "nitp loss (train, 1 - cos)", "1 - cos"),
    ("validation lm loss", "lm loss validation", "lm loss (validation)", "cross-entropy (nats)"),
    ("effective rank", "effective rank", "effective rank, last hidden states", "effective rank"),
    ("cosine similarity", "cosine similarity", "mean pairwise cosine, last hidden states",
     "cosine"),
)
KEYS = tuple(m[0] for m in METRICS)
# Noisy per-iteration training curves are smoothed for the plot (never for the table).
SMOOTHED = ("lm loss", "nitp loss")

_SUFFIX = re.compile(r"([-_.]?(seed|s|run|rep)[-_]?\d+|[-_]\d{8}[-_]\d{6}|[-_]\d{8,14})$",
                     re.IGNORECASE)


def group_name(run_dir: str) -> str:
    """A run's automatic label: its folder name without seed / time-stamp suffixes."""
    name = os.path.basename(os.path.normpath(run_dir))
    while True:
        stripped = _SUFFIX.sub("", name)
        if stripped == name or not stripped:
            return name
        name = stripped


def _clean(points) -> list[tuple[int, float]]:
    """Sorted, one value per iteration (the last written wins, as after a resume), finite."""
    by_step = {}
    for step, value in points:
        if value is not None and math.isfinite(float(value)):
            by_step[int(step)] = float(value)
    return sorted(by_step.items())


def _read_tensorboard(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    event_dirs = sorted({os.path.dirname(p) for p in glob.glob(
        os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)})
    if not event_dirs:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list] = {}
    for directory in event_dirs:
        acc = EventAccumulator(directory, size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        for key, tag, *_ in METRICS:
            if tag in tags:
                series.setdefault(key, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: _clean(v) for k, v in series.items()}


def _read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_run(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(iteration, value), ...]}`` of one run folder (TensorBoard first, then
    summary.json). Raises FileNotFoundError when the folder has neither."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    series = _read_tensorboard(run_dir)
    saved = _read_summary(run_dir)
    history = saved.get("history", {})
    for key in KEYS:
        if not series.get(key) and history.get(key):
            series[key] = _clean(history[key])
    # An NTP baseline logs its (unused) nitp loss as 0: it has none.
    nitp = series.get("nitp loss", [])
    if saved.get("summary", {}).get("nitp") is False or (nitp and all(v == 0 for _, v in nitp)):
        series["nitp loss"] = []
    if not any(series.get(k) for k in KEYS):
        raise FileNotFoundError(f"{run_dir}: no TensorBoard events nor summary.json with metrics")
    return {k: series.get(k, []) for k in KEYS}


def final_value(points) -> float | None:
    return points[-1][1] if points else None


def parse_labels(labels: list[str], positional: list[str], no_group: bool) -> dict[str, list[str]]:
    """``{label: [run folders]}`` in the order given."""
    groups: dict[str, list[str]] = {}
    for spec in labels:
        if "=" not in spec:
            raise SystemExit(f"error: --label {spec!r}: use NAME=RUN[,RUN...]")
        name, _, dirs = spec.partition("=")
        runs = [d for d in dirs.split(",") if d]
        if not name or not runs:
            raise SystemExit(f"error: --label {spec!r}: use NAME=RUN[,RUN...]")
        groups.setdefault(name, []).extend(runs)
    for run in positional:
        name = os.path.basename(os.path.normpath(run)) if no_group else group_name(run)
        if no_group and name in groups:
            name = os.path.normpath(run)
        groups.setdefault(name, []).append(run)
    if not groups:
        raise SystemExit("error: give run folders, or --label NAME=RUN[,RUN...]")
    return groups


def summarize(groups: dict[str, list[str]], data: dict[str, dict]) -> dict:
    """Final values per label: mean, std (sample, 0 for one run), min, max, values, runs."""
    table = {}
    for label, runs in groups.items():
        row = {"runs": runs, "iterations": [data[r]["lm loss"][-1][0] if data[r]["lm loss"]
                                            else None for r in runs]}
        for key in KEYS:
            values = [final_value(data[r][key]) for r in runs]
            values = [v for v in values if v is not None]
            if not values:
                row[key] = None
                continue
            arr = np.asarray(values, dtype=np.float64)
            row[key] = {"mean": float(arr.mean()),
                        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                        "min": float(arr.min()), "max": float(arr.max()),
                        "n": len(values), "values": values}
        table[label] = row
    return table


def format_table(table: dict, markdown: bool = False) -> str:
    labels = list(table)
    header = ["metric (final)"] + [f"{lab} (n={len(table[lab]['runs'])})" for lab in labels]
    rows = []
    for key in KEYS:
        cells = [key]
        for lab in labels:
            s = table[lab][key]
            if s is None:
                cells.append("-")
            elif s["n"] > 1:
                cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}")
            else:
                cells.append(f"{s['mean']:.4f}")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average."""
    if weight <= 0 or len(values) == 0:
        return values
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        last = last * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out[i] = last / norm
    return out


def aligned(series_list: list[list[tuple[int, float]]], weight: float):
    """Iterations and a ``[runs, points]`` array: the iterations every run logged, or (when the
    runs logged at different iterations) the union, each run interpolated inside its range."""
    series_list = [s for s in series_list if s]
    if not series_list:
        return None, None
    steps = [np.array([p[0] for p in s], dtype=np.float64) for s in series_list]
    vals = [smooth(np.array([p[1] for p in s], dtype=np.float64), weight) for s in series_list]
    common = set(steps[0].tolist())
    for st in steps[1:]:
        common &= set(st.tolist())
    if len(common) >= 2 or len(series_list) == 1:
        grid = np.array(sorted(common))
        stack = [v[np.isin(st, grid)] for st, v in zip(steps, vals)]
        return grid, np.vstack(stack)
    grid = np.array(sorted(set(np.concatenate(steps).tolist())))
    stack = [np.where((grid >= st[0]) & (grid <= st[-1]), np.interp(grid, st, v), np.nan)
             for st, v in zip(steps, vals)]
    return grid, np.vstack(stack)


def plot(groups, data, table, prefix: str, band: str, weight: float, title: str | None,
         formats=("png", "svg")) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.6))
    flat = axes.ravel()
    colors = {lab: f"C{i}" for i, lab in enumerate(groups)}
    for ax, (key, _, panel, ylabel) in zip(flat, METRICS):
        w = weight if key in SMOOTHED else 0.0
        drawn = False
        for label, runs in groups.items():
            grid, stack = aligned([data[r][key] for r in runs], w)
            if grid is None:
                continue
            drawn = True
            c = colors[label]
            n = stack.shape[0]
            mean = np.nanmean(stack, axis=0)
            marker = "o" if len(grid) <= 30 else None
            ax.plot(grid, mean, color=c, lw=1.6, marker=marker, ms=3.5,
                    label=f"{label} (mean of {n})" if n > 1 else label)
            if n > 1:
                if band == "minmax":
                    lo, hi = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
                else:
                    sd = np.nanstd(stack, axis=0, ddof=1)
                    lo, hi = mean - sd, mean + sd
                ax.fill_between(grid, lo, hi, color=c, alpha=0.22, lw=0)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
        elif key == "nitp loss" and not all(
                any(data[r][key] for r in runs) for runs in groups.values()):
            missing = [lab for lab, runs in groups.items() if not any(data[r][key] for r in runs)]
            ax.text(0.98, 0.95, "no NITP loss: " + ", ".join(missing), ha="right", va="top",
                    transform=ax.transAxes, color="0.4", fontsize=9)
        suffix = f" — EMA {w:g}" if w > 0 else ""
        ax.set_title(panel + suffix, fontsize=11)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=9, loc="best")
    # Sixth panel: the table of final values.
    ax = flat[5]
    ax.axis("off")
    labels = list(groups)
    cell_text = []
    for key in KEYS:
        row = []
        for lab in labels:
            s = table[lab][key]
            row.append("-" if s is None else (f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1
                                              else f"{s['mean']:.3f}"))
        cell_text.append(row)
    tab = ax.table(cellText=cell_text, rowLabels=list(KEYS),
                   colLabels=[f"{lab} (n={len(groups[lab])})" for lab in labels],
                   loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(9.5)
    tab.scale(1.0, 1.6)
    for (r, c), cell in tab.get_celld().items():
        if r == 0 and c >= 0:
            cell.set_text_props(color=colors[labels[c]], weight="bold")
    spread = "mean ± std over runs" if band == "std" else "mean, band min–max over runs"
    several = any(len(r) > 1 for r in groups.values())
    ax.set_title(f"final values ({'mean ± std' if several else 'one run each'})", fontsize=11)
    fig.suptitle((title + " — " if title else "") + spread, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    written = []
    for fmt in formats:
        path = f"{prefix}.{fmt}"
        fig.savefig(path, dpi=110 if fmt == "png" else None)
        written.append(path)
    plt.close(fig)
    return written


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="*", help="run folders (grouped by name unless --no-group)")
    p.add_argument("--label", action="append", default=[], metavar="NAME=RUN[,RUN...]",
                   help="a label and its runs (e.g. seeds); repeat for each label")
    p.add_argument("--no-group", action="store_true",
                   help="one curve per positional run folder (no automatic grouping)")
    p.add_argument("--output", default="compare", metavar="PREFIX",
                   help="writes PREFIX.png and PREFIX.svg (default: compare)")
    p.add_argument("--band", choices=["std", "minmax"], default="std",
                   help="spread band of a label with several runs: mean ± std (default) or "
                        "min-max")
    p.add_argument("--smooth", type=float, default=0.6,
                   help="EMA weight for the per-iteration training losses in the plot "
                        "(0: raw; the table always uses raw final values)")
    p.add_argument("--title", default=None)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1:
        p.error("--smooth must be in [0, 1)")

    groups = parse_labels(args.label, args.runs, args.no_group)
    data = {}
    for runs in groups.values():
        for run in runs:
            try:
                data[run] = read_run(run)
            except FileNotFoundError as err:
                raise SystemExit(f"error: {err}")
    table = summarize(groups, data)
    written = plot(groups, data, table, args.output, args.band, args.smooth, args.title)
    print(format_table(table, markdown=args.markdown))
    print("> wrote " + ", ".join(written))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
        print(f"> wrote {args.json}")
    return table


if __name__ == "__main__":
    main()
