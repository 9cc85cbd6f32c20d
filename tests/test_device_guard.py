"""The guard against GPU-only device bugs that a CPU run cannot show.

Under gloo a tensor made without ``device=`` lands on the CPU and every collective accepts it;
under NCCL the same line crashes the first GPU iteration (a CPU tensor all-reduced on an NCCL
group, a CPU scalar stacked with CUDA results). So the package states a device for every tensor
it creates: this test parses every module (and the scripts ``scripts/gpu_check.sh`` runs under NCCL:
the parallel harness, the NCCL probe) and fails on a tensor constructor without a
``device=`` argument (``device()`` from ``megatron_nitp.device`` or the device of a tensor at
hand), and on device branches outside the one helper. Constructors that derive their device
from a tensor (``*_like``, ``Tensor.new_*``) are fine.

The escapes that satisfy "names a device" without naming the right one fail too: a CPU literal
(``device="cpu"``, ``torch.device("cpu")``, ``.to("cpu")``), ``device=None``, ``.cpu()``, and
constructors imported by name (``from torch import zeros``) or through an alias of torch, which
the scan would not see. Where the CPU is meant, the line is listed in :data:`ALLOWED` (or its
module in :data:`CPU_MODULES`) with the reason; an entry that no longer matches fails the test,
so the list cannot go stale.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron_nitp")

CONSTRUCTORS = {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn",
                "randint", "randperm", "linspace", "eye", "as_tensor"}
# Scripts outside the package that scripts/gpu_check.sh runs under NCCL: the same rules.
GPU_SCRIPTS = [os.path.join("tests", "parallel_harness.py"), os.path.join("tools", "nccl_probe.py")]
# Modules whose job is devices: the helper itself and the compatibility layer (which maps
# megatron-core's CUDA calls to the CPU).
EXEMPT = {os.path.join("megatron_nitp", "device.py")}
EXEMPT_DIRS = {os.path.join("megatron_nitp", "compat")}
# Modules whose CPU literals and .cpu() are meant (constructors there still name their device).
CPU_MODULES = {
    os.path.join("megatron_nitp", "evaluation.py"):
        "representation probes and cloze scoring run on the CPU by design: FrozenLM.forward "
        "moves the model's inputs to device() and brings logits and states back",
}
# (module, the line's source, stripped): why the CPU is meant there.
ALLOWED = {
    (os.path.join("megatron_nitp", "nitp", "shift.py"),
     'positions = torch.arange(seq_length, device="cpu")  # bookkeeping, never communicated'):
        "global positions are host bookkeeping (run bounds, ints); only values derived from "
        "them on states.device enter the all-gather",
    (os.path.join("megatron_nitp", "training", "step.py"),
     'generator = torch.Generator(device="cpu").manual_seed(0)  # same pairs on any device'):
        "the geometry's random pairs are drawn on the CPU so that CPU and GPU runs measure the "
        "same pairs; CPU index tensors may index CUDA tensors",
    (os.path.join("megatron_nitp", "geometry.py"),
     'first = torch.randint(0, n, (num_pairs,), generator=generator, device="cpu")'):
        "drawn from the CPU generator above (same pairs on any device)",
    (os.path.join("megatron_nitp", "geometry.py"),
     'offset = torch.randint(1, n, (num_pairs,), generator=generator, device="cpu")'):
        "drawn from the CPU generator above (same pairs on any device)",
    (os.path.join("megatron_nitp", "training", "step.py"), "packed = packed.cpu()"):
        "after the last collective: the reduced report is read on the host",
    (os.path.join("megatron_nitp", "training", "probe.py"),
     'stats = stats.to("cpu")  # after the last collective: read on the host'):
        "the probe's reduced sums are read on the host after the last all-reduce",
    (os.path.join("megatron_nitp", "training", "probe.py"),
     'cosines = cosines.to("cpu")  # after the last collective: read on the host'):
        "the probe's reduced cosines are read on the host after the last all-reduce",
    (os.path.join("megatron_nitp", "training", "probe.py"),
     'self.reference[(microbatch, layer)] = raw.detach().to("cpu")  # host memory'):
        "the first probe's states are kept in host memory (G/DP x s x h per tapped layer), "
        "never communicated; the drift moves them back to the device",
    (os.path.join("tests", "parallel_harness.py"),
     'full[key] = torch.full(shape, float("nan"))'):
        "the full tensors are assembled on rank 0's host from the shards all_gather_object "
        "brought (pickled, on the CPU); never communicated",
    (os.path.join("tests", "parallel_harness.py"),
     "sh_ten.data.detach().float().cpu().clone()))"):
        "each shard goes to the host to be pickled by all_gather_object (an object "
        "collective, which NCCL serves from the current device itself)",
    (os.path.join("megatron_nitp", "training", "checkpoint", "state.py"),
     'state["step"] = torch.tensor(0.0, device="cpu")  # where torch\'s Adam keeps it'):
        "torch Adam keeps its per-parameter step on the CPU (capturable=False); a CUDA step "
        "would not match the state it loads into",
}


def _modules():
    for base, _, names in os.walk(PACKAGE):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            rel = os.path.relpath(path, ROOT)
            if rel in EXEMPT or any(rel.startswith(d + os.sep) for d in EXEMPT_DIRS):
                continue
            yield rel, path
    for rel in GPU_SCRIPTS:
        yield rel, os.path.join(ROOT, rel)


def _torch_attr(node: ast.AST) -> str | None:
    """``torch.X`` -> "X" (also ``torch.cuda.X`` -> "cuda.X")."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "torch":
        return ".".join(reversed(parts))
    return None


def _is_cpu_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and (
        node.value == "cpu" or node.value.startswith("cpu:"))


def findings(source: str, rel: str) -> list[tuple[str, str]]:
    """``(line source stripped, message)`` for every suspicious construct of a module."""
    lines = source.splitlines()
    found = []

    def add(node, message):
        found.append((lines[node.lineno - 1].strip(), f"{rel}:{node.lineno}: {message}"))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            names = [a.name for a in node.names if a.name in CONSTRUCTORS or a.name == "*"]
            if names:
                add(node, f"from torch import {', '.join(names)} (hides the constructor from "
                          "this scan: call torch.X(..., device=...))")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch" and alias.asname not in (None, "torch"):
                    add(node, f"import torch as {alias.asname} (hides the constructors from "
                              "this scan)")
        if not isinstance(node, ast.Call):
            continue
        name = _torch_attr(node.func)
        device_kw = [k for k in node.keywords if k.arg == "device"]
        if name in CONSTRUCTORS and not device_kw:
            add(node, f"torch.{name}(...) names no device")
        for k in device_kw:
            if isinstance(k.value, ast.Constant) and k.value.value is None:
                add(node, "device=None (the CPU under any backend: use device())")
            elif _is_cpu_literal(k.value):
                add(node, f"device={k.value.value!r} (a CPU literal: use device())")
        if name == "device" and node.args and _is_cpu_literal(node.args[0]):
            add(node, "torch.device('cpu') (a CPU literal: use device())")
        if name is not None and name.startswith("cuda."):
            add(node, f"torch.{name} outside megatron_nitp/device.py")
        if isinstance(node.func, ast.Attribute) and not name:
            attr = node.func.attr
            if attr == "cuda" and not node.args:
                add(node, ".cuda() (use .to(device()))")
            if attr == "cpu" and not node.args:
                add(node, ".cpu() (moves to the host: NCCL and device tensors reject it)")
            if attr == "to" and node.args and _is_cpu_literal(node.args[0]):
                add(node, ".to('cpu') (a CPU literal: use device())")
    return found


def violations(source: str, rel: str) -> list[str]:
    """The findings of a module that no allow-list entry covers."""
    cpu_module = rel in CPU_MODULES
    out = []
    for line, message in findings(source, rel):
        if (rel, line) in ALLOWED:
            continue
        if cpu_module and ("CPU literal" in message or ".cpu()" in message):
            continue
        out.append(message)
    return out


def test_every_tensor_the_package_creates_names_its_device():
    found = []
    for rel, path in _modules():
        with open(path) as f:
            found += violations(f.read(), rel)
    assert not found, "tensors without a device (NCCL rejects CPU tensors):\n" + "\n".join(found)


def test_every_allowed_cpu_line_still_exists():
    """An allow-list entry whose line changed would silently allow nothing (or, rewritten, a
    different line): each must match a finding of its module."""
    seen = set()
    for rel, path in _modules():
        with open(path) as f:
            seen |= {(rel, line) for line, _ in findings(f.read(), rel)}
    stale = [key for key in ALLOWED if key not in seen]
    assert not stale, f"allow-list entries that match no line: {stale}"
    for rel in CPU_MODULES:
        assert os.path.exists(os.path.join(ROOT, rel)), rel


@pytest.mark.parametrize("line, bad", [
    ("counts = torch.zeros(2, dtype=torch.float64)", True),  # defect 1 of the GPU-correct issue
    ("one = torch.ones((), dtype=torch.float64)", True),  # defect 2
    ("flag = torch.tensor([1.0])\nif torch.cuda.is_available():\n    flag = flag.cuda()", True),
    ('counts = torch.zeros(2, device="cpu")', True),
    ('counts = torch.zeros(2, device="cpu:0")', True),
    ("counts = torch.zeros(2, device=None)", True),
    ('counts = torch.zeros(2, device=torch.device("cpu"))', True),
    ("report = packed.cpu()", True),
    ('report = packed.to("cpu")', True),
    ("from torch import zeros\ncounts = zeros(2)", True),
    ("from torch import *", True),
    ("import torch as th\ncounts = th.zeros(2)", True),
    ("counts = torch.zeros(2, dtype=torch.float64, device=device())", False),
    ("counts = torch.zeros(2, device=states.device)", False),
    ("pad = torch.zeros_like(states)", False),
    ("x = states.new_zeros(3)", False),
    ("x = states.to(device())", False),
    ("from torch import nn", False),
])
def test_the_guard_catches_the_defects_it_is_for(line, bad):
    assert bool(violations(line, "example.py")) == bad


def test_allowed_lines_are_allowed_only_in_their_module():
    line = "packed = packed.cpu()"
    assert not violations(line, os.path.join("megatron_nitp", "training", "step.py"))
    assert violations(line, os.path.join("megatron_nitp", "training", "loop.py"))
    assert not violations("x = y.cpu()", os.path.join("megatron_nitp", "evaluation.py"))
    assert violations("x = torch.zeros(2)", os.path.join("megatron_nitp", "evaluation.py"))
