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
everything but NITP on/off and the seed), the parameter counts with ``megatron_nitp.config.flops``,
the corpus (documents, tokens, the split, the documents training never sees and, for the built-in
corpus, their chapters) from the indexed dataset the runs read and megatron-core's own split of
it, the machine from this process. What the paper reports is quoted from ``report.paper`` or read
from the presets that transcribe its Table 4. The report is made by the package ``tools/report/``
(one module a purpose, one a section); this file is its command line.
"""

from __future__ import annotations

import os
import sys

import megatron_nitp  # noqa: F401
from megatron_nitp.cli import ArgumentParser

# The package beside this script, also when the script is loaded as a module rather than run
# (the tests load it by path, which does not put tools/ on sys.path).
TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from report import build_report, common_config  # noqa: E402

__all__ = ["build_report", "common_config", "main"]


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
    text = build_report(args)
    with open(args.output, "w") as f:
        f.write(text)
    print(f"> wrote {args.output}")


if __name__ == "__main__":
    main()
