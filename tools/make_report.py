"""Write the reproduction report (docs/results.md) from the runs of scripts/reproduce_report.sh.

    python tools/make_report.py --runs runs/report --seeds 1 2 3 --iters 600 \\
        --results docs/results --output docs/results.md

Reads each run's ``summary.json`` (``RUNS/{ntp,nitp}-seed{S}``), the table of
``tools/compare_runs.py --json`` (``RESULTS/compare.json``) and the frozen evaluations of
``tools/evaluate_representations.py --json`` (``RESULTS/eval-{ntp,nitp}-seed{S}.json``); draws
``RESULTS/nitp_loss_phases.png``; writes the Markdown report with the numbers, paired NITP - NTP
differences per seed and a rule-based reading against the paper's claims.

Every fact the text states is computed from its source: the model, training and NITP settings
from the runs' resolved configs (``summary.json``'s ``"config"``; the runs must agree in
everything but NITP on/off and the seed), the parameter counts with ``megatron_nitp.accounting.parameters``,
the corpus (documents, tokens, the split, the documents training never sees and, for the built-in
corpus, their chapters) from the indexed dataset the runs read and megatron-core's own split of
it, the machine from this process. What the paper reports is quoted from ``report.paper`` or read
from the presets that transcribe its Table 4. The report is made by the package ``tools/report/``
(one module a purpose, one a section); this file is its command line.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import megatron_nitp  # noqa: F401
from megatron_nitp.cli import ArgumentParser


def _report_package():
    """``tools/report/``, imported as the package ``report`` from its folder: found the same
    whether this script is run or loaded by path (as the tests do), and from any directory."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report")
    init = os.path.join(folder, "__init__.py")
    loaded = sys.modules.get("report")
    if loaded is not None and getattr(loaded, "__file__", None) == init:
        return loaded
    spec = importlib.util.spec_from_file_location("report", init,
                                                  submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules["report"] = package  # before running it: its modules import each other by it
    spec.loader.exec_module(package)
    return package


report = _report_package()
common_config = report.common_config  # the check that the runs pair up (also for the tests)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/report")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="the S of the run folders RUNS/{ntp,nitp}-seedS")
    p.add_argument("--iters", type=int, default=None,
                   help="checked against the runs' --train-iters (default: theirs)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (for the text)")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--output", default="docs/results.md")
    args = p.parse_args(argv)
    text = report.build_report(args)
    with open(args.output, "w") as f:
        f.write(text)
    print(f"> wrote {args.output}")


if __name__ == "__main__":
    main()
