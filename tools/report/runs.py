"""The run folders and results files the report reads, and the check that the runs pair up.

``RUNS/{ntp,nitp}-seed{S}/summary.json`` holds each run's final values, its history and its
resolved config; ``RESULTS/eval-{kind}-seed{S}.json`` the frozen evaluation of its checkpoint
(``tools/evaluate_representations.py --json``), ``RESULTS/compare.json`` the table of
``tools/compare_runs.py --json``. The last two are optional: the report leaves out what is
missing.
"""

from __future__ import annotations

import json
import os

from .stats import KINDS

# Settings that differ from run to run by design: the arm, the seed and where a run writes.
PER_RUN = {("nitp_config", "enabled"), ("training", "seed"), ("logging", "run_dir"),
           ("logging", "tensorboard_dir"), ("checkpoint", "save"), ("checkpoint", "load"),
           # how a run was resumed, or where its data paths were read from (the paths
           # themselves are compared)
           ("checkpoint", "exit_on_missing_checkpoint"),
           ("checkpoint", "override_opt_param_scheduler"),
           ("checkpoint", "use_checkpoint_opt_param_scheduler"),
           ("data", "data_args_path"), ("data", "per_split_data_args_path"),
           ("sources",)}  # where each value came from (flag, preset, default): not a setting


def _read_json(path):
    """The file's JSON, or None where there is no file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_runs(runs_dir, results_dir, labels):
    """``({kind: {label: run}}, compare table or None)``; a run is a dict of its folder
    (``dir``), ``summary``, ``history``, ``config`` and frozen evaluation (``eval``, or None)."""
    runs = {k: {} for k in KINDS}
    for kind in KINDS:
        for label in labels:
            run_dir = os.path.join(runs_dir, f"{kind}-seed{label}")
            with open(os.path.join(run_dir, "summary.json")) as f:
                saved = json.load(f)
            if "config" not in saved:
                raise SystemExit(f"error: {run_dir}/summary.json has no \"config\" (written by "
                                 "an older version): retrain the run, the report reads the "
                                 "run's settings from it")
            runs[kind][label] = {
                "dir": run_dir, "summary": saved["summary"], "history": saved["history"],
                "eval": _read_json(os.path.join(results_dir, f"eval-{kind}-seed{label}.json")),
                "config": saved["config"]}
    return runs, _read_json(os.path.join(results_dir, "compare.json"))


def _diff(a, b, path=()):
    """The key paths where two nested dicts differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if path + (key,) in PER_RUN:
                continue
            out += _diff(a.get(key), b.get(key), path + (key,))
        return out
    return [] if a == b else [(".".join(path), a, b)]


def common_config(configs):
    """The run config all runs share, from ``{(kind, label): summary.json's "config"}``.

    Refuses (SystemExit) runs whose configs differ in anything but NITP on/off, the seed and the
    run's folders, an arm whose NITP switch is not its name's, and seeds that do not pair the two
    arms one to one. Returns ``(config, {label: seed})``."""
    from megatron_nitp.config import RunConfig

    items = list(configs.items())
    (ref_kind, ref_label), ref = items[0]
    for (kind, label), data in items[1:]:
        diffs = _diff(ref, data)
        if diffs:
            shown = "; ".join(f"{p}: {a!r} vs {b!r}" for p, a, b in diffs[:8])
            raise SystemExit(
                f"error: the runs' configs differ in more than NITP on/off and the seed: "
                f"{kind}-seed{label} vs {ref_kind}-seed{ref_label}: {shown}")
    seeds = {}
    for (kind, label), data in items:
        config = RunConfig.from_dict(data)
        if config.nitp_enabled != (kind == "nitp"):
            raise SystemExit(f"error: run {kind}-seed{label} has NITP "
                             f"{'on' if config.nitp_enabled else 'off'}")
        if seeds.setdefault(label, config.training.seed) != config.training.seed:
            raise SystemExit(f"error: the two arms of seed{label} were trained with different "
                             f"seeds ({seeds[label]} and {config.training.seed})")
    if len(set(seeds.values())) != len(seeds):
        raise SystemExit(f"error: different run folders were trained with the same seed: {seeds}")
    return RunConfig.from_dict(ref), seeds
