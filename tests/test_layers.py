"""One direction of imports: the package's layers (``docs/design.md``, "Layers") and the check
that holds the code to them.

Every module of ``megatron_nitp`` is parsed with ``ast`` (nothing is imported, so the test is
fast and needs no torch) and every import of a ``megatron_nitp`` module is read, at module level
and inside functions alike: a lazy import still makes the importer depend on what it imports
(it only runs later), and it is where back-imports hide. An import of ``a.b.c`` also runs the
packages ``a.b`` and ``a`` first, so it counts as an import of them too, except of the
importer's own packages (being imported already). Two rules:

- no import cycle among the modules;
- no import from a lower layer into a higher one (a module imports its own layer or lower).

A new module must be given a layer in :data:`LAYERS`; a failure names the module, the line and
the rule it breaks.
"""

import ast
import os

from tests.helpers import ROOT

PACKAGE = "megatron_nitp"

#: The layers, lowest first. ``name`` is one module; ``name.*`` a package and all it holds.
LAYERS = (
    ("base", (
        "megatron_nitp",              # the package itself: the CPU patches, the device
        "megatron_nitp.device",       # the one device helper
        "megatron_nitp.kernels",      # which fast kernels this process has
        "megatron_nitp.compat.*",     # patches for what a machine lacks
        "megatron_nitp.layout",       # pipeline layout arithmetic
        "megatron_nitp.geometry",     # effective rank, pairwise cosine
        "megatron_nitp.cli",          # the command-line parser of the entry scripts and tools
    )),
    ("nitp", ("megatron_nitp.nitp.*",)),    # the method: knows no run settings
    ("config", ("megatron_nitp.config.*",)),  # settings, checks, presets
    ("data", ("megatron_nitp.data.*",)),
    ("objectives", ("megatron_nitp.objectives.*",)),  # auxiliary terms: what the model computes
    ("accounting", ("megatron_nitp.accounting.*",)),  # counts a job without running it
    ("models", ("megatron_nitp.models.*",)),
    ("training", ("megatron_nitp.training.*",)),
    ("applications", (
        "megatron_nitp.evaluation",
        "megatron_nitp.hf",
        "megatron_nitp.export",
        "megatron_nitp.megatron_lm",
    )),
)

#: Imports that break a rule and are known: (importer, imported) -> why it stays for now. Empty:
#: every entry is a debt; the test fails on any import not listed here.
ALLOWED = {}


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for folder, dirs, files in os.walk(os.path.join(ROOT, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


def _packages_of(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: str, modules: dict) -> list[tuple[str, int]]:
    """(imported module, line) for every import of a package module in ``name``, lazy ones
    too, with the packages each one runs first."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        for target in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            while target not in modules:
                target = target.rsplit(".", 1)[0]
            own = set(_packages_of(name))
            for each in _packages_of(target) + [target]:
                if each not in own and each != name:
                    out.append((each, node.lineno))
    return out


def _layer(name: str) -> int | None:
    best, best_length = None, -1
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            package = member.endswith(".*")
            stem = member[:-2] if package else member
            inside = name == stem or (package and name.startswith(stem + "."))
            if inside and len(stem) > best_length:
                best, best_length = index, len(stem)
    return best


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def _where(modules: dict, name: str, line: int) -> str:
    return f"{os.path.relpath(modules[name], ROOT)}:{line}"


def test_every_module_has_a_layer():
    unplaced = [name for name in _modules() if _layer(name) is None]
    assert not unplaced, (f"modules with no layer: {', '.join(unplaced)}; add each to LAYERS "
                          "here and to docs/design.md's Layers")


def test_no_import_runs_up_the_layers():
    modules, graph = _graph()
    broken = {}  # (importer, line) -> the deepest module it imports there against the order
    for name, imports in graph.items():
        own = _layer(name)
        for target, line in imports:
            theirs = _layer(target)
            if (theirs is not None and own is not None and theirs > own
                    and (name, target) not in ALLOWED
                    and len(target) > len(broken.get((name, line), ""))):
                broken[name, line] = target
    described = [f"{_where(modules, name, line)}: {name} ({LAYERS[_layer(name)][0]}) imports "
                 f"{target} ({LAYERS[_layer(target)][0]}): a layer imports only its own and "
                 "lower layers" for (name, line), target in sorted(broken.items())]
    assert not described, "\n".join(described)


def _cycles(graph: dict) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    edges = {name: sorted({t for t, _ in imports if t in graph and (name, t) not in ALLOWED})
             for name, imports in graph.items()}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle():
    modules, graph = _graph()
    described = []
    for component in _cycles(graph):
        members = set(component)
        ties = sorted({f"  {_where(modules, name, line)}: {name} imports {target}"
                       for name in component for target, line in graph[name]
                       if target in members and (name, target) not in ALLOWED})
        described.append(f"import cycle among {', '.join(component)}:\n" + "\n".join(ties))
    assert not described, "\n".join(described)


def test_the_check_sees_lazy_imports_and_relative_ones(tmp_path):
    """The reader itself: a function-level import and a relative one are both edges."""
    path = tmp_path / "mod.py"
    path.write_text("from .sibling import x\n\n"
                    "def f():\n    from megatron_nitp.training import loop\n")
    modules = {"megatron_nitp.config.mod": str(path), "megatron_nitp.config.sibling": "",
               "megatron_nitp.training": "", "megatron_nitp.training.loop": ""}
    found = _imports("megatron_nitp.config.mod", str(path), modules)
    assert ("megatron_nitp.config.sibling", 1) in found
    assert ("megatron_nitp.training.loop", 4) in found and ("megatron_nitp.training", 4) in found


# ------------------------------------------------------------------------------- the tests

def _test_modules_imported(path: str) -> list[tuple[str, int]]:
    """(test module, line) for every import of a ``tests/test_*.py`` module in ``path``: as
    ``tests.test_x``, ``test_x`` or ``from tests import test_x``."""
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"tests.{a.name}" for a in node.names]
                                     if node.module == "tests" else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            module = parts[1] if parts[0] == "tests" and len(parts) > 1 else parts[0]
            if module.startswith("test_"):
                found.append((module, node.lineno))
    return found


def test_no_test_module_imports_another():
    """What tests share lives in tests/helpers.py (or another module not named ``test_*``): a
    test module imports no other test module, so each reads on its own and no test's privates
    become another's interface."""
    folder = os.path.join(ROOT, "tests")
    bad = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            bad += [f"tests/{name}:{line} imports {module}"
                    for module, line in _test_modules_imported(os.path.join(folder, name))]
    assert not bad, "\n".join(bad)


def test_the_test_import_check_sees_every_spelling(tmp_path):
    path = tmp_path / "test_x.py"
    path.write_text("import os\nfrom tests.helpers import ROOT\nfrom tests.test_a import f\n"
                    "def g():\n    import test_b\n    from tests import test_c, helpers\n")
    assert _test_modules_imported(str(path)) == [("test_a", 3), ("test_b", 5), ("test_c", 6)]
