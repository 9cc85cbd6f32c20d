"""Training logs: Megatron-style console lines, TensorBoard scalars, a progress bar, history.

Every reported value is reduced to every rank (see ``step.reduce_report``), so rank 0 logs
even when the losses are computed on the last pipeline stage.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict

import torch

from megatron_nitp.config.schema import LoggingConfig
from megatron_nitp.device import has_cuda
from megatron_nitp.device import name as device_name
from megatron_nitp.training import timers
from megatron_nitp.training.memory import TENSORBOARD_TAGS as MEMORY_TAGS

# Console order; an objective's other losses (``nitp loss k=<k> t+<d>``, ``cosine reg loss``)
# come after the nitp loss.
CONSOLE_KEYS = ("lm loss", "nitp loss", "mtp loss", "load balancing loss", "z loss", "total loss",
                "grad norm", "num zeros", "params norm", "effective rank", "cosine similarity")
# Shown on the console (and in the run summary) as their mean over the logging interval, as
# Megatron-LM's ``training_log`` does: the line at iteration N averages the iterations since the
# previous line, skipped ones left out. The other console values are the iteration's own. Every
# key naming a loss (each objective's: " loss" in it) is one of them.
INTERVAL_MEAN_KEYS = ("lm loss", "nitp loss", "mtp loss", "load balancing loss", "z loss",
                      "total loss")


def loss_keys(metrics: dict) -> list[str]:
    """The interval-mean keys of ``metrics``: the fixed ones, then any other objective's loss."""
    extra = [k for k in metrics if " loss" in k and k not in INTERVAL_MEAN_KEYS]
    return [k for k in INTERVAL_MEAN_KEYS if k in metrics] + extra


def console_keys(metrics: dict) -> list[str]:
    """Console order of ``metrics``' keys: the objectives' other losses after the nitp loss."""
    extra = [k for k in loss_keys(metrics) if k not in CONSOLE_KEYS]
    at = CONSOLE_KEYS.index("mtp loss")
    return [k for k in (*CONSOLE_KEYS[:at], *extra, *CONSOLE_KEYS[at:]) if k in metrics]
# TensorBoard tags in Megatron-LM's naming (losses keep their names; validation values are
# "<key> validation").
TENSORBOARD_TAGS = {
    "learning rate": "learning-rate",
    "grad norm": "grad-norm",
    "num zeros": "num-zeros",
    "params norm": "params-norm",
    "tokens per second": "tokens-per-sec",
    "nitp weight": "nitp-loss-weight",
    "skipped": "skipped-iteration",
    "load balancing loss": "load_balancing_loss",
    "z loss": "z_loss",
}


def tensorboard_tag(key: str, validation: bool = False) -> str:
    if validation:
        return f"{key} validation"
    return (TENSORBOARD_TAGS.get(key) or MEMORY_TAGS.get(key)
            or timers.TENSORBOARD_TAGS.get(key, key))


def is_logging_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


#: The run folder's record of every logged value, one JSON line per record, so that a run resumed
#: into the same folder writes summary.json and training.png over all its segments.
HISTORY_FILE = "history.jsonl"


def read_history(path: str, until: int) -> list[dict]:
    """The entries of a history file up to iteration ``until`` (those after it were redone by
    the resumed segment); a line cut short by a killed process is left out."""
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry["iteration"] <= until:
                entries.append(entry)
    return entries


# Dense bf16 peak TFLOP/s per device, for MFU (``--peak-tflops`` overrides).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0,
               "L40S": 362.1, "B200": 2250.0}


def peak_tflops(logging: LoggingConfig) -> float | None:
    """The device's peak for MFU: ``--peak-tflops``, else a known GPU's bf16 dense peak."""
    if logging.peak_tflops:
        return logging.peak_tflops
    if not has_cuda():
        return None
    name = device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def training_flops_per_token(args) -> float:
    """Exact training FLOPs per token of the model (forward + backward), NITP's and MTP's
    included."""
    from megatron_nitp.accounting.flops import exact_flops, mtp_flops

    flops = exact_flops(args.flat())
    total = flops.ntp_total + (flops.nitp if args.nitp_config.enabled else 0.0)
    if args.mtp.mtp_num_layers:
        total += mtp_flops(args.flat(), args.mtp.mtp_num_layers)
    return total


class TrainingLogger:
    """Writes console lines and TensorBoard scalars on rank 0 and keeps the history in memory.

    With ``--wandb-project`` the same scalars, under the same tags, go to Weights & Biases
    (rank 0, imported only then: it is an optional dependency). The memory figures go to
    TensorBoard and W&B only with ``--log-memory-to-tensorboard``, as in Megatron-LM; the
    console and the history keep them."""

    def __init__(self, args, tensorboard_dir: str | None, memory=None,
                 run_dir: str | None = None, start_iteration: int = 0):
        self.args = args
        #: the ``memory.MemoryMonitor`` whose figures (in the metrics of a logging iteration)
        #: the console line shows; None shows none
        self.memory = memory
        self.flops_per_token = (training_flops_per_token(args) if args.logging.log_throughput
                                else None)
        self.peak = peak_tflops(args.logging)
        self.enabled = is_logging_rank()
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.writer = None
        self.wandb = None
        self.bar = None
        self.skipped = 0
        self._interval_seconds, self._interval_iters = 0.0, 0
        self._loss_sums: dict[str, float] = defaultdict(float)
        self._loss_iters = 0
        self._interval_first: int | None = None
        #: (first, last) iteration the last console line averaged over
        self.interval_span: tuple[int, int] | None = None
        #: the means of INTERVAL_MEAN_KEYS shown on the last console line (the run summary's
        #: losses); empty before the first line
        self.interval_means: dict[str, float] = {}
        #: segments of the run in this folder: 1, plus one per resume that continued its history
        self.segments = 1
        self._history_file = None
        if not self.enabled:
            return
        if run_dir:
            self._open_history(os.path.join(run_dir, HISTORY_FILE), start_iteration)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir,
                                        max_queue=args.logging.tensorboard_queue_size)
        if args.logging.wandb_project:
            self.wandb = _start_wandb(args, run_dir)
        if args.logging.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=args.training.train_iters, desc="training", unit="it",
                            dynamic_ncols=True)

    def _open_history(self, path: str, start_iteration: int) -> None:
        """Continues the folder's history when this run resumes at ``start_iteration`` (the
        earlier segments' entries up to it, and a mark where this segment starts), else
        starts it afresh."""
        kept = []
        if start_iteration and os.path.exists(path):
            kept = read_history(path, start_iteration)
            kept.append({"iteration": start_iteration, "resumed": True})
        for entry in kept:
            if entry.get("resumed"):
                self.segments += 1
                continue
            prefix = "validation " if entry["validation"] else ""
            for key, value in entry["metrics"].items():
                self.history[prefix + key].append((entry["iteration"], value))
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in kept)
        os.replace(path + ".tmp", path)
        self._history_file = open(path, "a")

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def record(self, iteration: int, metrics: dict[str, float], validation: bool = False,
               write: bool = True) -> None:
        """Keeps every metric in the history (validation ones as ``"validation <key>"``) and,
        with ``write``, writes it to TensorBoard and W&B (memory figures only with
        ``--log-memory-to-tensorboard``)."""
        scalars = {}
        for key, value in metrics.items():
            self.history[("validation " if validation else "") + key].append((iteration, value))
            if key in MEMORY_TAGS and not self.args.logging.log_memory_to_tensorboard:
                continue
            if math.isfinite(value):
                scalars[tensorboard_tag(key, validation)] = value
        if self._history_file is not None:
            self._history_file.write(json.dumps({"iteration": iteration, "validation": validation,
                                                 "metrics": metrics}, default=float) + "\n")
            self._history_file.flush()
        if not write:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=iteration)

    def is_log_iteration(self, iteration: int) -> bool:
        """Whether ``iteration`` prints a console line: every ``--log-interval``, and the
        last."""
        return (iteration % self.args.logging.log_interval == 0
                or iteration == self.args.training.train_iters)

    def log_train(self, iteration: int, metrics: dict[str, float], iter_seconds: float) -> None:
        """Records the iteration's values (history and TensorBoard per iteration) and, every
        ``--log-interval`` iterations and at the last one, prints a console line whose losses
        are means over the iterations since the previous line (:data:`INTERVAL_MEAN_KEYS`).
        The metrics of such an iteration carry the interval's memory figures (``memory.py``:
        peak since the previous line, max over ranks), which the line shows last."""
        args = self.args
        written = iteration % args.logging.tensorboard_log_interval == 0
        self.record(iteration, metrics, write=written)
        if written and self.writer is not None and args.logging.log_batch_size_to_tensorboard:
            self.writer.add_scalar("batch-size", args.training.global_batch_size, iteration)
        skipped = bool(metrics.get("skipped", 0))
        self.skipped += int(skipped)
        self._interval_seconds += iter_seconds
        self._interval_iters += 1
        if self._interval_first is None:
            self._interval_first = iteration
        if not skipped:  # Megatron-LM leaves skipped iterations out of the averages
            self._loss_iters += 1
            for key in loss_keys(metrics):
                self._loss_sums[key] += metrics[key]
        if self.bar is not None:
            self.bar.update(1)
            postfix = {"lm": f"{metrics['lm loss']:.3f}"}
            if "nitp loss" in metrics:
                postfix["nitp"] = f"{metrics.get('nitp loss', float('nan')):.3f}"
            self.bar.set_postfix(**postfix)
        if not self.is_log_iteration(iteration):
            return
        seconds = self._interval_seconds / self._interval_iters
        self._interval_seconds, self._interval_iters = 0.0, 0
        self.interval_means = {
            key: (self._loss_sums[key] / self._loss_iters if self._loss_iters else float("nan"))
            for key in loss_keys(metrics)}
        self._loss_sums.clear()
        self._loss_iters = 0
        self.interval_span, self._interval_first = (self._interval_first, iteration), None
        shown = {**metrics, **self.interval_means}
        parts = [
            f" iteration {iteration:8d}/{args.training.train_iters:8d}",
            f"consumed samples: {iteration * args.training.global_batch_size:10d}",
            f"elapsed time per iteration (ms): {1000 * seconds:.1f}",
            f"tokens/s: {args.training.global_batch_size * args.model.seq_length / seconds:.0f}",
            *self._throughput(seconds),
            f"learning rate: {metrics['learning rate']:.3E}",
            f"global batch size: {args.training.global_batch_size:5d}",
        ]
        parts += [f"{k}: {shown[k]:.6E}" for k in console_keys(shown)]
        if self.memory is not None:
            parts += self.memory.console(metrics)
        parts += timers.console(metrics)
        if self.skipped:
            parts.append(f"number of skipped iterations: {self.skipped:3d}")
        self.print(" | ".join(parts) + " |")

    def _throughput(self, seconds: float) -> list[str]:
        """Megatron-style model TFLOP/s per device (NITP's FLOPs counted) and MFU on GPU."""
        if self.flops_per_token is None:
            return []
        args = self.args
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        tokens = args.training.global_batch_size * args.model.seq_length
        tflops = self.flops_per_token * tokens / seconds
        tflops = tflops / world / 1e12
        parts = [f"throughput per device (TFLOP/s): {tflops:.3f}"]
        if self.peak:
            parts.append(f"MFU: {100 * tflops / self.peak:.1f}%")
        return parts

    def log_eval(self, iteration: int, metrics: dict[str, float]) -> None:
        """The validation line and record: the lm loss and each objective's term."""
        self.record(iteration, metrics, validation=True)
        body = " | ".join(f"{k} value: {v:.6E}" for k, v in metrics.items())
        ppl = math.exp(min(20.0, metrics["lm loss"]))
        if self.writer is not None and self.args.logging.log_validation_ppl_to_tensorboard:
            self.writer.add_scalar(tensorboard_tag("lm loss", validation=True) + " ppl", ppl,
                                   iteration)
        line = f" validation loss at iteration {iteration} | {body} | lm loss PPL: {ppl:.6E} |"
        self.print("-" * len(line) + "\n" + line + "\n" + "-" * len(line))

    def log_probe(self, iteration: int, values: dict[str, float], cosines=None,
                  histogram: str = "probe cos(P(h),z)") -> None:
        """The probe's values (``training/probe.py``) in the history and TensorBoard, and the
        distribution of ``cosines`` as a TensorBoard histogram."""
        self.record(iteration, values)
        if self.writer is not None and cosines is not None and cosines.numel():
            self.writer.add_histogram(histogram, cosines.float(), iteration)

    def close(self) -> None:
        if self._history_file is not None:
            self._history_file.close()
            self._history_file = None
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(args, run_dir: str | None):
    """A W&B run for ``--wandb-project`` (name ``--wandb-exp-name`` or the run folder's, files
    in ``--wandb-save-dir`` or ``<run-dir>/wandb``), the run config attached."""
    import os

    try:
        import wandb
    except ImportError as err:
        raise RuntimeError("--wandb-project needs the wandb package: pip install wandb, or drop "
                           "--wandb-project.") from err
    run_dir = run_dir or args.logging.run_dir or "."
    save_dir = args.logging.wandb_save_dir or os.path.join(run_dir, "wandb")
    os.makedirs(save_dir, exist_ok=True)
    return wandb.init(project=args.logging.wandb_project,
                      name=(args.logging.wandb_exp_name
                            or os.path.basename(os.path.normpath(run_dir))),
                      dir=save_dir, config=args.to_dict())


class Throughput:
    """Wall-clock of an iteration and tokens/s over the global batch."""

    def __init__(self, tokens_per_iteration: int):
        self.tokens = tokens_per_iteration
        self.start = time.perf_counter()

    def lap(self) -> tuple[float, float]:
        now = time.perf_counter()
        seconds, self.start = now - self.start, now
        return seconds, self.tokens / max(seconds, 1e-9)
