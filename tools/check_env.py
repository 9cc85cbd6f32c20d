"""Checks the environment a job will run in, then trains a tiny model for one iteration.

    python tools/check_env.py                 # versions, layer spec, one-iteration tiny run
    python tools/check_env.py --no-run        # versions and layer spec only
    python tools/check_env.py -- --bf16       # flags after -- go to the tiny run

Prints the versions of Python, torch, CUDA, NCCL, Transformer Engine, Apex and megatron-core,
which layer spec the model will use (Transformer Engine's modules with TE and CUDA, otherwise
megatron-core's local ones) and the execution path (NCCL on GPU; gloo with the CPU
compatibility patches on CPU), then runs ``pretrain_gpt_nitp.py``'s training for one iteration
of the tiny preset in this process (no checkpoint, no plot). Exits 1 if the run fails. It is the
default command of the Docker image.
"""

import platform
import sys
import tempfile
import time
import traceback

import megatron_nitp  # (before any megatron import: CPU import stubs)
from megatron_nitp.cli import ArgumentParser

import torch

TINY_RUN = ["--preset", "tiny-dense", "--train-iters", "1", "--lr-warmup-iters", "0",
            "--eval-interval", "0", "--log-interval", "1", "--geometry-interval", "0",
            "--no-save", "--no-plot", "--no-progress-bar"]


def _distribution_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _module_version(module: str, *distributions: str) -> str:
    """The version of an importable module, 'not installed', or the import error."""
    try:
        imported = __import__(module)
    except ImportError:
        return "not installed"
    except Exception as err:  # a broken install (e.g. TE built for another torch)
        return f"installed but fails to import: {type(err).__name__}: {err}"
    return (getattr(imported, "__version__", None) or _distribution_version(*distributions)
            or "installed (version unknown)")


def versions() -> list[tuple[str, str]]:
    """(name, version or state) of everything the training path depends on."""
    cuda = torch.cuda.is_available()
    if cuda:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        cuda_text = f"{torch.version.cuda}, {torch.cuda.device_count()} x {', '.join(names)}"
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    else:
        built = torch.version.cuda
        cuda_text = ("not available (CPU build of torch)" if built is None
                     else f"built for {built}, but no GPU is visible")
        nccl = "- (no CUDA)"
    from megatron.core import package_info

    return [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("CUDA", cuda_text),
        ("NCCL", nccl),
        ("Transformer Engine", _module_version("transformer_engine", "transformer_engine",
                                               "transformer-engine")),
        ("Apex", _module_version("apex", "apex")),
        ("megatron-core", package_info.__version__),
        ("megatron-nitp", megatron_nitp.__version__),
    ]


def execution_path() -> list[tuple[str, str]]:
    """The layer spec and the distributed path the training code will take here."""
    from megatron_nitp import compat, kernels
    from megatron_nitp.device import has_cuda

    if kernels.use_transformer_engine():
        spec = "Transformer Engine (megatron-core's TE layer spec)"
    else:
        why = "no CUDA" if not has_cuda() else "Transformer Engine not importable"
        spec = f"local (megatron-core's own modules: {why})"
        if has_cuda():
            spec += (", fused masked softmax" if kernels.fused_softmax_available()
                     else ", unfused softmax (Apex's softmax kernels not importable)")
    env = compat.environment()
    patches = [p.name for p in compat.select(env.cuda, env.te, env.apex, env.mcore)]
    path = "GPU: NCCL" if has_cuda() else "CPU: gloo"
    path += (f", compatibility patches: {', '.join(patches)}" if patches
             else ", megatron-core unpatched")
    return [("layer spec", spec), ("path", path)]


def _print_rows(rows: list[tuple[str, str]]) -> None:
    for name, value in rows:
        print(f"  {name:<20} {value}")


def tiny_run(extra: list[str]) -> bool:
    """One training iteration of the tiny model in this process; True if it worked."""
    from megatron_nitp import compat
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.initialize import destroy_distributed
    from megatron_nitp.training.loop import pretrain

    with tempfile.TemporaryDirectory(prefix="nitp-check-env-") as run_dir:
        flags = TINY_RUN + ["--run-dir", run_dir] + extra
        print(f"\ntiny run: python pretrain_gpt_nitp.py {' '.join(flags)}", flush=True)
        start = time.perf_counter()
        try:
            summary = pretrain(parse_args(flags))
            backend = torch.distributed.get_backend()
        except (Exception, SystemExit) as err:
            traceback.print_exc()
            print(f"\ncheck_env: FAILED: the tiny run raised {type(err).__name__}: {err}",
                  flush=True)
            return False
        finally:
            if torch.distributed.is_initialized():
                destroy_distributed()
    loss = summary.get("lm loss")
    ok = loss is not None and loss == loss  # not NaN
    state = "OK" if ok else "FAILED (no finite lm loss)"
    patches = "CPU compatibility patches applied" if compat.is_applied() else "no patches"
    nitp = summary.get("nitp loss")
    losses = f"lm loss {loss:.4f}" + (f", nitp loss {nitp:.4f}" if nitp is not None else "")
    print(f"check_env: tiny run {state}: {losses}, "
          f"{time.perf_counter() - start:.1f} s (backend {backend}, {patches})", flush=True)
    return ok


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-run", action="store_true", help="versions and layer spec only")
    parser.add_argument("extra", nargs="*", help="after --: flags for the tiny run")
    args = parser.parse_args(argv)
    print("megatron-nitp environment check")
    _print_rows(versions())
    _print_rows(execution_path())
    sys.stdout.flush()
    if args.no_run:
        return 0
    return 0 if tiny_run(args.extra) else 1


if __name__ == "__main__":
    sys.exit(main())
