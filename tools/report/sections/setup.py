"""Setup: the model, the data, the training, NITP, the runs and the machine, each from its
source, and how long the runs were against the planned length."""

from __future__ import annotations

import os
import platform

import numpy as np

from ..facts import planned_iters
from ..stats import KINDS
from ..text import human, sci


def _model(facts) -> str:
    config, counts = facts.config, facts.counts
    nitp, d = config.nitp_config, config.model.hidden_size
    vocab = f"vocab {config.derived.vocab_size}" + (
        f" (padded to {config.derived.padded_vocab_size})"
        if config.derived.padded_vocab_size != config.derived.vocab_size else "")
    projector = ""
    if nitp.projector == "swiglu":
        projector = (f"; the NITP projector adds {3 * nitp.projector_ffn_ratio}·{d}² = "
                     f"{human(counts['nitp_projector'])} in training only")
    return (f"| model | `--preset {config.preset}`: {config.model.num_layers} layers, hidden {d}, "
            f"{config.model.num_attention_heads} query / {config.model.num_query_groups} KV heads, SwiGLU "
            f"FFN {config.model.ffn_hidden_size}, {vocab} ({human(counts['total'])} parameters"
            f"{projector}) |")


def _data(facts) -> str:
    corpus, names, unit = facts.corpus, facts.names, facts.unit
    held = corpus["documents"] - corpus["train_documents"]
    source = ("default corpus: KJV Bible" if names else
              ", ".join(f"`{p}`" for p in corpus["prefixes"]))
    text = (f"{source}, {corpus['documents']:,} {unit}s, {human(corpus['tokens'])} tokens; "
            f"split {facts.config.data.split} by {unit}")
    if len(corpus["prefixes"]) == 1 and held:
        where = "the last " if corpus["unseen_is_tail"] else ""
        text += f": training never sees {where}{held} {unit}s"
        if names and corpus["unseen_is_tail"]:
            unseen = corpus["unseen"]
            text += f" ({names[unseen[0]]} – {names[unseen[-1]]})"
        held_out = []
        if corpus["valid_documents"]:
            held_out.append(f"{corpus['valid_documents']} in the validation split, from "
                            "which the validation loss is measured")
        if corpus["test_documents"]:
            held_out.append(f"{corpus['test_documents']} in the test split")
        if held_out:
            text += ": " + "; ".join(held_out)
    return f"| data | {text} |"


def _training(facts) -> str:
    config = facts.config
    precision = "bf16" if config.training.bf16 else "fp16" if config.training.fp16 else "fp32"
    epoch_text = (f" (≈ {facts.epochs:.2f} epochs of the training split)"
                  if facts.epochs is not None else "")
    if facts.decay_start is None:
        decay = ""
    elif facts.decay_start >= facts.decay_end:
        decay = f", decay at iteration {facts.decay_end}"
    else:
        decay = f", decay over iterations {facts.decay_start}–{facts.decay_end}"
    return (f"| training | {facts.iters} iterations × {config.training.global_batch_size} sequences × "
            f"{config.model.seq_length} tokens = {human(facts.trained_tokens)} tokens{epoch_text}; "
            f"AdamW, lr {sci(config.schedule.lr)} → {sci(config.schedule.min_lr)}, {config.schedule.lr_decay_style} "
            f"(warm-up {facts.warmup} iterations{decay}), weight decay "
            f"{config.training.weight_decay}, clip {config.training.clip_grad}, {precision} |")


def _nitp(facts) -> str:
    config = facts.config
    nitp = config.nitp_config
    parts = [f"target layer k = {nitp.target_layer} (of {config.model.num_layers})",
             f"λ = {nitp.loss_weight:g}", f"{nitp.loss_kind} loss",
             {"swiglu": "SwiGLU projector", "linear": "linear projector",
              "none": "no projector"}.get(nitp.projector, f"{nitp.projector} projector"),
             f"shift {nitp.shift}",
             "stop-gradient" if nitp.stop_gradient else "no stop-gradient"]
    return (f"| NITP | {', '.join(parts)}"
            + (" (the paper's defaults)" if facts.paper_defaults else "") + " |")


def _runs(facts) -> str:
    """The arms and seeds, and how close the arms start (same seed: same first loss)."""
    same_start = ""
    first_losses = []
    for s in facts.labels:
        points = [facts.runs[k][s]["history"].get("lm loss", []) for k in KINDS]
        if all(p and p[0][0] == 1 for p in points):
            first_losses.append(abs(points[0][0][1] - points[1][0][1]))
    if first_losses and len(first_losses) == len(facts.labels):
        gap = max(first_losses)
        same_start = ("; the iteration-1 losses of the two arms are identical" if gap == 0 else
                      f"; the iteration-1 losses of the two arms differ by at most {gap:.2g}")
    return (f"| runs | NTP (`--no-nitp`) and NITP, seeds {', '.join(map(str, facts.seeds))} "
            f"(same seed: same initial weights and data order{same_start}) |")


def _machine(facts) -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    thread_text = ""
    if threads:
        thread_text = (", one thread each" if threads == "1" else f", {threads} threads each")
    eval_secs = facts.eval_secs
    return (f"| machine | {platform.machine()} {facts.device}, {os.cpu_count()} cores, "
            f"{facts.jobs} runs at a time{thread_text}; training "
            f"{np.mean(facts.wall['ntp']):.0f} s (NTP) / {np.mean(facts.wall['nitp']):.0f} s "
            f"(NITP) per run, evaluation {np.mean(eval_secs) if eval_secs else 0:.0f} s per "
            "checkpoint |")


def _length(facts) -> str:
    """The runs' length against scripts/reproduce_report.sh's, and what the runs cost."""
    planned, iters = planned_iters(), facts.iters
    took = (f"the {2 * len(facts.labels)} runs took "
            f"{sum(sum(w) for w in facts.wall.values()) / 60:.1f} minutes of training and their "
            f"evaluations {sum(facts.eval_secs) / 60:.1f} minutes, {facts.jobs} at a time")
    if planned is None:
        return f"{iters} iterations: {took}."
    if iters >= planned:
        return (f"{iters} iterations: the planned length (`scripts/reproduce_report.sh`'s "
                "default" + ("; long enough for the NITP loss phases"
                             if facts.drop and facts.hump else "") + f"); {took}.")
    return (f"{iters} iterations, reduced from the planned {planned} to fit the time budget; "
            f"{took}.")


def render(facts) -> list[str]:
    config = facts.config
    lines = ["## Setup", "", "| | |", "|---|---|", _model(facts)]
    if facts.corpus:
        lines.append(_data(facts))
    lines += [_training(facts), _nitp(facts), _runs(facts)]
    if config.logging.geometry_interval:
        lines.append(f"| geometry during training | every {config.logging.geometry_interval} "
                     f"iterations on the first micro-batch ({config.training.micro_batch_size} × "
                     f"{config.model.seq_length} tokens) |")
    return lines + [_machine(facts), "", _length(facts), ""]
