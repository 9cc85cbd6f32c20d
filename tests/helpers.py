"""Shared test helpers: paths, the tiny model's flags and run config, launch environments and
the process launchers the tests use (a test that calls one of :data:`LAUNCHERS`, directly or
through its fixtures and tests/ helpers, must be marked ``distributed``: tests/test_tiers.py)."""

import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "parallel_harness.py")


# The tiny model most CPU tests train or build (fast on CPU): 2 layers of width 32 (4 heads in 2
# query groups, MLP 64), 16 tokens, micro-batches of 2 in a global batch of 4, no warm-up. A test
# adds its NITP target layer and its own differences after it (a later flag wins).
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr-warmup-iters", "0",
]
# A quiet tiny run: no evaluation, plots, progress bar or representation geometry.
TINY_RUN = ["--eval-interval", "0", "--no-plot", "--no-progress-bar", "--geometry-interval", "0"]


def tiny_args(*extra):
    """The run config of a very small model (fast on CPU), resolved for one model replica
    (world TP x PP x CP) and a 128-token vocabulary."""
    from megatron_nitp.config import resolve
    from megatron_nitp.training.arguments import parse_args

    args = parse_args(TINY_MODEL + ["--nitp-target-layer", "1", "--train-iters", "4"]
                      + list(extra))
    world = (args.parallel.tensor_model_parallel_size * args.parallel.pipeline_model_parallel_size
             * args.parallel.context_parallel_size)
    return resolve(args, world, 128)


def write_short_documents(prefix, documents: int, max_length: int, vocab: int = 64,
                          seed: int = 0) -> str:
    """An indexed dataset (``prefix``.bin/.idx, NullTokenizer ids below ``vocab``, the last one
    EOD) of ``documents`` documents of 2 to ``max_length`` tokens, each ended by EOD: several
    documents per sample, for the document-boundary flags. Returns ``prefix``."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(documents):
        ids = np.append(rng.integers(0, vocab - 1, rng.integers(1, max_length)), vocab - 1)
        builder.add_document(ids.astype(np.uint16), [ids.size])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def free_port() -> int:
    """A free loopback port for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment for a launched job: without the in-process tests' rendezvous variables
    (they would point the job at this process's store), one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


# Variables the scripts read: a caller's values must not leak into the checks.
SCRIPT_VARS = ("NNODES", "GPUS_PER_NODE", "TP", "PP", "VPP", "EP", "MICRO_BATCH_SIZE",
               "GLOBAL_BATCH_SIZE", "TRAIN_TOKENS", "TRAIN_ITERS", "DATA_PATH", "TOKENIZER_MODEL",
               "TOKENIZER_TYPE", "VOCAB_FILE", "MERGE_FILE",
               "VOCAB_SIZE", "RUN_DIR", "CHECKPOINT_PATH", "DATA_CACHE_PATH", "TENSORBOARD_DIR",
               "SAVE_INTERVAL",
               "MODEL", "NITP_ROOT", "DRY_RUN", "TORCHRUN", "RDZV_ID", "NITP_GPU_MEMORY_GIB",
               "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS",
               "SLURM_SUBMIT_DIR")


def example_env(**extra) -> dict:
    """The environment for the example scripts (examples/): :func:`clean_env` without the
    caller's values of the variables they read."""
    env = {k: v for k, v in clean_env().items() if k not in SCRIPT_VARS}
    env.update({"PYTHON": sys.executable, **extra})
    return env


def argv_shim(folder) -> str:
    """A PYTHON for the example scripts that records the dry run's arguments (NUL-separated, to
    $NITP_ARGV_FILE) and runs the scripts' preset look-up (`python - ...`) for real."""
    path = os.path.join(str(folder), "python")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nif [ "$1" = - ]; then exec "{sys.executable}" "$@"; fi\n'
                'for a in "$@"; do printf \'%s\\0\' "$a"; done > "$NITP_ARGV_FILE"\n')
    os.chmod(path, 0o755)
    return path


def record_command(shim, folder, argv, **env) -> list:
    """The command line `bash ARGV` (an example script) runs with DRY_RUN=1, as a list: the
    entry script, its flags, then ``--dry-run --world-size N``."""
    record = os.path.join(str(folder), "argv")
    if os.path.exists(record):
        os.unlink(record)
    proc = subprocess.run(["bash", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=example_env(DRY_RUN="1", PYTHON=str(shim), NITP_ARGV_FILE=record,
                                          **env))
    assert proc.returncode == 0, (argv, proc.stderr)
    with open(record) as f:
        return f.read().split("\0")[:-1]


def load_tool(name: str):
    """``tools/<name>.py`` imported as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_command(script: str, nproc: int = 1) -> list:
    """``python SCRIPT`` for one process, ``python -m torch.distributed.run`` with ``nproc``
    processes on a free port otherwise."""
    if nproc == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), script]


def run_python_code(code: str, timeout: int, **env):
    """``python -c CODE`` in the repository root with :func:`clean_env`; the finished process."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def run_in_own_session(cmd, timeout: int, env=None, **popen):
    """Runs ``cmd`` in its own session and kills the whole process group when it is done (a
    SIGKILLed trainer leaves dist_checkpointing's helper processes orphaned with our pipes
    open). ``popen`` goes to Popen (stdout, stderr, ...); with pipes, the process's
    ``stdout``/``stderr`` attributes hold the output afterwards. Returns the finished Popen."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env() if env is None else env, text=True,
                            start_new_session=True, **popen)
    try:
        if popen.get("stdout") == subprocess.PIPE or popen.get("stderr") == subprocess.PIPE:
            proc.stdout, proc.stderr = proc.communicate(timeout=timeout)
        else:
            proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    return proc


def kill_group(proc) -> None:
    """SIGKILLs the process group of ``proc`` (started with ``start_new_session=True``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch_runs(root, nproc, runs, timeout=900):
    """One process launch of ``parallel_harness.py --runs`` that runs ``runs`` ({name: flags},
    in order) one after the other, each writing its files to ``root/name``."""
    spec = root / f"runs-{nproc}.json"
    spec.write_text(json.dumps([[str(root / name), list(flags)] for name, flags in runs.items()]))
    cmd = python_command(HARNESS, nproc) + ["--runs", str(spec)]
    # its own session: a launch that times out takes its ranks with it (none left holding a GPU)
    proc = run_in_own_session(cmd, timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def torchrun_file(path: str, nproc: int, timeout: int = 600):
    """Runs a test module as a script under torchrun with ``nproc`` processes (the module's
    ``__main__`` does the distributed part); fails the test with the job's output if it fails."""
    cmd = python_command(os.path.abspath(path), nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# The tiny model and quiet run of :func:`run_training`.
TRAIN_FLAGS = TINY_MODEL + TINY_RUN + ["--num-layers", "4", "--seq-length", "32",
                                      "--nitp-target-layer", "1", "--log-interval", "1"]


def run_training(run_dir, *flags, nproc=1, expect=0, fault=None):
    """One training job (``pretrain_gpt_nitp.py`` with :data:`TRAIN_FLAGS`, then ``flags``) in
    ``run_dir`` that must exit with ``expect``; ``fault`` KIND@ITER is injected through the test
    hook (megatron_nitp/training/faults.py)."""
    from megatron_nitp.training import faults

    env = clean_env(**({faults.ENV: fault} if fault else {}))
    cmd = python_command(os.path.join(ROOT, "pretrain_gpt_nitp.py"), nproc)
    # Output to files: a SIGKILLed trainer leaves dist_checkpointing's helper processes
    # orphaned with our pipes open; the whole group is killed once the trainer is done.
    os.makedirs(run_dir, exist_ok=True)
    out_path, err_path = f"{run_dir}.stdout", f"{run_dir}.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = run_in_own_session(cmd + TRAIN_FLAGS + ["--run-dir", str(run_dir)] + list(flags),
                                  timeout=600, env=env, stdout=out, stderr=err)
    proc.stdout, proc.stderr = open(out_path).read(), open(err_path).read()
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# Names whose use means a test starts other processes: it must be marked ``distributed``
# (tests/tiers.py reads them; tests/test_tiers.py checks the marks).
LAUNCHERS = frozenset({
    "subprocess", "Popen", "multiprocessing", "mp", "spawn", "torchrun_file", "launch_runs",
    "run_in_own_session", "run_python_code", "python_command", "kill_group",
})


def _count(named_parameters, prefix: str) -> int:
    return sum(p.numel() for name, p in named_parameters if name.startswith(prefix))


@functools.lru_cache(maxsize=None)
def measured_counts(name: str) -> dict:
    """Total and active parameters of preset ``name`` from its built megatron-core modules: the
    measurement that checks the preset table's counts (``accounting/preset_table.py``).

    Each preset is built at reduced depth - one dense layer and (for MoE) one MoE layer, with
    its real widths, experts and vocabulary - on CPU with uninitialized storage (no weights are
    computed or touched), and the counts are extrapolated to the preset's depth layer by layer:

        total  = embedding + output layer (if untied) + final norm
                 + n_dense * params(dense layer) + n_moe * params(MoE layer)
        active = total - n_moe * params(routed experts) * (1 - top_k / num_experts)
    """
    from megatron_nitp.config import preset_config, resolve
    from megatron_nitp.config.presets import get_preset, moe_layer_pattern
    from megatron_nitp.training.initialize import initialize_distributed
    from megatron_nitp.training.model import build_model

    preset = get_preset(name)
    moe = preset.get("model_type") == "moe"
    full_layers = preset["num_layers"]
    pattern = moe_layer_pattern(preset["moe_layer_freq"], full_layers) if moe else [0] * full_layers
    reduced = dict(num_layers=2 if moe else 1, nitp_target_layer=0, train_iters=1,
                   lr_warmup_iters=0, micro_batch_size=1, global_batch_size=1)
    if moe:
        reduced["moe_layer_freq"] = "[0]*1+[1]*1"
    args = resolve(preset_config(name, **reduced), 1)
    initialize_distributed()
    model = build_model(args, pre_process=True, post_process=True, perform_initialization=False)
    params = list(model.named_parameters())
    embedding = _count(params, "embedding.")
    output = _count(params, "output_layer.")
    final_norm = _count(params, "decoder.final_layernorm.")
    projector = _count(params, "projector.")
    dense_layer = _count(params, "decoder.layers.0.")
    moe_layer = _count(params, "decoder.layers.1.") if moe else 0
    routed = _count(params, "decoder.layers.1.mlp.experts.") if moe else 0
    n_moe = sum(pattern)
    n_dense = full_layers - n_moe
    total = embedding + output + final_norm + n_dense * dense_layer + n_moe * moe_layer
    inactive = 0
    if moe:
        inactive = n_moe * routed * (1 - args.moe.moe_router_topk / args.moe.num_moe_experts)
    del model
    return {
        "preset": name,
        "kind": "moe" if moe else "dense",
        "total_params": total,
        "active_params": int(round(total - inactive)),
        "projector_params": projector,
        "layers": full_layers,
        "dense_layers": n_dense,
        "moe_layers": n_moe,
        "hidden_size": args.model.hidden_size,
        "experts": f"{args.moe.num_moe_experts}+{1 if args.moe.moe_shared_expert_intermediate_size else 0}"
                   f" top-{args.moe.moe_router_topk}" if moe else "-",
        "tied_embeddings": not args.model.untie_embeddings_and_output_weights,
        "nitp_target_layer": preset["nitp_target_layer"],
        "nitp_loss_weight": preset["nitp_loss_weight"],
        "lr": preset["lr"],
        "global_batch_size": preset["global_batch_size"],
    }


def nitp_terms(output, key: str = "nitp loss"):
    """``(lm loss, loss, mask, hidden)`` of a model's ``ModelOutput``: the term logged as
    ``key`` (the paper's NITP term by default), zeros where the model has no such term."""
    import torch

    term = output.aux.get(key)
    if term is None:
        zeros = torch.zeros_like(output.lm_loss, dtype=torch.float)
        return output.lm_loss, zeros, zeros, output.hidden
    return output.lm_loss, term.loss, term.mask, output.hidden
