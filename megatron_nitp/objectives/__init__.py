"""Training objectives: next-token prediction plus any set of auxiliary terms.

Every run optimizes next-token prediction (NTP, the ``lm loss``). A run config adds terms, any
number at once, each an :class:`Objective` (``base.py`` says what one declares)::

    term                    what the step adds to sum_t CE(t) (then / N_ntp)        logged as
    ----------------------  --------------------------------------------------------  -----------------
    NITP (k, d)             lambda/T N_ntp/N_kd sum_t (1 - cos(P_kd(h_t), z^k_{t+d}))  nitp loss
                            (T terms: k and --nitp-extra-target-layers, d = 1..H)       [k=<k> t+<d>]
    cosine regularization   w N_ntp/N_tok sum_t mean_u cos(h_t, h_u)                   cosine reg loss
                            (--nitp-objective cosine_reg: w = lambda; or --nitp-cosine-reg-weight w)
    MTP                     factor/D sum_d sum_t CE_d(t)   (megatron-core, in GPTModel) mtp loss

so each term enters the gradient as its weight times the mean over its own positions. The paper
is one NITP term (k, 1). ``--no-nitp`` and no MTP is the NTP baseline.

Where a new auxiliary loss plugs in: write an :class:`Objective` (its taps, module, per-token
loss, count and weight; ``docs/design.md`` has a 30-line example the tests run) and return it
from :func:`build_objectives`. The model captures and routes its taps and calls its
``per_token_loss``; the step weighs, sums and logs it. Nothing else names an objective.
"""

from __future__ import annotations

import functools

from megatron_nitp.config.schema import MTPConfig
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.objectives.base import AuxTerm, LossInputs, ModelOutput, Objective
from megatron_nitp.objectives.cosine import CosineRegularization
from megatron_nitp.objectives.implicit import ImplicitTokenPrediction
from megatron_nitp.objectives.mtp import MultiTokenPrediction

__all__ = ["AuxTerm", "LossInputs", "ModelOutput", "Objective", "CosineRegularization",
           "ImplicitTokenPrediction", "MultiTokenPrediction", "build_objectives",
           "representation_objectives", "combine", "describe"]


def representation_objectives(nitp: NITPConfig) -> tuple[Objective, ...]:
    """The terms the model computes (the NITP config's): NITP per (layer, horizon), and/or
    the cosine regularization."""
    if not nitp.enabled:
        return ()
    if nitp.objective == "cosine_reg":
        return (CosineRegularization(nitp.weight_at),)
    pairs = [(layer, d) for layer in nitp.target_layers for d in range(1, nitp.horizon + 1)]
    terms: list[Objective] = [ImplicitTokenPrediction(nitp, layer, d, len(pairs))
                              for layer, d in pairs]
    if nitp.cosine_reg_weight:
        weight = nitp.cosine_reg_weight
        terms.append(CosineRegularization(lambda iteration: weight))
    return tuple(terms)


@functools.lru_cache(maxsize=8)
def build_objectives(nitp: NITPConfig, mtp: MTPConfig) -> tuple[Objective, ...]:
    """The auxiliary objectives of a run's NITP and MTP sections: the model's terms, then MTP.
    Built once per (frozen, hashable) pair: every step of a run asks for the same objects."""
    objectives = list(representation_objectives(nitp))
    if mtp.mtp_num_layers:
        objectives.append(MultiTokenPrediction(mtp.mtp_num_layers, mtp.mtp_loss_scaling_factor))
    return tuple(objectives)


def combine(metrics: dict, objectives, iteration: int) -> None:
    """Adds to a step's reduced ``metrics`` the mean ``nitp loss`` of several NITP terms and
    the ``total loss``: ``lm loss + sum_o w_o(iteration) * metrics[o.report_key]``."""
    nitp_terms = [o.report_key for o in objectives
                  if isinstance(o, ImplicitTokenPrediction) and o.terms > 1]
    if nitp_terms and all(key in metrics for key in nitp_terms):
        metrics["nitp loss"] = sum(metrics[key] for key in nitp_terms) / len(nitp_terms)
    metrics["total loss"] = metrics["lm loss"] + sum(
        o.weight_at(iteration) * metrics.get(o.report_key, 0.0) for o in objectives)


def describe(nitp: NITPConfig, mtp: MTPConfig) -> str:
    """One line for the run log: what this run optimizes."""
    parts = ["NTP"]
    for objective in build_objectives(nitp, mtp):
        if isinstance(objective, ImplicitTokenPrediction) and objective.horizon == 1:
            ahead = f", t+1..t+{nitp.horizon}" if nitp.horizon > 1 else ""
            parts.append(f"NITP (k={objective.layer}{ahead}, lambda={nitp.loss_weight:g})")
        elif isinstance(objective, CosineRegularization):
            parts.append(f"cosine regularization (weight {objective.weight_at(10**9):g})")
        elif isinstance(objective, MultiTokenPrediction):
            parts.append(f"MTP (depth {objective.depth}, factor {objective.factor:g})")
    return " + ".join(parts) if len(parts) > 1 else "NTP baseline"
