"""Results: each metric's mean ± std per arm, the paired difference and its reading, at the end
of training and in the frozen evaluation; then ``tools/compare_runs.py``'s table."""

from __future__ import annotations

import os

from ..stats import arm_spread, mean_std, paired, values, verdict
from ..text import plus_minus

# (label, where, key path, digits, paper's expectation for NITP vs NTP)
TRAIN_ROWS = (
    ("lm loss (train, last iteration)", "summary", ("lm loss",), 4, None),
    ("nitp loss (train, last iteration)", "summary", ("nitp loss",), 4, None),
    ("validation lm loss", "summary", ("validation lm loss",), 4, "same"),
    ("effective rank (train batch)", "summary", ("effective rank",), 2, "higher"),
    ("mean pairwise cosine (train batch)", "summary", ("cosine similarity",), 4, "lower"),
)
EVAL_ROWS = (
    ("held-out lm loss", "eval", ("geometry", "lm_loss"), 4, "same"),
    ("held-out effective rank", "eval", ("geometry", "effective_rank"), 2, "higher"),
    ("held-out mean pairwise cosine", "eval", ("geometry", "cosine_similarity"), 4, "lower"),
    ("probe accuracy, logistic regression", "eval", ("probe", "logreg_accuracy"), 4, "higher"),
    ("probe accuracy, nearest centroid", "eval", ("probe", "centroid_accuracy"), 4, "higher"),
    ("last-word cloze accuracy", "eval", ("cloze", "accuracy"), 4, "higher"),
)
TOOLS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_SAYS = {"higher": "higher with NITP", "lower": "lower with NITP",
              "same": "essentially unchanged", None: ""}


def _compare_runs():
    """``tools/compare_runs.py``, whose table the report repeats: a script beside the package,
    so it is loaded from its file."""
    import importlib.util

    path = os.path.join(TOOLS, "compare_runs.py")
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(facts, rows) -> list[str]:
    runs, labels = facts.runs, facts.labels
    lines = ["| metric | NTP | NITP | NITP − NTP (paired by seed) | paper | reading |",
             "|---|---|---|---|---|---|"]
    for label, where, path, digits, expect in rows:
        ntp = mean_std(values(runs, "ntp", where, path, labels))
        nitp = mean_std(values(runs, "nitp", where, path, labels))
        diffs = paired(runs, where, path, labels)
        spread = arm_spread(runs, where, path, labels)
        lines.append(
            f"| {label} | {plus_minus(*ntp, digits)} | {plus_minus(*nitp, digits)} | "
            f"{plus_minus(*mean_std(diffs), digits) if diffs else '-'} | {PAPER_SAYS[expect]} | "
            f"{verdict(diffs, expect, spread, digits)} |")
    return lines + [""]


def _evaluated(facts) -> list[str]:
    """What the frozen evaluation measured: the held-out text, the probe and the cloze task."""
    ev = facts.evaluation
    g, p, c = ev["geometry"], ev["probe"], ev["cloze"]
    corpus = facts.corpus
    probe_note = ""
    if facts.names and p["task"] == "KJV verse -> division" and corpus["documents"]:
        share = corpus["train_documents"] / corpus["documents"]
        if share > 0.5:
            probe_note = (f" Most verses are from the training text ({share:.1%} of the "
                          "chapters): a probe of what the frozen features separate, not of "
                          "generalization.")
    return [
        "### Frozen evaluation of the final checkpoints (`tools/evaluate_representations.py`)",
        "",
        f"- held-out text: {g['source']}, {g['tokens']:,} tokens in windows of "
        f"{ev['seq_length']} (all positions' final hidden states, after the final norm).",
        f"- probe: {p['task']} ({len(p['classes'])} classes: {', '.join(p['classes'])}), "
        f"{p['train_items']} train / {p['test_items']} test verses, mean-pooled final hidden "
        f"states; majority class {p['majority_accuracy']:.3f}.{probe_note}",
        f"- cloze: {c['source']}, {c['items']} items (mean context "
        f"{c['mean_context_tokens']:.0f} tokens); is the argmax next token the first token "
        "of the verse's final word.",
        "",
    ]


def render(facts) -> list[str]:
    n = len(facts.labels)
    lines = [
        "## Results",
        "",
        f"Mean ± sample standard deviation over seeds {', '.join(map(str, facts.seeds))}. The "
        "paired column is the mean ± std of the per-seed differences (same seed: same "
        "initialization of the shared weights and same data order). Reading: **reproduces** "
        "when the difference has the paper's sign on every seed and its mean exceeds the seed "
        "spread (the larger of the two arms' standard deviations); \"small\" when the sign "
        f"holds on every seed but the mean is within the spread. With {n} seeds this is a "
        "consistency check, not a significance test.",
        "",
        f"### At the end of training (iteration {facts.iters})",
        "",
    ]
    lines += _table(facts, TRAIN_ROWS)
    if facts.evaluation:
        lines += _evaluated(facts) + _table(facts, EVAL_ROWS)
    if facts.compare:
        lines += ["`tools/compare_runs.py` table (final logged values, mean ± std over seeds):",
                  "", _compare_runs().format_table(facts.compare, markdown=True), ""]
    return lines
