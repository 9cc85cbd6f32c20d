"""The guard against GPU-only device bugs that a CPU run cannot show.

Under gloo a tensor made without ``device=`` lands on the CPU and every collective accepts it;
under NCCL the same line crashes the first GPU iteration (a CPU tensor all-reduced on an NCCL
group, a CPU scalar stacked with CUDA results). So the package states a device for every tensor
it creates: this test parses every module and fails on a tensor constructor without a
``device=`` argument (``device()`` from ``megatron_nitp.device``, the device of a tensor at hand,
or an explicit ``"cpu"`` where the CPU is meant), and on device branches outside the one helper.
Constructors that derive their device from a tensor (``*_like``, ``Tensor.new_*``) are fine.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron_nitp")

CONSTRUCTORS = {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn",
                "randint", "randperm", "linspace", "eye", "as_tensor"}
# Modules whose job is devices: the helper itself and the compatibility layer (which maps
# megatron-core's CUDA calls to the CPU).
EXEMPT = {os.path.join("megatron_nitp", "device.py")}
EXEMPT_DIRS = {os.path.join("megatron_nitp", "compat")}


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


def _torch_attr(node: ast.AST) -> str | None:
    """``torch.X`` -> "X" (also ``torch.cuda.X`` -> "cuda.X")."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "torch":
        return ".".join(reversed(parts))
    return None


def violations(source: str, rel: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _torch_attr(node.func)
        where = f"{rel}:{node.lineno}"
        if name in CONSTRUCTORS and not any(k.arg == "device" for k in node.keywords):
            found.append(f"{where}: torch.{name}(...) names no device")
        if name is not None and name.startswith("cuda."):
            found.append(f"{where}: torch.{name} outside megatron_nitp/device.py")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda" and not node.args:
            found.append(f"{where}: .cuda() (use .to(device()))")
    return found


def test_every_tensor_the_package_creates_names_its_device():
    found = []
    for rel, path in _modules():
        with open(path) as f:
            found += violations(f.read(), rel)
    assert not found, "tensors without a device (NCCL rejects CPU tensors):\n" + "\n".join(found)


@pytest.mark.parametrize("line, bad", [
    ("counts = torch.zeros(2, dtype=torch.float64)", True),  # defect 1 of the GPU-correct issue
    ("one = torch.ones((), dtype=torch.float64)", True),  # defect 2
    ("flag = torch.tensor([1.0])\nif torch.cuda.is_available():\n    flag = flag.cuda()", True),
    ("counts = torch.zeros(2, dtype=torch.float64, device=device())", False),
    ("pad = torch.zeros_like(states)", False),
    ("x = states.new_zeros(3)", False),
])
def test_the_guard_catches_the_defects_it_is_for(line, bad):
    assert bool(violations(line, "example.py")) == bad
