"""Per-layer geometry on a fixed probe batch.

Every ``--geometry-interval`` iterations (the iterations that measure the step's geometry), the
probe runs one forward-only pass (as ``evaluate()``: the model in eval mode, no gradient,
megatron-core's forward-only schedule, so it works under any pipeline layout) over a FIXED
global batch and logs, for every tapped layer k (the objectives' taps) and the final hidden
state, over the probe batch's counted tokens (``loss_mask > 0``):

- ``probe effective rank layer k`` / ``... final``: exp(entropy) of the covariance spectrum
  (``geometry.effective_rank``), from the reduced token count, sum and Gram matrix;
- ``probe cosine similarity layer k``: the mean cosine over ALL pairs of distinct tokens,
  ``(|sum_i u_i|^2 - n) / (n (n - 1))`` with ``u_i`` the unit states;
- ``probe norm layer k``: the mean L2 norm of the token states;
- ``probe drift layer k``: ``1 - mean_i cos(x_i, x_i^0)``, with ``x^0`` the same token's state at
  the run's first probe (0 there), held on the last stage in host memory and stored in every
  checkpoint (below), so a resumed run continues the same curve;
- ``probe cos(P(h),z) mean|p10|p50|p90``: the distribution of ``cos(P(h_t), z_{t+1})`` of the
  paper's NITP term (its projector, ``--nitp-loss-kind cosine``: ``1 - `` its per-token term)
  over the positions that carry it, and a TensorBoard histogram ``probe cos(P(h),z)``.

The probe batch: the first global batch of the validation data (samples ``[0, G)``, the one
``evaluate()`` reads first) when the run evaluates; else the training data's first global batch
(samples ``[0, G)``: a fixed draw, seen by the model at iteration 1, so not held out). It is
read from the dataset, not from the training iterator, so the training data position is never
moved, and it is the same on resume and whatever the layout (each data-parallel rank takes its
micro-batches of it in Megatron's sample order).

Values are reduced like the step's reports: each rank packs its sums into one ``float64``
tensor of a fixed shape (zeros off the last stage) all-reduced over PP and then DP x CP, so
every rank holds them; the cosine values are placed at their (sample, position) slot of a
``[G * s]`` tensor reduced the same way (exactly one rank writes each slot), so their
distribution does not depend on the layout. Cost: a ``[h, h]`` float64 Gram matrix per tapped
layer (and the final state) and the first probe's states (``G/DP * s * h`` values per layer on
each last-stage rank, in host memory, in the model's dtype).

The first probe's states in a checkpoint: ``probe/dp_<d>_cp_<c>.pt``, one per data-parallel and
context-parallel rank, written (``torch.save``, in the trainer, also with ``--async-save``, like
the RNG states) by tensor-parallel rank 0 of the last stage (its TP peers hold the same,
TP-gathered states) with the probe tokens they are of. A resume takes them back when this
rank's probe tokens (its micro-batches of the probe batch and, under CP, its chunks of them)
and tapped layers are those stored, whatever the pipeline and tensor-parallel layout; else
(another DP or CP size, micro-batch size, probe data or taps, or a checkpoint written without
them) every rank drops them, the drift restarts from 0 at the resumed run's first probe and
the log says so in one line.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_nitp.data.datasets import MicroBatchIterator
from megatron_nitp.device import device, to_device
from megatron_nitp.objectives import build_objectives
from megatron_nitp.training.model import as_chunks, unwrap
from megatron_nitp.training.step import MICROBATCH, forward_microbatch

POSITION = "_probe_position"  # [b, s]: each token's slot sample * s + t in the probe batch
HISTOGRAM = "probe cos(P(h),z)"
PERCENTILES = (10, 50, 90)
REFERENCE_FOLDER = "probe"  # in a checkpoint: the first probe's states, one file per DP x CP rank


def layer_name(layer) -> str:
    return "final" if layer == "final" else f"layer {layer}"


def probe_keys(layers) -> list[str]:
    """The history keys of the geometry of ``layers`` (tap numbers and ``"final"``)."""
    return [f"probe {what} {layer_name(layer)}" for layer in layers
            for what in ("effective rank", "cosine similarity", "norm", "drift")]


def _paper_term(objectives):
    """The report key of the paper's NITP term (the model's ``projector``) when its distance
    is the cosine, else None."""
    for objective in objectives:
        if (objective.module_name == "projector" and objective.name == "nitp"
                and objective.nitp.loss_kind == "cosine"):
            return objective.report_key
    return None


class Probe:
    """The probe batch of this data-parallel rank and the first probe's states."""

    def __init__(self, batches: list[dict], args, held_out: bool):
        self.batches = batches  # on the CPU; each with POSITION
        self.held_out = held_out
        self.objectives = tuple(o for o in build_objectives(args.nitp_config, args.mtp)
                                if o.name != "mtp")
        self.layers = (*sorted({k for o in self.objectives for k in o.taps}), "final")
        self.term = _paper_term(self.objectives)
        self.hidden_size = args.model.hidden_size
        self.reference: dict = {}  # (micro-batch, layer) -> first probe's [n, h] states (CPU)

    @classmethod
    def build(cls, args, train_iter, valid_iter) -> "Probe":
        """The probe batch: the validation data's first global batch when ``valid_iter`` (the
        run's validation iterator factory) is given, else the training data's (see the module
        docstring); read from the dataset, never from ``train_iter``'s position."""
        held_out = valid_iter is not None
        dataset = valid_iter().dataset if held_out else train_iter.dataset
        dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        mbs, s = args.training.micro_batch_size, args.model.seq_length
        source = MicroBatchIterator(dataset, mbs, dp_rank, dp_size, eod=train_iter.eod)
        batches = []
        for m in range(args.derived.num_microbatches):
            first = (m * dp_size + dp_rank) * mbs  # the micro-batch's first sample
            batch = next(source)
            where = batch["tokens"].device  # the batch's own (moved to device() with it)
            samples = torch.arange(first, first + mbs, device=where).unsqueeze(1)
            batch[POSITION] = samples * s + torch.arange(s, device=where).unsqueeze(0)
            batches.append(batch)
        return cls(batches, args, held_out)

    def keys(self) -> list[str]:
        keys = probe_keys(self.layers)
        if self.term is not None:
            keys += [f"{HISTOGRAM} mean"] + [f"{HISTOGRAM} p{q}" for q in PERCENTILES]
        return keys

    def _tokens_held(self) -> dict:
        """What this rank's references are of: its micro-batches' ``[b, s]`` tokens of the
        probe batch, its context-parallel chunk of them and the tapped layers."""
        return {"tokens": [batch["tokens"] for batch in self.batches],
                "cp": [parallel_state.get_context_parallel_world_size(),
                       parallel_state.get_context_parallel_rank()],
                "layers": list(self.layers)}

    def _reference_file(self) -> str:
        """This rank's reference file, relative to a checkpoint folder."""
        return os.path.join(REFERENCE_FOLDER,
                            f"dp_{parallel_state.get_data_parallel_rank():05d}_"
                            f"cp_{parallel_state.get_context_parallel_rank():05d}.pt")

    def checkpoint_files(self) -> dict[str, dict]:
        """What this rank stores in a checkpoint (``save_checkpoint``'s ``rank_files``): the
        first probe's states, ``{(micro-batch, layer): [n, h]}`` in the model's dtype on the
        host, with the tokens they are of, on tensor-parallel rank 0 of the last stage once a
        probe has run; nothing elsewhere."""
        if not self.reference or parallel_state.get_tensor_model_parallel_rank() != 0:
            return {}
        return {self._reference_file(): {"of": self._tokens_held(),
                                         "reference": self.reference}}

    def resume(self, path: str) -> str | None:
        """Takes the first probe's states back from checkpoint ``path`` (the last stage's
        ranks; see the module docstring). Every rank must call it (one all-gather): all keep
        them or all drop them. Returns, on every rank, the one line that says why the drift
        restarts, or None when it continues."""
        problem = None
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            file = os.path.join(path, self._reference_file())
            if not os.path.isdir(os.path.join(path, REFERENCE_FOLDER)):
                problem = "the checkpoint holds no probe references (written without them)"
            elif not os.path.exists(file):
                problem = ("the checkpoint's probe references are of another data-parallel or "
                           "context-parallel layout")
            else:
                stored = torch.load(file, weights_only=True)
                if _same_tokens(stored["of"], self._tokens_held()):
                    self.reference = stored["reference"]
                else:
                    problem = ("the checkpoint's probe references are of other probe tokens "
                               "(another data-parallel or context-parallel layout, micro-batch "
                               "size, probe data or tapped layers)")
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, problem)
        problem = next((p for p in everyone if p), None)
        if problem is None:
            return None
        self.reference = {}
        return f"> probe: the drift restarts from 0 at this run's first probe: {problem}"

    @torch.no_grad()
    def measure(self, model, args) -> tuple[dict[str, float], torch.Tensor | None]:
        """One forward-only pass over the probe batch: ``(values by key, the cosine values of
        the paper's term or None)``, the same on every rank. Leaves the model in train mode
        and the RNG and data position untouched."""
        chunks = as_chunks(model)
        for chunk in chunks:
            chunk.eval()
        h = self.hidden_size
        width = 2 + 2 * h + h * h + 2  # n, norm sum, sum, unit sum, Gram, drift cos sum, count
        stats = torch.zeros(len(self.layers), width, dtype=torch.float64, device=device())
        slots = len(self.batches) * args.training.micro_batch_size * args.model.seq_length
        slots *= parallel_state.get_data_parallel_world_size()
        cosines = torch.zeros(2, slots, dtype=torch.float64, device=device())  # value, carried
        batches = [dict(to_device(b), **{MICROBATCH: i}) for i, b in enumerate(self.batches)]
        try:
            get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, stats, cosines),
                data_iterator=([iter(batches) for _ in chunks] if len(chunks) > 1
                               else iter(batches)),
                model=chunks, num_microbatches=len(batches), seq_length=args.model.seq_length,
                micro_batch_size=args.training.micro_batch_size, forward_only=True)
            for chunk in chunks:
                unwrap(chunk).finish_step()
        finally:
            for chunk in chunks:
                chunk.train()
        for tensor in (stats, cosines):
            torch.distributed.all_reduce(
                tensor, group=parallel_state.get_pipeline_model_parallel_group())
            torch.distributed.all_reduce(
                tensor, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        values = {}
        stats = stats.to("cpu")  # after the last collective: read on the host
        for layer, row in zip(self.layers, stats):
            values.update(_geometry(layer, row, h))
        if self.term is None:
            return values, None
        cosines = cosines.to("cpu")  # after the last collective: read on the host
        carried = cosines[0][cosines[1] > 0]
        if carried.numel():
            values[f"{HISTOGRAM} mean"] = carried.mean().item()
            quantiles = torch.quantile(carried, torch.tensor([q / 100 for q in PERCENTILES],
                                                             dtype=torch.float64,
                                                             device=carried.device))
            for q, value in zip(PERCENTILES, quantiles.tolist()):
                values[f"{HISTOGRAM} p{q}"] = value
        return values, carried

    def _forward_step(self, stats, cosines, data_iterator, model):
        """megatron-core's forward step: the training step's (``forward_microbatch``) with the
        final and tapped states asked for, reduced by :meth:`_reduce` on the last stage."""
        batch = next(data_iterator)
        output, seen = forward_microbatch(model, batch, self.objectives, return_hidden=True)
        return output, partial(self._reduce, stats, cosines, batch[MICROBATCH],
                               seen["loss_mask"], seen[POSITION])

    def _reduce(self, stats, cosines, microbatch, loss_mask, position, output):
        """This micro-batch's sums (last stage), added into ``stats`` and ``cosines``."""
        counted = loss_mask.reshape(-1) > 0  # [b * s] in [b, s] order
        for i, layer in enumerate(self.layers):
            states = output.hidden if layer == "final" else output.taps[layer]
            raw = states.transpose(0, 1).reshape(-1, states.shape[-1])[counted]
            x = raw.double()
            first = (microbatch, layer) not in self.reference
            if first:  # in the states' own dtype (bf16 in a bf16 run: half of fp32's bytes)
                self.reference[(microbatch, layer)] = raw.detach().to("cpu")  # host memory
            stats[i] += _sums(x, None if first else self.reference[(microbatch, layer)])
        if self.term is not None and self.term in output.aux:
            term = output.aux[self.term]
            carried = term.mask.reshape(-1) > 0
            slot = position.reshape(-1)[carried].to(cosines.device)
            cosines[0, slot] += 1.0 - term.loss.reshape(-1)[carried].double()
            cosines[1, slot] += 1.0
        zero = torch.zeros((), device=loss_mask.device)
        return zero, torch.ones((), dtype=torch.int, device=loss_mask.device), {}


def _same_tokens(stored: dict, ours: dict) -> bool:
    """Whether stored references (:meth:`Probe.checkpoint_files`) are of this rank's tokens."""
    return (stored["cp"] == ours["cp"] and stored["layers"] == ours["layers"]
            and len(stored["tokens"]) == len(ours["tokens"])
            and all(a.shape == b.shape and torch.equal(a.to(b.device), b)
                    for a, b in zip(stored["tokens"], ours["tokens"])))


def _sums(x: torch.Tensor, reference) -> torch.Tensor:
    """``[n, h]`` float64 token states -> one row: n, sum of norms, sum, sum of unit states,
    Gram matrix (flattened), sum of cos(x_i, reference_i) (n: no reference, the first probe), n."""
    norms = x.norm(dim=-1)
    unit = x / norms.clamp_min(1e-30).unsqueeze(-1)
    n = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
    if reference is None:
        same = n[0]
    else:
        same = torch.nn.functional.cosine_similarity(
            x, reference.to(x.device, torch.float64), dim=-1, eps=1e-30).sum()
    return torch.cat([n, norms.sum().view(1), x.sum(0), unit.sum(0), (x.T @ x).reshape(-1),
                      same.view(1), n])


def _geometry(layer, row: torch.Tensor, h: int) -> dict[str, float]:
    """A layer's values from its reduced row of sums (:func:`_sums`)."""
    n, norm_sum = row[0], row[1]
    total, unit = row[2:2 + h], row[2 + h:2 + 2 * h]
    gram = row[2 + 2 * h:2 + 2 * h + h * h].view(h, h)
    drift_sum, drift_n = row[-2], row[-1]
    if n < 2:
        return {}
    centred = gram - torch.outer(total, total) / n  # sum_i (x_i - mean)(x_i - mean)^T
    eig = torch.linalg.eigvalsh((centred + centred.T) / 2).clamp_min(0)
    p = eig / eig.sum() if eig.sum() > 0 else torch.ones(1, dtype=torch.float64,
                                                          device=eig.device)
    p = p[p > 0]
    name = layer_name(layer)
    return {
        f"probe effective rank {name}": torch.exp(-(p * p.log()).sum()).item(),
        f"probe cosine similarity {name}": ((unit.dot(unit) - n) / (n * (n - 1))).item(),
        f"probe norm {name}": (norm_sum / n).item(),
        f"probe drift {name}": (1.0 - drift_sum / drift_n).item(),
    }
