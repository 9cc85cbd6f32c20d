"""Memory you can see: per-interval peaks (``training/memory.py``) and the plan beside them."""

import re

import pytest
import torch

from megatron_nitp.accounting import memory_plan
from megatron_nitp.accounting.parallel import layout_of
from megatron_nitp.training import memory
from megatron_nitp.training.memory import MB, MemoryMonitor, key
from tests.helpers import tiny_args

BIG_MB = 256


def _touch_big_tensor() -> None:
    """Allocates and fills ``BIG_MB`` MB (every page resident), then frees it."""
    big = torch.ones(BIG_MB * MB // 4, dtype=torch.float32, device="cpu")
    assert float(big[-1]) == 1.0
    del big


@pytest.mark.skipif(not memory._clear_refs_writable(), reason="/proc/self/clear_refs not writable")
def test_cpu_peak_is_per_interval(dist):
    """A large tensor in one interval raises that interval's peak RSS; the next interval,
    without it, peaks lower: the reset between lines works."""
    monitor = MemoryMonitor("proc")
    monitor.begin()
    rss_before = monitor.local()["rss"] / MB
    _touch_big_tensor()
    first = monitor.measure()
    # what was resident at begin(), reduced with the first measure() and only with it
    assert monitor.start_mb == pytest.approx(rss_before, rel=0.05)
    second = monitor.measure()
    assert monitor.start_mb == pytest.approx(rss_before, rel=0.05)
    for figures in (first, second):
        assert set(figures) == {key("rss"), key("max rss")}
        assert 0 < figures[key("rss")] <= figures[key("max rss")]
    assert first[key("max rss")] >= rss_before + 0.9 * BIG_MB
    assert second[key("max rss")] < first[key("max rss")] - 0.5 * BIG_MB
    assert monitor.peak_key == key("max rss")


def test_rusage_fallback_is_labelled_since_start(dist):
    """Where the peak cannot be reset, the figure says it is the peak since start."""
    monitor = MemoryMonitor("rusage")
    figures = monitor.measure()
    assert 0 < figures[key("rss")] <= figures[key("max rss since start")]
    parts = monitor.console(figures)
    assert parts[0].startswith("memory (MB, max over ranks) rss: ")
    assert parts[1].startswith("max rss since start: ")
    assert memory.TENSORBOARD_TAGS[monitor.peak_key] == "mem-max-rss-since-start-MB"


def test_console_parts_follow_megatron_names():
    monitor = MemoryMonitor("cuda")  # formatting only: no CUDA call
    figures = {key("allocated"): 1.0, key("max allocated"): 2.0, key("reserved"): 3.0,
               key("max reserved"): 4.0}
    assert " | ".join(monitor.console(figures)) == (
        "memory (MB, max over ranks) allocated: 1.0 | max allocated: 2.0 | reserved: 3.0 | "
        "max reserved: 4.0")
    assert monitor.console({"lm loss": 1.0}) == []
    assert memory.TENSORBOARD_TAGS[key("max allocated")] == "mem-max-allocated-MB"


def test_planned_memory_is_the_dry_runs_largest_stage():
    args = tiny_args("--pipeline-model-parallel-size", "2")
    stages = memory_plan.stage_memories(args)
    assert len(stages) == 2
    assert memory_plan.planned_memory(args) == max(stages, key=lambda m: m.total)
    layout = layout_of(args)
    assert (layout.world, layout.pp, layout.dp) == (2, 2, 1)


def test_planned_vs_measured_line():
    planned = memory_plan.planned_memory(tiny_args())
    model = planned.total - planned.runtime
    cpu = MemoryMonitor("proc").planned_vs_measured(
        10, {key("rss"): 500.0, key("max rss"): 1024.0}, planned)
    assert cpu.startswith("> memory after iteration 10: peak 1.00 GiB RSS measured (max over "
                          "ranks; the RSS includes the Python/torch runtime")
    assert f"vs {memory.readable(model)} planned per rank by --dry-run (weights " in cpu
    assert "runtime allowance left out on CPU" in cpu
    assert "before the first step" not in cpu
    on_gpu = MemoryMonitor("cuda")
    on_gpu.start_mb = 512.0
    gpu = on_gpu.planned_vs_measured(
        10, {key("max allocated"): 2048.0, key("max reserved"): 3072.0}, planned, 2)
    assert "peak 2.00 GiB allocated, 3.00 GiB reserved measured (max over ranks" in gpu
    assert "; 512.0 MiB allocated before the first step) vs " in gpu
    assert re.search(rf"vs {planned.total / memory_plan.GIB:.2f} GiB planned per rank by --dry-run for "
                     rf"pipeline stage {planned.stage}, the largest, \(weights .* \+ runtime ",
                     gpu)
    assert memory.readable(1.5 * memory_plan.GIB) == "1.50 GiB"
    assert memory.readable(3 * MB) == "3.0 MiB"


def _cpu_peak_bytes(fn) -> int:
    """The peak of tensor bytes allocated while ``fn`` runs (torch.profiler's memory events in
    time order, as ``memory.step_memory`` measures on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_non_finite_gradient_check_finds_every_kind_without_a_copy(dist):
    """training.step.grads_finite, which decides whether a step is skipped (--nan-policy): a
    NaN, +Inf or -Inf anywhere in any gradient buffer (dense or expert-parallel) is found, and
    the check allocates nothing of the buffers' size (torch.isfinite allocated 1.75x the fp32
    gradients, the step's peak under recomputation: 214.6 of 250.4 MiB in tools/memory_benchmark
    --bf16)."""
    from types import SimpleNamespace

    from megatron_nitp.training.step import grads_finite

    n = 4 * MB // 4  # 4 MiB of fp32 gradients per buffer
    dense, experts = torch.randn(n), torch.randn(n // 2)
    chunk = SimpleNamespace(buffers=[SimpleNamespace(grad_data=dense),
                                     SimpleNamespace(grad_data=torch.empty(0))],
                            expert_parallel_buffers=[SimpleNamespace(grad_data=experts)])
    assert grads_finite(chunk) and grads_finite([chunk, chunk])  # one chunk, or a VPP list
    # huge but finite gradients pass while their norm fits fp32 (2^20 entries of ~1e15 here:
    # a norm of ~1e18); past 1.8e19 the norm, like the optimizer's grad norm, is Inf
    assert grads_finite(SimpleNamespace(buffers=[SimpleNamespace(grad_data=dense * 1e15)]))
    assert not grads_finite(SimpleNamespace(buffers=[SimpleNamespace(grad_data=dense * 1e17)]))
    for grads in (dense, experts):
        for index in (0, len(grads) // 3, len(grads) - 1):
            for value in (float("nan"), float("inf"), -float("inf")):
                kept = float(grads[index])
                grads[index] = value
                assert not grads_finite(chunk), (len(grads), index, value)
                assert not grads_finite([chunk, SimpleNamespace(buffers=[])])
                grads[index] = kept
    assert grads_finite(chunk)
    peak = _cpu_peak_bytes(lambda: grads_finite(chunk))
    assert peak < 0.01 * dense.numel() * 4, peak
