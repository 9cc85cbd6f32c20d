"""The facts the report states, gathered once from their sources into plain data.

Each comes from where it is true: the runs' results and resolved config (:mod:`.runs`), the
data they read (:mod:`.corpus`), the parameter counts of ``megatron_nitp.accounting.parameters``, the
learning-rate schedule as megatron-core applies it, and this machine. The sections only format
what is here, so two sections never compute the same fact twice.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from .corpus import corpus_facts
from .paper import paper_nitp_defaults
from .runs import common_config, load_runs
from .stats import KINDS

REPRODUCE_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts", "reproduce_report.sh")


def schedule(config):
    """(warm-up iterations, first decayed iteration or None, last decayed iteration) of the
    run's learning-rate schedule, as megatron-core's OptimizerParamScheduler applies it: WSD
    holds the peak until ``lr_decay_iters - lr_wsd_decay_iters``; the other decaying styles
    decay from the end of the warm-up."""
    warmup, end = config.schedule.lr_warmup_iters, config.derived.lr_decay_iters
    if config.schedule.lr_decay_style == "constant":
        return warmup, None, end
    if config.schedule.lr_decay_style == "WSD":
        return warmup, end - config.derived.lr_wsd_decay_iters + 1, end
    return warmup, warmup + 1, end


def loss_phases(history, warmup):
    """Phases of one run's NITP loss curve (App. F): initial value, early minimum, the hump's
    peak after it, and the end. None without a NITP loss."""
    points = history.get("nitp loss", [])
    if not points:
        return None
    steps = np.array([p[0] for p in points])
    values = np.array([p[1] for p in points])
    early = steps <= max(3 * warmup, 60)
    i_min = int(np.argmin(np.where(early, values, np.inf)))
    after = np.arange(len(values)) > i_min
    i_peak = int(np.argmax(np.where(after, values, -np.inf))) if after.any() else i_min
    tail = values[-max(1, len(values) // 20):]
    level = values[i_min] + 0.9 * (tail.mean() - values[i_min])
    rise = int(steps[np.argmax(after & (values >= level))]) if (after & (values >= level)).any() \
        else int(steps[i_peak])
    return {"initial": float(values[0]), "min": float(values[i_min]), "min_iter": int(steps[i_min]),
            "rise_iter": rise,
            "peak": float(values[i_peak]), "peak_iter": int(steps[i_peak]),
            "final": float(tail.mean()), "final_window": int(len(tail))}


def planned_iters():
    """The default ITERS of scripts/reproduce_report.sh (None if it cannot be read)."""
    try:
        with open(REPRODUCE_SCRIPT) as f:
            match = re.search(r"^ITERS=\$\{ITERS:-(\d+)\}", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


@dataclasses.dataclass
class Facts:
    """Everything the sections state. ``labels``: the S of the run folders; ``seeds``: the
    seed each was trained with (``seed_of[label]``)."""

    runs_dir: str
    results: str
    rel: str                # the results folder as the report's links spell it
    jobs: int
    runs: dict
    compare: dict | None
    labels: list
    seed_of: dict
    seeds: list
    config: object
    iters: int
    warmup: int
    decay_start: int | None
    decay_end: int
    counts: dict            # parameter counts (megatron_nitp.accounting.parameters)
    corpus: dict | None
    trained_tokens: int
    epochs: float | None
    paper_defaults: bool
    device: str
    phases: dict            # label -> loss_phases of its NITP run
    wall: dict              # kind -> training seconds per label
    eval_secs: list

    @property
    def names(self):
        """Chapter names of the corpus's documents (built-in corpus), else None."""
        return self.corpus["names"] if self.corpus else None

    @property
    def unit(self):
        """What a document of the corpus is called in the text."""
        return "chapter" if self.names else "document"

    @property
    def evaluation(self):
        """The frozen evaluation of the first NITP run ({} without one): what was evaluated."""
        return self.runs["nitp"][self.labels[0]]["eval"] or {}

    @property
    def measured_phases(self):
        """The loss phases of the NITP runs that logged a NITP loss."""
        return [p for p in self.phases.values() if p]

    @property
    def drop(self):
        """App. F's fast drop: every run's early minimum below 30% of its start."""
        ph = self.measured_phases
        return bool(ph) and all(p["min"] < 0.3 * p["initial"] for p in ph)

    @property
    def hump(self):
        """App. F's hump: every run's loss climbs back above its early minimum."""
        ph = self.measured_phases
        return bool(ph) and all(p["peak"] > p["min"] + 0.1 for p in ph)

    @property
    def decline(self):
        """App. F's long decline: every run ends below its peak."""
        ph = self.measured_phases
        return bool(ph) and all(p["final"] < p["peak"] - 0.05 for p in ph)


def gather(args) -> Facts:
    """The facts of the runs ``args.runs``/``{kind}-seed{S}`` for S in ``args.seeds`` and their
    results in ``args.results``. Refuses (SystemExit) runs that do not pair up and an
    ``args.iters`` other than the runs' length."""
    from megatron_nitp.accounting.parameters import parameter_counts
    from megatron_nitp.device import has_cuda, name as device_name

    runs, compare = load_runs(args.runs, args.results, args.seeds)
    labels = args.seeds
    config, seed_of = common_config({(k, s): runs[k][s]["config"] for k in KINDS for s in labels})
    iters = config.training.train_iters
    if args.iters is not None and args.iters != iters:
        raise SystemExit(f"error: --iters {args.iters}, but the runs were trained for {iters} "
                         "iterations")
    warmup, decay_start, decay_end = schedule(config)
    corpus = corpus_facts(config)
    trained_tokens = iters * config.training.global_batch_size * config.model.seq_length
    epochs = (trained_tokens / corpus["train_tokens"]
              if corpus and corpus["train_tokens"] and len(corpus["prefixes"]) == 1 else None)
    return Facts(
        runs_dir=args.runs, results=args.results, jobs=args.jobs,
        rel=os.path.relpath(args.results, os.path.dirname(os.path.abspath(args.output)) or "."),
        runs=runs, compare=compare, labels=labels, seed_of=seed_of,
        seeds=[seed_of[s] for s in labels], config=config, iters=iters, warmup=warmup,
        decay_start=decay_start, decay_end=decay_end, counts=parameter_counts(config.flat()),
        corpus=corpus, trained_tokens=trained_tokens, epochs=epochs,
        paper_defaults=paper_nitp_defaults(config),
        device=device_name() if has_cuda() else "CPU",
        phases={s: loss_phases(runs["nitp"][s]["history"], warmup) for s in labels},
        wall={k: [runs[k][s]["summary"].get("wall time (s)") or 0.0 for s in labels]
              for k in KINDS},
        eval_secs=[runs[k][s]["eval"].get("seconds", 0.0) for k in KINDS for s in labels
                   if runs[k][s]["eval"]])
