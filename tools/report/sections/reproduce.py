"""Reproduce: the commands that make the report's runs and results again, for one seed."""

from __future__ import annotations

import shlex

from ..command import command_flags


def render(facts) -> list[str]:
    config, labels, seeds = facts.config, facts.labels, facts.seeds
    entry = "pretrain_moe_nitp.py" if config.model_type == "moe" else "pretrain_gpt_nitp.py"
    flags = " ".join(map(shlex.quote, command_flags(config, bool(facts.names))))
    seed, folder = seeds[0], f"{facts.runs_dir}/{{kind}}-seed{labels[0]}"
    nitp, ntp = folder.format(kind="nitp"), folder.format(kind="ntp")
    lines = ["## Reproduce", "", "```bash"]
    if labels == seeds:
        lines += [f"ITERS={facts.iters} SEEDS=\"{' '.join(map(str, seeds))}\" bash "
                  "scripts/reproduce_report.sh",
                  "# or step by step, for one seed:"]
    return lines + [
        f"python {entry} {flags} --seed {seed} --run-dir {nitp}",
        f"python {entry} {flags} --seed {seed} --run-dir {ntp} --no-nitp",
        f"python tools/compare_runs.py --label NTP={ntp} --label NITP={nitp} "
        f"--output {facts.results}/compare",
        f"python tools/evaluate_representations.py --load {nitp}/checkpoints "
        f"--split {config.data.split} --evaluations geometry,probe,cloze "
        f"--json {facts.results}/eval-nitp-seed{labels[0]}.json",
        "```",
        "",
    ]
