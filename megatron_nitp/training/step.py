"""One training (or evaluation) step through megatron-core's pipeline schedules.

Loss accounting. The step minimizes ``L = sum(ntp) / N_ntp + lambda * sum(nitp) / N_nitp`` over
the global batch, where ``N_ntp`` counts the tokens whose NTP loss counts and ``N_nitp`` the
positions that carry an NITP target (each sequence's last position has none, nor, with
``--nitp-document-boundary mask``, a document's EOD). megatron-core's
per-token mode (``calculate_per_token_loss``) divides the summed gradients by the global
``N_ntp`` once, in ``finalize_model_grads``; so each micro-batch contributes
``sum(ntp) + lambda * (N_ntp / N_nitp) * sum(nitp)``, with both global counts taken from the
step's micro-batches before the schedule runs (they are fetched up front; tokens are cheap).
Reported values are (sum, count) pairs reduced over micro-batches and data-parallel ranks, so
they are the same whatever the parallel layout.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterator, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_nitp.data.datasets import ATTENTION_MASK, CONTINUES_DOCUMENT
from megatron_nitp.device import device, to_device
from megatron_nitp.geometry import effective_rank, mean_pairwise_cosine, valid_token_states
from megatron_nitp.objectives import ModelOutput, build_objectives, combine
from megatron_nitp.training import faults, timers
from megatron_nitp.training.model import as_chunks, params_synced, unwrap
from megatron_nitp.training.params_norm import params_l2_norm
from megatron_nitp.training.timers import TIMERS

GEOMETRY_KEYS = ("effective rank", "cosine similarity")
MICROBATCH = "_microbatch"  # the batch key of a micro-batch's index in its step


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient under ``--nan-policy stop``; carries the diagnostics."""

    def __init__(self, diagnostics: dict):
        super().__init__(f"non-finite values at iteration {diagnostics['iteration']}: "
                         f"{diagnostics['non_finite']}")
        self.diagnostics = diagnostics


def _loss_func(loss_mask, scales, geometry, output: ModelOutput):
    """Reduces one micro-batch's model output (``ModelOutput``): ``sum(lm) + sum_o scale_o *
    sum(aux_o)``, where ``scales`` maps each term's report key to its weight times
    ``N_ntp / N_o``. ``output.hidden`` is there (and read) only on the micro-batch whose
    geometry is measured (``geometry``)."""
    mask = loss_mask.float()
    lm_sum = (output.lm_loss.float() * mask).sum()
    num_tokens = mask.sum()
    loss = lm_sum
    report = {"lm loss": torch.stack([lm_sum.detach(), num_tokens])}
    for key, term in output.aux.items():
        term_sum = term.loss.sum()
        loss = loss + scales[key] * term_sum
        report[key] = torch.stack([term_sum.detach(), term.mask.sum()])
    if geometry:
        states = valid_token_states(output.hidden.float(), mask)
        generator = torch.Generator(device="cpu").manual_seed(0)  # same pairs on any device
        one = torch.ones((), dtype=torch.float64, device=states.device)
        report["effective rank"] = torch.stack([effective_rank(states), one])
        report["cosine similarity"] = torch.stack(
            [mean_pairwise_cosine(states, generator=generator), one]
        )
    return loss, num_tokens.int(), report


def forward_microbatch(model, batch: dict, objectives, return_hidden: bool):
    """One micro-batch through ``model``, as megatron-core's forward step runs it (the
    training and evaluation steps, the geometry probe): the objectives' extra inputs are made
    from whole ``[b, s]`` sequences, then each ``[b, s]`` key is cut to this rank's
    context-parallel chunks. ``batch`` is one of the step's micro-batches on the device, its
    index in the step under :data:`MICROBATCH`. Returns the model's ``ModelOutput`` and the
    batch as the model saw it (the extra inputs added, the CP slice taken, the index dropped),
    whose ``loss_mask`` is what the output's per-token terms line up with."""
    batch = dict(batch)
    microbatch = batch.pop(MICROBATCH)
    aux_keys = []
    for objective in objectives:
        extra = objective.batch_inputs(batch)
        batch.update(extra)
        aux_keys += list(extra)
    # Context parallelism: this rank's 2 of the 2*CP load-balanced chunks of every sequence.
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = _cp_slice(batch)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get(ATTENTION_MASK),  # None: the layers' causal mask type applies
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
        document_mask=batch.get(CONTINUES_DOCUMENT),
        aux_inputs={key: batch[key] for key in aux_keys},
        return_hidden=return_hidden,
        microbatch=microbatch,
    )
    return output, batch


def _forward_step(scales, objectives, geometry_first, data_iterator, model):
    """megatron-core's forward step: one micro-batch through ``model``. The final hidden
    states are asked for (``return_hidden``) only on the micro-batch whose representation
    geometry is measured; every other one skips their TP all-gather under SP."""
    batch = dict(next(data_iterator))
    geometry = geometry_first and batch.pop("_first", False)
    output, batch = forward_microbatch(model, batch, objectives, geometry)
    return output, partial(_loss_func, batch["loss_mask"], scales, geometry)


def _cp_slice(batch: dict) -> dict:
    """This rank's chunks r and 2CP-1-r of every sequence (every ``[b, s]`` key, the document
    mask included): megatron-core's ``get_batch_on_this_cp_rank`` given the context-parallel
    group explicitly. 0.16 falls back
    to parallel_state without it, but 0.19 (which adds a required ``is_hybrid_cp``) then
    slices by the whole world's size and rank, i.e. wrongly as soon as TP, PP or DP > 1."""
    import inspect

    cp_group = parallel_state.get_context_parallel_group()
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


def _global_counts(batches: list[dict], objectives) -> torch.Tensor:
    """``[N_ntp, N_o for each objective]`` over the global batch: this rank's micro-batches
    (whole sequences, before any context-parallel split), summed over the data-parallel
    replicas. Each objective counts the positions that carry its term (``Objective.count``)."""
    counts = torch.zeros(1 + len(objectives), dtype=torch.float64, device=device())
    for batch in batches:
        counts[0] += batch["loss_mask"].double().sum()
        for i, objective in enumerate(objectives):
            extra = objective.batch_inputs(batch)
            counts[1 + i] += objective.count({**batch, **extra}).to(counts.device)
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return counts


def term_scales(objectives, counts: torch.Tensor, iteration: int) -> dict[str, float]:
    """Each term's factor on its per-token sum: ``w_o(iteration) * N_ntp / N_o`` (0 when no
    position carries it); megatron-core divides the whole sum by ``N_ntp`` once."""
    n_ntp = counts[0].item()
    return {o.report_key: (o.weight_at(iteration) * n_ntp / counts[1 + i].item()
                           if counts[1 + i] > 0 else 0.0)
            for i, o in enumerate(objectives) if o.report_key is not None}


def reduce_report(reports: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Global means of the reported (sum, count) pairs of ``keys``.

    Every pipeline rank builds a tensor of the same shape ``[len(keys), 2]`` (zeros off the last
    stage) and all-reduces it over PP and then DP, so collectives never see mismatched shapes
    and every rank ends with the same values.
    """
    packed = torch.zeros(len(keys), 2, dtype=torch.float64, device=device())
    for report in reports:
        for i, key in enumerate(keys):
            if key in report:
                packed[i] += report[key].double().to(packed.device)
    torch.distributed.all_reduce(packed, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(
        packed, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    packed = packed.cpu()
    return {
        key: (packed[i, 0] / packed[i, 1]).item()
        for i, key in enumerate(keys)
        if packed[i, 1] > 0
    }


def report_keys(objectives, geometry: bool = True) -> tuple[str, ...]:
    """The reported values of a run: the lm loss, each objective's, the geometry."""
    keys = ("lm loss", *(o.report_key for o in objectives if o.report_key is not None))
    return keys + (GEOMETRY_KEYS if geometry else ())


def _run_schedule(model, batches, args, objectives, scales, forward_only, geometry):
    # Geometry is measured on the first micro-batch of data-parallel rank 0 only: the same
    # tokens as in a single-process run, whatever the layout.
    geometry = geometry and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    # each micro-batch's identity in the step: the key under which tapped layers are routed
    batches = [dict(batch, **{MICROBATCH: i}) for i, batch in enumerate(batches)]
    if geometry and batches:
        batches[0] = dict(batches[0], _first=True)
    forward_backward = get_forward_backward_func()
    step = partial(_forward_step, scales, objectives, geometry)
    chunks = as_chunks(model)
    reports = forward_backward(
        forward_step_func=step,
        # the interleaved schedule reads each chunk's micro-batches from its own iterator:
        # every chunk sees the step's micro-batches in order
        data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=args.model.seq_length,
        micro_batch_size=args.training.micro_batch_size,
        forward_only=forward_only,
    )
    for chunk in chunks:
        unwrap(chunk).finish_step()
    return reports


def grads_finite(model) -> bool:
    """True when every gradient on every rank is finite (one all-reduce of a flag).

    Each gradient buffer's L2 norm is a reduction, with no temporary of the buffer's size: it is
    NaN or Inf exactly when an entry is, or when the squares sum past the dtype's range (a norm
    past 1.8e19, which the optimizer's grad norm would give as Inf as well). The elementwise
    ``torch.isfinite`` would allocate the buffer's ``abs()`` and three boolean masks, 1.75x the
    fp32 gradients at once - the whole step's peak once recomputation is on."""
    bad = torch.zeros(1, device=device())
    for chunk in as_chunks(model):
        for buffer in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if buffer.grad_data.numel():
                norm = torch.linalg.vector_norm(buffer.grad_data)
                bad += (~torch.isfinite(norm)).to(bad.dtype)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0


def _zero_grad_buffers(model) -> None:
    for chunk in as_chunks(model):
        chunk.zero_grad_buffer()


def train_step(
    model, optimizer, scheduler, data_iterator: Iterator, args, iteration: int, geometry: bool,
) -> dict[str, float]:
    """Forward/backward over the step's micro-batches (``args.derived.num_microbatches``), then
    one optimizer step.

    Returns the global lm loss, nitp loss, total loss, grad norm, lr (and geometry if asked).
    Its phases (data loading, forward-backward, optimizer) are timed in ``timers.TIMERS``.
    A NaN/Inf in a loss or a gradient is caught before the optimizer step: the step is skipped
    (``--nan-policy skip``, reported as ``skipped``) or NonFiniteError is raised (``stop``). The
    weights are never updated with it. The ``nan-loss`` and ``nan-grad`` test faults
    (``training/faults.py``) strike here.
    """
    objectives = build_objectives(args.nitp_config, args.mtp)
    with TIMERS.phase(timers.DATA):
        batches = [to_device(next(data_iterator)) for _ in range(args.derived.num_microbatches)]
    weight = args.nitp_config.weight_at(iteration)
    scales = term_scales(objectives, _global_counts(batches, objectives), iteration)
    nan_loss = faults.due("nan-loss", iteration + 1)
    if nan_loss:
        scales = {key: float("nan") for key in scales}

    _zero_grad_buffers(model)
    optimizer.zero_grad()
    with TIMERS.phase(timers.FORWARD_BACKWARD):
        reports = _run_schedule(model, batches, args, objectives, scales, False, geometry)
    for objective in objectives:
        reports.append(objective.reports(len(batches)))
    if faults.due("nan-grad", iteration + 1):
        as_chunks(model)[0].buffers[0].grad_data.view(-1)[0] = float("nan")
    metrics = reduce_report(reports, report_keys(objectives))
    losses_finite = all(math.isfinite(metrics.get(k, 0.0))
                        for k in report_keys(objectives, geometry=False))
    if nan_loss:
        losses_finite = False
    if not (losses_finite and grads_finite(model)):
        diagnostics = {"iteration": iteration + 1, "losses": metrics,
                       "non_finite": "loss" if not losses_finite else "gradient",
                       "consumed_samples": getattr(data_iterator, "consumed_samples", None)}
        if args.training.nan_policy == "stop":
            raise NonFiniteError(diagnostics)
        _zero_grad_buffers(model)
        optimizer.zero_grad()
        metrics.update({"total loss": float("nan"), "grad norm": float("nan"), "skipped": 1.0,
                        "learning rate": optimizer.param_groups[0]["lr"], "nitp weight": weight})
        if args.moe.num_moe_experts:
            metrics.update(router_losses(args))
        return metrics
    with TIMERS.phase(timers.OPTIMIZER):
        update_successful, grad_norm, num_zeros = optimizer.step()
        if update_successful:
            scheduler.step(increment=1)
    if args.logging.log_num_zeros_in_grad and num_zeros is not None:
        metrics["num zeros"] = float(num_zeros)
    if args.logging.log_params_norm:
        with params_synced(model):
            metrics["params norm"] = params_l2_norm(model)

    combine(metrics, objectives, iteration)
    metrics["grad norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["learning rate"] = optimizer.param_groups[0]["lr"]
    metrics["nitp weight"] = weight
    metrics["skipped"] = 0.0 if update_successful else 1.0
    if args.moe.num_moe_experts:
        metrics.update(router_losses(args))
    return metrics


def router_losses(args) -> dict[str, float]:
    """The MoE router's losses (before their coefficients), each the mean over MoE layers and
    micro-batches, reduced over pipeline and data-parallel ranks by megatron-core's tracker,
    which has one ``[num_layers]`` tensor per loss on every rank: the load-balancing loss
    (megatron-core's ``load_balancing_loss``, or ``seq_load_balancing_loss`` with
    ``--moe-router-load-balancing-type seq_aux_loss``; none with ``none``) and the z-loss with
    ``--moe-z-loss-coeff``. Clears the tracker."""
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    names = {}
    balancing = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"
                 }.get(args.moe.moe_router_load_balancing_type)
    if balancing:
        names[balancing] = "load balancing loss"
    if args.moe.moe_z_loss_coeff is not None:
        names["z_loss"] = "z loss"
    if not names:
        return {}
    if "z_loss" in names:
        _average_z_loss_over_ranks()
    totals: dict = {}
    track_moe_metrics(
        loss_scale=1.0 / args.derived.num_microbatches, iteration=0, total_loss_dict=totals,
        force_initialize=True, track_names=list(names), num_layers=args.model.num_layers,
        moe_layer_freq=list(args.derived.moe_layer_pattern),
    )
    return {label: float(totals[name]) for name, label in names.items()}


def _average_z_loss_over_ranks() -> None:
    """megatron-core < 0.19 records each rank's z-loss (the mean over its own tokens) without a
    group to reduce it over, so the logged value was rank 0's shard; averaged over TP x CP x DP
    (equal token counts), as megatron-core 0.19 records it, it is the micro-batch's mean."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get("z_loss")
    if entry is not None and entry.get("avg_group") is None and entry.get("reduce_group") is None:
        entry["avg_group"] = parallel_state.get_tensor_and_data_parallel_group(
            with_context_parallel=True)


@torch.no_grad()
def evaluate(model, data_iterator: Iterator, args, eval_iters: int) -> dict[str, float]:
    """Forward-only passes over ``eval_iters`` global batches: the validation lm loss and each
    objective's term computed by the model (no weights: nothing is trained)."""
    objectives = tuple(o for o in build_objectives(args.nitp_config, args.mtp)
                       if o.name != "mtp")
    for chunk in as_chunks(model):
        chunk.eval()
    reports = []
    for _ in range(eval_iters):
        batches = [to_device(next(data_iterator)) for _ in range(args.derived.num_microbatches)]
        scales = {o.report_key: 0.0 for o in objectives}
        reports += _run_schedule(model, batches, args, objectives, scales, True, False)
    for chunk in as_chunks(model):
        chunk.train()
    metrics = reduce_report(reports, report_keys(objectives, geometry=False))
    nitp_terms = [o for o in objectives if getattr(o, "terms", 1) > 1]
    if nitp_terms:
        combine(metrics, nitp_terms, 0)
        metrics.pop("total loss")
    return metrics
