"""Planted bugs: a check that the tests can fail.

For each core claim of megatron-nitp this plants a known bug in a temporary copy of the
repository, runs the few tests that should catch it and records whether the suite turns red:

    .venv/bin/python tools/planted_bugs.py                 # every bug (several minutes on CPU)
    .venv/bin/python tools/planted_bugs.py --list          # the bugs, their files and tests
    .venv/bin/python tools/planted_bugs.py --fast          # the in-process subset CI runs
    .venv/bin/python tools/planted_bugs.py --only lambda-twice --only shift-0
    .venv/bin/python tools/planted_bugs.py --python /path/to/venv/bin/python

How it works:

* ``git worktree add --detach TMP HEAD``: a clean copy of the *committed* code (uncommitted
  changes of the working tree are not tested, and the working tree is never modified). The
  worktree is removed at the end (``git worktree remove --force``), also after a failure or
  Ctrl-C.
* Inside the worktree (cwd = worktree, ``PYTHONPATH`` = worktree), a check that
  ``megatron_nitp`` and ``tests`` are imported from the worktree, then the union of every
  selected bug's tests runs once, unmodified: it must pass (otherwise "caught" would mean
  nothing).
* Each bug is an exact string replacement in one file; the script fails loudly if the snippet
  is not found exactly once (the code changed: update the snippet rather than test nothing).
  Then ``python -m pytest -x -q TESTS`` runs in the worktree and the file is restored with
  ``git checkout -- FILE`` before the next bug.
* A bug is CAUGHT when pytest reports failed tests (exit status 1). Any other status (no
  tests collected, usage error, timeout) is an ERROR, never a catch. The first bug,
  ``sanity-worktree``, raises an exception carrying a marker that must appear in the output:
  proof that the tests run the worktree's code, not an installed copy.

Prints a table (bug, file, tests run, CAUGHT / MISSED / ERROR, seconds). Logs of every run are
kept in a temporary directory whose path is printed. Exit status 0 only if the unmodified
worktree passes and every selected bug is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITY_MARKER = "PLANTED-SANITY-MARKER-7f3a"
TEST_TIMEOUT_S = 1800

ACCOUNTING = "tests/test_accounting.py::test_accounting_single_process"
HAND_SHIFT = "tests/test_loss.py::test_hand_computed_shift_and_last_position"
VALIDATION = "tests/test_accounting.py::test_validation_losses_equal_a_hand_computation"
RESUME_EXACT = "tests/test_resume_exact.py"
BF16_PATH = "tests/test_loss.py::test_training_forward_computes_the_distance_in_fp32_under_bf16"
CP_MAPPING = "tests/test_shift_sharded.py::test_local_positions_equal_the_hand_written_mapping"
DEVICE_GUARD = "tests/test_device_guard.py::test_every_tensor_the_package_creates_names_its_device"


@dataclass(frozen=True)
class Bug:
    name: str
    claim: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    marker: str | None = None  # must appear in the failing output
    fast: bool = False  # in the --fast subset (CI): its tests are in-process and quick


BUGS = [
    Bug(
        "sanity-worktree",
        "the tests import the worktree's code (not /work/main's or an installed copy)",
        "megatron_nitp/nitp/loss.py",
        "    targets = shallow_states.detach() if stop_gradient else shallow_states\n",
        f"    raise RuntimeError({SANITY_MARKER!r})\n",
        (HAND_SHIFT,),
        marker=SANITY_MARKER,
        fast=True,
    ),
    Bug(
        "shift-0",
        "the target of position t is z_{t+1}, not z_t",
        "megatron_nitp/nitp/shift.py",
        "    targets = torch.cat([states[shift:], torch.zeros_like(states[:shift])], dim=0)\n",
        "    targets = torch.cat([states[:seq - shift], torch.zeros_like(states[:shift])], dim=0)\n",
        (HAND_SHIFT, ACCOUNTING),
        fast=True,
    ),
    Bug(
        "lambda-twice",
        "the NITP term is weighted by lambda once",
        "megatron_nitp/objectives/implicit.py",
        "        return self.nitp.weight_at(iteration) / self.terms\n",
        "        return self.nitp.weight_at(iteration) ** 2 / self.terms\n",
        (ACCOUNTING,),
    ),
    Bug(
        "n-nitp-as-n-ntp",
        "the NITP sum is normalized by N_nitp (positions with a target), not N_ntp",
        "megatron_nitp/training/step.py",
        "    return {o.report_key: (o.weight_at(iteration) * n_ntp / counts[1 + i].item()\n",
        "    return {o.report_key: (o.weight_at(iteration) * n_ntp / n_ntp\n",
        (ACCOUNTING,),
    ),
    Bug(
        "target-not-detached",
        "stop-gradient: no gradient flows through the layer-k target (default config)",
        "megatron_nitp/nitp/capture.py",
        "        self.state = hidden.detach() if self.detach else hidden\n",
        "        self.state = hidden\n",
        (ACCOUNTING,),
        fast=True,
    ),
    Bug(
        "routing-previous-microbatch",
        "under PP the last stage gets the layer-k target of the same micro-batch",
        "megatron_nitp/nitp/routing.py",
        "        tensor = self._share(state.detach())\n",
        "        tensor, self._last = getattr(self, '_last', None), self._share(state.detach())\n"
        "        tensor = self._last if tensor is None else tensor\n",
        ("tests/test_parallel.py::test_layout_equals_single_process[pp2-k-on-first-stage]",
         "tests/test_parallel.py::test_interleaved_layout_equals_single_process"
         "[pp2-vpp2-k-rank0-chunk0]"),
    ),
    Bug(
        "resume-without-optimizer-state",
        "resuming restores the optimizer state (exact resume)",
        "megatron_nitp/training/checkpoint/load.py",
        '    optimizer.load_state_dict(loaded["optimizer"])\n',
        '    pass  # planted: optimizer.load_state_dict(loaded["optimizer"]) dropped\n',
        ("tests/test_checkpoint.py::test_sigkill_then_resume_is_bitwise_identical",),
    ),
    Bug(
        "resume-data-position",
        "resuming continues the data where it stopped (exact resume)",
        "megatron_nitp/training/loop.py",
        '            train_iter.consumed_samples = meta["consumed_samples"]\n',
        '            pass  # planted: the consumed-sample counter is not restored\n',
        ("tests/test_checkpoint.py::test_sigkill_then_resume_is_bitwise_identical",),
    ),
    Bug(
        "cosine-sign",
        "the distance is 1 - cos, not 1 + cos",
        "megatron_nitp/nitp/loss.py",
        "        return 1.0 - F.cosine_similarity(predictions, targets, dim=-1, eps=1e-8)\n",
        "        return 1.0 + F.cosine_similarity(predictions, targets, dim=-1, eps=1e-8)\n",
        (HAND_SHIFT, ACCOUNTING),
        fast=True,
    ),
    Bug(
        "projector-gate-up-swapped",
        "the projector is W_down(silu(W_gate h) * W_up h), checked from the raw weights",
        "megatron_nitp/nitp/projector.py",
        "        out, _ = self.down(F.silu(gate) * up)\n",
        "        out, _ = self.down(F.silu(up) * gate)\n",
        (ACCOUNTING,),
        fast=True,
    ),
    Bug(
        "projector-no-silu",
        "the projector's gate goes through silu",
        "megatron_nitp/nitp/projector.py",
        "        out, _ = self.down(F.silu(gate) * up)\n",
        "        out, _ = self.down(gate * up)\n",
        (ACCOUNTING,),
        fast=True,
    ),
    Bug(
        "resume-rng-not-restored",
        "resuming restores the RNG states (dropout masks continue exactly)",
        "megatron_nitp/training/checkpoint/load.py",
        "        set_rng_state(torch.load(rank_file, weights_only=False))\n",
        "        pass  # planted: the RNG states are not restored\n",
        (RESUME_EXACT,),
        fast=True,
    ),
    Bug(
        "distance-in-bf16",
        "under bf16 the training forward computes the NITP distance in fp32",
        "megatron_nitp/nitp/loss.py",
        "    distance = token_distance(predictions.float(), targets.float(), kind)  # [L, b]\n",
        "    distance = token_distance(predictions, targets, kind)  # [L, b]\n",
        (BF16_PATH,),
        fast=True,
    ),
    Bug(
        "evaluation-in-train-mode",
        "validation runs the model in eval mode (no dropout)",
        "megatron_nitp/training/step.py",
        "        chunk.eval()\n    reports = []\n",
        "        pass\n    reports = []\n",
        (VALIDATION,),
        fast=True,
    ),
    Bug(
        "cp-chunks-swapped",
        "under CP rank r holds chunks r then 2CP-1-r (megatron-core's load-balanced split)",
        "megatron_nitp/nitp/shift.py",
        "        positions = torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])\n",
        "        positions = torch.cat([chunks[2 * cp_size - 1 - cp_rank], chunks[cp_rank]])\n",
        (CP_MAPPING,),
        fast=True,
    ),
    Bug(
        "cpu-literal-device",
        "tensors that enter collectives are made on device(), not on a CPU literal",
        "megatron_nitp/training/step.py",
        "    counts = torch.zeros(1 + len(objectives), dtype=torch.float64, device=device())\n",
        '    counts = torch.zeros(1 + len(objectives), dtype=torch.float64, device="cpu")\n',
        (DEVICE_GUARD,),
        fast=True,
    ),
    Bug(
        "rotation-ranks-by-number",
        "--save-keep-last never deletes the checkpoint just written for another run's newer one",
        "megatron_nitp/training/checkpoint/files.py",
        "    own = [i for i in _complete_iterations(root) if i <= newest]\n",
        "    own = _complete_iterations(root)\n",
        ("tests/test_checkpoint_folders.py::test_rotation_keeps_the_checkpoint_just_written_and_"
         "never_touches_newer_ones",),
        fast=True,
    ),
    Bug(
        "bin-size-unchecked",
        "a .bin whose size is not what its .idx describes is refused at start",
        "megatron_nitp/data/datasets.py",
        "        if actual != expected:\n",
        "        if False:\n",
        ("tests/test_data_checks.py::test_a_bin_of_the_wrong_size_is_refused_naming_both_sizes",),
        fast=True,
    ),
    Bug(
        "export-keeps-training-kernels",
        "export and evaluation rebuild a checkpoint's model without its GPU-only speed settings",
        "megatron_nitp/config/stored.py",
        "    config = dataclasses.replace(config, performance=PerformanceConfig())\n",
        "    config = dataclasses.replace(config)\n",
        ("tests/test_lifecycle.py::test_export_model_is_built_without_the_training_kernels",),
        fast=True,
    ),
    Bug(
        "wgrad-fusion-with-te-alone",
        "gradient-accumulation fusion is auto-on only where Apex's kernel imports",
        "megatron_nitp/config/performance.py",
        "    return k.cuda and k.apex_fused_wgrad\n",
        "    return k.cuda and (k.apex_fused_wgrad or k.te)\n",
        ("tests/test_performance.py::test_auto_fusions_follow_the_kernels",),
        fast=True,
    ),
]


def _git(*args: str, cwd: str = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True, text=True)


def _env(worktree: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = worktree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _pytest(python: str, worktree: str, tests, log_path: str) -> tuple[int, float, str]:
    """Runs ``python -m pytest -x -q TESTS`` in the worktree; (exit status, seconds, output)."""
    cmd = [python, "-m", "pytest", "-x", "-q", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=worktree, env=_env(worktree), capture_output=True,
                              text=True, timeout=TEST_TIMEOUT_S)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        rc, output = -1, (out.decode() if isinstance(out, bytes) else out) + "\nTIMEOUT\n"
    seconds = time.monotonic() - start
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + f"\n(cwd {worktree}, exit {rc}, {seconds:.1f} s)\n\n" + output)
    return rc, seconds, output


def _plant(worktree: str, bug: Bug) -> None:
    path = os.path.join(worktree, bug.file)
    with open(path) as f:
        text = f.read()
    count = text.count(bug.old)
    if count != 1:
        raise SystemExit(f"planted bug {bug.name!r}: the snippet to replace occurs {count} times "
                         f"in {bug.file} (must be exactly once; the code changed, update the "
                         f"snippet):\n{bug.old}")
    with open(path, "w") as f:
        f.write(text.replace(bug.old, bug.new))


def _restore(worktree: str, bug: Bug) -> None:
    _git("checkout", "--", bug.file, cwd=worktree)
    if _git("status", "--porcelain", "--", bug.file, cwd=worktree).stdout.strip():
        raise SystemExit(f"could not restore {bug.file} in {worktree}")


def _check_imports(python: str, worktree: str) -> None:
    """``megatron_nitp`` and ``tests`` resolve to the worktree, from the worktree's cwd."""
    code = ("import os, megatron_nitp, tests.conftest as c; "
            "print(os.path.realpath(megatron_nitp.__file__)); print(os.path.realpath(c.ROOT))")
    proc = subprocess.run([python, "-c", code], cwd=worktree, env=_env(worktree),
                          capture_output=True, text=True)
    real = os.path.realpath(worktree)
    lines = proc.stdout.split()
    if proc.returncode != 0 or len(lines) != 2 or not all(
            line.startswith(real + os.sep) or line == real for line in lines):
        raise SystemExit(f"the worktree's code is not what gets imported:\n{proc.stdout}"
                         f"{proc.stderr[-3000:]}")


def _table(rows: list[tuple[str, str, str, str, str]]) -> str:
    header = ("bug", "file", "tests run", "result", "seconds")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|-" + "-|-".join("-" * w for w in widths) + "-|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _short(test: str) -> str:
    return test.replace("tests/", "").replace("test_layout_equals_single_process", "test_layout")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="plant only this bug (repeatable)")
    parser.add_argument("--fast", action="store_true",
                        help="only the bugs whose tests are in-process and quick (CI's subset, "
                             "about 3 minutes on 2 cores)")
    parser.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"),
                        help="interpreter that runs pytest (default: <repo>/.venv/bin/python)")
    args = parser.parse_args(argv)

    if args.list:
        for bug in BUGS:
            print(f"{bug.name}{' (fast)' if bug.fast else ''}\n    claim: {bug.claim}\n"
                  f"    file:  {bug.file}\n    tests: {' '.join(bug.tests)}")
        return 0
    bugs = BUGS
    if args.only:
        unknown = sorted(set(args.only) - {b.name for b in BUGS})
        if unknown:
            parser.error(f"unknown bug(s) {unknown}; --list shows them")
        bugs = [b for b in BUGS if b.name in args.only]
    if args.fast:
        bugs = [b for b in bugs if b.fast]
    if not os.path.exists(args.python):
        parser.error(f"no interpreter at {args.python} (--python)")

    # SIGTERM -> KeyboardInterrupt, so the finally below removes the worktree.
    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in background
    started = time.monotonic()
    parent = tempfile.mkdtemp(prefix="planted-bugs-")
    worktree = os.path.join(parent, "worktree")
    logs = tempfile.mkdtemp(prefix="planted-bugs-logs-")
    head = _git("rev-parse", "HEAD").stdout.strip()
    rows, ok = [], True
    added = False
    try:
        _git("worktree", "add", "--detach", worktree, "HEAD")
        added = True
        print(f"worktree {worktree} at {head[:12]}; logs in {logs}", flush=True)
        _check_imports(args.python, worktree)
        union = list(dict.fromkeys(t for bug in bugs for t in bug.tests))
        print(f"unmodified: {len(union)} tests ...", flush=True)
        rc, seconds, _ = _pytest(args.python, worktree, union, os.path.join(logs, "unmodified.log"))
        base = "PASS" if rc == 0 else f"FAIL (exit {rc})"
        rows.append(("(none: unmodified)", "-", f"{len(union)} tests (union)", base,
                     f"{seconds:.0f}"))
        print(f"  {base} in {seconds:.0f} s", flush=True)
        if rc != 0:
            ok = False
            print(f"the unmodified worktree fails its tests: see {logs}/unmodified.log; "
                  "no bug is planted", flush=True)
        else:
            for bug in bugs:
                _plant(worktree, bug)
                try:
                    print(f"{bug.name}: {bug.file} ...", flush=True)
                    log = os.path.join(logs, f"{bug.name}.log")
                    rc, seconds, output = _pytest(args.python, worktree, bug.tests, log)
                finally:
                    _restore(worktree, bug)
                if rc == 1 and (bug.marker is None or bug.marker in output):
                    result = "CAUGHT"
                elif rc == 0:
                    result = "MISSED"
                else:
                    result = f"ERROR (exit {rc})"
                ok = ok and result == "CAUGHT"
                rows.append((bug.name, bug.file, ", ".join(_short(t) for t in bug.tests), result,
                             f"{seconds:.0f}"))
                print(f"  {result} in {seconds:.0f} s ({log})", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        ok = False
    finally:
        if added:
            _git("worktree", "remove", "--force", worktree, check=False)
        _git("worktree", "prune", check=False)
        shutil.rmtree(parent, ignore_errors=True)
    print()
    print(_table(rows))
    caught = sum(r[3] == "CAUGHT" for r in rows)
    print(f"\n{caught}/{len(bugs)} planted bugs caught, commit {head[:12]}, "
          f"{time.monotonic() - started:.0f} s in all; logs: {logs}")
    return 0 if ok and caught == len(bugs) else 1


if __name__ == "__main__":
    sys.exit(main())
