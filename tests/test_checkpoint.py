"""Checkpoints that survive: exact resume after SIGKILL, a crash mid-save, corruption, SIGTERM,
NaN policies, config mismatches, and resharding across layouts."""

import json
import os
import signal

import pytest

from tests.helpers import TRAIN_FLAGS, run_training

def _history(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        history = json.load(f)["history"]
    return {key: dict((int(i), v) for i, v in points) for key, points in history.items()}


def _latest(ckpt):
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    run_training(root / "full", "--train-iters", "6", "--save-interval", "2")
    return root, _history(root / "full")


@pytest.mark.distributed
def test_fresh_saves_do_not_warn_about_overwriting(uninterrupted):
    """Each iteration folder is empty when dist_checkpointing writes into it (the RNG files
    come after the shards), so megatron-core's "Overwriting old incomplete / corrupted
    checkpoint..." warning never shows on a fresh save; the files are all in the manifest."""
    root, _ = uninterrupted
    out = open(f"{root / 'full'}.stdout").read()
    err = open(f"{root / 'full'}.stderr").read()
    assert out.count("> saved checkpoint") == 3  # iterations 2 and 4, and the final one
    assert "Overwriting" not in out + err
    for iteration in (2, 4, 6):
        folder = root / "full" / "checkpoints" / f"iter_{iteration:07d}"
        with open(folder / "manifest.json") as f:
            manifest = json.load(f)
        assert "rng/rank_00000.pt" in manifest and "nitp.json" in manifest
        assert any(name.endswith(".distcp") for name in manifest)


@pytest.mark.distributed
@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(uninterrupted):
    root, full = uninterrupted
    killed = root / "killed"
    proc = run_training(killed, "--train-iters", "6", "--save-interval", "2",
                        fault="sigkill@5", expect=-signal.SIGKILL)
    assert "saved checkpoint" in proc.stdout
    assert _latest(killed / "checkpoints") == 4
    resumed = root / "resumed"
    proc = run_training(resumed, "--train-iters", "6", "--load", str(killed / "checkpoints"),
                        "--save", str(killed / "checkpoints"))
    assert "resumed from" in proc.stdout and "at iteration 4" in proc.stdout
    got = _history(resumed)
    assert sorted(got["lm loss"]) == [5, 6]
    for key in ("lm loss", "nitp loss", "grad norm"):
        for it in (5, 6):
            assert got[key][it] == full[key][it], (key, it)  # bitwise on CPU fp32


@pytest.mark.distributed
@pytest.mark.slow
def test_crash_during_save_leaves_previous_checkpoint_loadable(uninterrupted, tmp_path):
    root, full = uninterrupted
    run = tmp_path / "crash"
    run_training(run, "--train-iters", "6", "--save-interval", "2", fault="crash-in-save@4",
                 expect=17)
    ckpt = run / "checkpoints"
    assert _latest(ckpt) == 2
    assert (ckpt / "iter_0000004").is_dir()
    assert not (ckpt / "iter_0000004" / "manifest.json").exists()
    resumed = tmp_path / "after-crash"
    run_training(resumed, "--train-iters", "4", "--load", str(ckpt), "--no-save",
                 "--use-checkpoint-opt_param-scheduler")
    got = _history(resumed)
    assert got["lm loss"][3] == full["lm loss"][3] and got["lm loss"][4] == full["lm loss"][4]


@pytest.mark.distributed
@pytest.mark.slow
def test_corrupted_checkpoint_is_named_and_fallback_loads_the_previous(uninterrupted, tmp_path):
    import shutil

    root, full = uninterrupted
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "full" / "checkpoints", ckpt)
    assert _latest(ckpt) == 6
    victim = sorted(p for p in (ckpt / "iter_0000006").rglob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_training(tmp_path / "bad", "--train-iters", "6", "--load", str(ckpt), "--no-save",
                        expect=1)
    assert "corrupted (CRC32 mismatch)" in proc.stderr and victim.name in proc.stderr
    proc = run_training(tmp_path / "fallback", "--train-iters", "5", "--load", str(ckpt),
                        "--load-fallback", "--no-save", "--use-checkpoint-opt_param-scheduler")
    assert "falling back to" in proc.stdout
    assert _history(tmp_path / "fallback")["lm loss"][5] == full["lm loss"][5]
    victim.unlink()
    proc = run_training(tmp_path / "missing", "--train-iters", "6", "--load", str(ckpt),
                        "--no-save", expect=1)
    assert "checkpoint file missing" in proc.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_75(uninterrupted, tmp_path):
    root, full = uninterrupted
    run = tmp_path / "term"
    proc = run_training(run, "--train-iters", "6", fault="sigterm@3", expect=75)
    assert "> exit after iteration 3: SIGTERM (on this or another rank); saved checkpoint" \
        in proc.stdout
    assert _latest(run / "checkpoints") == 3
    run_training(tmp_path / "after-term", "--train-iters", "6", "--load", str(run / "checkpoints"),
                 "--no-save")
    got = _history(tmp_path / "after-term")
    assert [got["lm loss"][i] for i in (4, 5, 6)] == [full["lm loss"][i] for i in (4, 5, 6)]


def _weights_at(dist_ckpt, iteration, tmp_path):
    """The model state of one checkpoint iteration, loaded in-process."""
    import shutil

    from megatron_nitp.config import resolve
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.checkpoint import load_model_weights
    from megatron_nitp.training.initialize import set_seed
    from megatron_nitp.training.model import build_model

    root = tmp_path / f"only-{iteration}"
    shutil.copytree(dist_ckpt / f"iter_{iteration:07d}", root / f"iter_{iteration:07d}")
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    args = resolve(parse_args(TRAIN_FLAGS + ["--train-iters", "3"]), 1, 4096)
    set_seed(99)
    model = build_model(args, pre_process=True, post_process=True)
    load_model_weights(str(root), model)
    return {k: v.clone() for k, v in model.state_dict().items() if v is not None and "extra" not in k}


@pytest.mark.distributed
@pytest.mark.slow
def test_nan_skip_policy_never_updates_the_weights(dist, tmp_path):
    import torch

    run = tmp_path / "nan"
    run_training(run, "--train-iters", "3", "--save-interval", "1", fault="nan-grad@2")
    got = _history(run)
    assert got["skipped"] == {1: 0.0, 2: 1.0, 3: 0.0}
    assert all(torch.isfinite(torch.tensor(v)) for v in got["lm loss"].values())
    ckpt = run / "checkpoints"
    one, two, three = (_weights_at(ckpt, i, tmp_path) for i in (1, 2, 3))
    assert one.keys() == two.keys()
    for key in one:  # the NaN step changed nothing ...
        assert torch.equal(one[key], two[key]), key
    # ... and the next step trained normally, with finite weights
    assert any(not torch.equal(two[k], three[k]) for k in two)
    assert all(torch.isfinite(v).all() for v in three.values() if v.is_floating_point())


@pytest.mark.distributed
@pytest.mark.slow
def test_nan_stop_policy_writes_diagnostics_and_exits_3(tmp_path):
    run = tmp_path / "stop"
    proc = run_training(run, "--train-iters", "4", "--save-interval", "1", "--nan-policy", "stop",
                        fault="nan-loss@3", expect=3)
    assert "non-finite values at iteration 3" in proc.stdout
    diag = json.load(open(run / "non_finite_iter_0000003.json"))
    assert diag["non_finite"] == "loss"
    assert _latest(run / "checkpoints") == 2
    run_training(tmp_path / "after-stop", "--train-iters", "3", "--load", str(run / "checkpoints"),
                 "--no-save", "--use-checkpoint-opt_param-scheduler")


@pytest.mark.distributed
def test_mismatched_checkpoint_lists_the_fields(uninterrupted, tmp_path):
    root, _ = uninterrupted
    ckpt = root / "full" / "checkpoints"
    proc = run_training(tmp_path / "mismatch", "--train-iters", "7", "--load", str(ckpt),
                        "--no-save", "--nitp-target-layer", "2", expect=1)
    assert "nitp.target_layer: checkpoint 1, this run 2" in proc.stderr
    assert "--override-config" in proc.stderr
    proc = run_training(tmp_path / "override", "--train-iters", "7", "--load", str(ckpt),
                        "--no-save", "--nitp-target-layer", "2", "--override-config",
                        "--use-checkpoint-opt_param-scheduler")
    assert "resumed from" in proc.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("first,second", [
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], []),
    ([], ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    ([], ["DP2"]),
])
@pytest.mark.slow
def test_resharding_resumes_with_the_same_next_iteration(uninterrupted, tmp_path, first, second):
    root, full = uninterrupted
    init = root / "full" / "checkpoints"

    def nproc(flags):
        if flags == ["DP2"]:
            return 2, []
        return (4 if flags else 1), flags

    n1, f1 = nproc(first)
    n2, f2 = nproc(second)
    # both halves start from the uninterrupted run's iteration-2 weights and optimizer state
    ckpt = tmp_path / "ckpt"
    import shutil

    os.makedirs(ckpt)
    shutil.copytree(init / "iter_0000002", ckpt / "iter_0000002")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    run_training(tmp_path / "a", "--train-iters", "3", "--load", str(ckpt), "--save", str(ckpt),
                 *f1, "--use-checkpoint-opt_param-scheduler", nproc=n1)
    assert _latest(ckpt) == 3
    run_training(tmp_path / "b", "--train-iters", "4", "--load", str(ckpt), "--no-save", *f2,
                 "--use-checkpoint-opt_param-scheduler", nproc=n2)
    a, b = _history(tmp_path / "a"), _history(tmp_path / "b")
    for key in ("lm loss", "nitp loss", "grad norm"):
        assert a[key][3] == pytest.approx(full[key][3], rel=1e-5), key
        assert b[key][4] == pytest.approx(full[key][4], rel=1e-5), key


@pytest.mark.distributed
@pytest.mark.slow
def test_distributed_optimizer_checkpoint_resumes_exactly(tmp_path):
    """Two iterations after the resume: the first only sees the restored weights, the second
    also the restored optimizer step (torch Adam's per-parameter "step" must not come back as
    one shared counter, see compat.te.patch_distributed_optimizer_shared_step)."""
    import shutil

    flags = ["--use-distributed-optimizer"]
    run_training(tmp_path / "full", "--train-iters", "4", "--save", str(tmp_path / "ckpt"),
                 "--save-interval", "2", *flags, nproc=2)
    # The same run stopped after iteration 2 (same schedule): its checkpoint alone, as latest.
    shutil.copytree(tmp_path / "ckpt" / "iter_0000002", tmp_path / "at2" / "iter_0000002")
    (tmp_path / "at2" / "latest_checkpointed_iteration.txt").write_text("2")
    run_training(tmp_path / "second", "--train-iters", "4", "--load", str(tmp_path / "at2"),
                 "--no-save", *flags, nproc=2)
    full, second = _history(tmp_path / "full"), _history(tmp_path / "second")
    for key in ("lm loss", "nitp loss", "grad norm"):
        for it in (3, 4):
            assert second[key][it] == full[key][it], (key, it)



def test_adam_state_is_materialized_for_torch_adam_only():
    import types

    import torch

    from megatron_nitp.training.checkpoint.state import materialize_adam_state

    class FusedAdamStandIn(torch.optim.Optimizer):
        """Like TE's and Apex's FusedAdam: a torch Optimizer that is not torch's Adam, whose
        per-parameter state must not gain a "step" (their state_dict() raises KeyError)."""

        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3})

        def step(self, closure=None):
            pass

    def wrapped(cls):  # megatron's optimizer wrappers keep the torch one in .optimizer
        param = torch.nn.Parameter(torch.ones(3))
        return types.SimpleNamespace(optimizer=cls([param])), param

    fused, fused_param = wrapped(FusedAdamStandIn)
    adamw, adamw_param = wrapped(torch.optim.AdamW)
    adam, adam_param = wrapped(torch.optim.Adam)
    # a ChainedOptimizer's sub-optimizers, each handled by its own kind
    materialize_adam_state(types.SimpleNamespace(chained_optimizers=[fused, adamw]))
    materialize_adam_state(adam)
    assert len(fused.optimizer.state[fused_param]) == 0
    for inner, param in ((adamw.optimizer, adamw_param), (adam.optimizer, adam_param)):
        state = inner.state[param]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(state["step"]) == 0.0 and not state["exp_avg"].any()
    # a torch Adam that has stepped keeps its state
    stepped, param = wrapped(torch.optim.AdamW)
    param.grad = torch.ones(3)
    stepped.optimizer.step()
    before = stepped.optimizer.state[param]["exp_avg"].clone()
    materialize_adam_state(stepped)
    assert torch.equal(stepped.optimizer.state[param]["exp_avg"], before)
    assert float(stepped.optimizer.state[param]["step"]) == 1.0


def _reread(folder):
    """What the old rank-0 re-read of the whole checkpoint gave: every file's size and CRC32."""
    import zlib

    out = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(file.relative_to(folder))
        if rel != "manifest.json":
            data = file.read_bytes()
            out[rel] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    return out


def test_verification_shares_are_disjoint_and_balanced():
    from megatron_nitp.training.checkpoint.files import _share

    manifest = {f"f{i}": {"bytes": b} for i, b in enumerate([100, 90, 50, 40, 30, 5, 5, 1])}
    for world in (1, 2, 3, 4):
        shares = [_share(manifest, r, world) for r in range(world)]
        assert sorted(sum(shares, [])) == sorted(manifest)  # every file, once
        loads = [sum(manifest[f]["bytes"] for f in s) for s in shares]
        assert max(loads) - min(loads) <= max(m["bytes"] for m in manifest.values())



def test_nitp_json_stores_the_config_once_and_older_forms_still_load():
    """A checkpoint's nitp.json stores the run config once ("config"): the model and NITP
    settings a load compares are computed from it, equal to what older checkpoints stored in
    their "model" and "nitp" sections, so both forms compare (and rebuild) alike; a changed
    setting is named."""
    import dataclasses

    from megatron_nitp.config.stored import config_from_meta
    from megatron_nitp.training.checkpoint.files import CheckpointError
    from megatron_nitp.training.checkpoint.meta import (build_meta, check_compatible,
                                                        model_meta, saved_model, saved_nitp)
    from tests.helpers import tiny_args

    args = tiny_args()
    meta = json.loads(json.dumps(build_meta(3, 12, 1, args, "model_space")))
    assert set(meta) == {"iteration", "consumed_samples", "world_size", "layout",
                         "optimizer_format", "config"}
    assert saved_model(meta) == model_meta(args)
    assert saved_nitp(meta) == dataclasses.asdict(args.nitp_config)
    assert check_compatible(meta, args) == []
    flat = args.flat()
    export = {k: flat[k] for k in ("seq_length", "max_position_embeddings", "rotary_base",
                                   "norm_epsilon", "vocab_size", "tokenizer_type",
                                   "tokenizer_model", "moe_layer_freq")}
    sections = {"model": model_meta(args), "nitp": dataclasses.asdict(args.nitp_config),
                "export": export}
    older = {**meta, **sections}  # the config and its three other copies
    oldest = {k: v for k, v in older.items() if k != "config"}  # before the stored config
    for stored in (older, oldest):
        assert check_compatible(stored, args) == []
        rebuilt = config_from_meta(stored)
        assert rebuilt.model.hidden_size == args.model.hidden_size
        assert rebuilt.derived.padded_vocab_size == args.derived.padded_vocab_size
    assert config_from_meta(meta).derived.padded_vocab_size == args.derived.padded_vocab_size
    changed = json.loads(json.dumps(meta))
    changed["config"]["model"]["hidden_size"] *= 2
    with pytest.raises(CheckpointError, match="model.hidden_size: checkpoint 64, this run 32"):
        check_compatible(changed, args)

@pytest.mark.distributed
def test_no_load_optim_resumes_the_weights_with_a_fresh_optimizer(uninterrupted, tmp_path):
    """Megatron-LM's --no-load-optim --no-load-rng on the uninterrupted run's iteration 4:
    iteration 5 runs on the same weights and batch (the same lm loss) at the schedule's
    learning rate, and iteration 6 differs (a fresh Adam's first update is not the continued
    one's)."""
    import shutil

    root, full = uninterrupted
    ckpt = root / "full" / "checkpoints"
    shutil.copytree(ckpt / "iter_0000004", tmp_path / "at4" / "iter_0000004")
    (tmp_path / "at4" / "latest_checkpointed_iteration.txt").write_text("4")
    proc = run_training(tmp_path / "fresh", "--train-iters", "6", "--load",
                        str(tmp_path / "at4"), "--no-save", "--no-load-optim", "--no-load-rng")
    assert "at iteration 4" in proc.stdout and "--no-load-optim: the optimizer starts fresh" \
        in proc.stdout and "--no-load-rng" in proc.stdout
    got = _history(tmp_path / "fresh")
    assert sorted(got["lm loss"]) == [5, 6]
    assert got["lm loss"][5] == full["lm loss"][5]  # bitwise: the weights were loaded
    assert got["learning rate"] == {5: full["learning rate"][5], 6: full["learning rate"][6]}
    assert got["lm loss"][6] != full["lm loss"][6]


@pytest.mark.distributed
def test_no_load_optim_and_no_load_rng_leave_those_states_alone(dist, uninterrupted,
                                                                monkeypatch):
    """In-process set-up from the uninterrupted run's last checkpoint: a plain resume restores
    Adam's moments and the RNG states, --no-load-optim neither the moments (the scheduler is
    at the checkpoint's iteration all the same), --no-load-rng not the RNG states."""
    from megatron_nitp.training import loop
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.checkpoint import load as load_module

    from tests.helpers import TRAIN_FLAGS

    root, _ = uninterrupted
    restored = []
    set_rng_state = load_module.set_rng_state
    monkeypatch.setattr(load_module, "set_rng_state",
                        lambda state: (restored.append(1), set_rng_state(state)))
    base = TRAIN_FLAGS + ["--train-iters", "6", "--load", str(root / "full" / "checkpoints"),
                          "--no-save"]
    runs = {}
    for name, flags in (("plain", []), ("no-optim", ["--no-load-optim"]),
                        ("no-rng", ["--no-load-rng"])):
        restored.clear()
        run = loop.setup(parse_args(base + flags))
        moments = sum(len(s) for s in run.optimizer.optimizer.state.values())
        runs[name] = (run.start_iteration, run.scheduler.num_steps, moments, len(restored))
    assert runs["plain"][:2] == runs["no-optim"][:2] == runs["no-rng"][:2]
    assert runs["plain"][0] == 6
    assert runs["plain"][2] > 0 and runs["no-optim"][2] == 0 and runs["no-rng"][2] > 0
    assert (runs["plain"][3], runs["no-optim"][3], runs["no-rng"][3]) == (1, 1, 0)


@pytest.mark.distributed
@pytest.mark.slow
def test_async_save_resume_is_bitwise_identical(uninterrupted, tmp_path):
    """--async-save changes nothing in training and its checkpoint resumes exactly like the
    synchronous one (the reference: the uninterrupted synchronous run)."""
    import shutil

    root, full = uninterrupted
    run = tmp_path / "async"
    proc = run_training(run, "--train-iters", "6", "--save-interval", "2", "--async-save")
    assert "saving checkpoint" in proc.stdout and "checkpoint complete" in proc.stdout
    got = _history(run)
    for key in ("lm loss", "nitp loss", "grad norm"):
        assert got[key] == full[key], key
    ckpt = run / "checkpoints"
    assert _latest(ckpt) == 6
    for iteration in (2, 4, 6):
        folder = ckpt / f"iter_{iteration:07d}"
        assert json.load(open(folder / "manifest.json")) == _reread(folder)
    shutil.copytree(ckpt / "iter_0000004", tmp_path / "at4" / "iter_0000004")
    (tmp_path / "at4" / "latest_checkpointed_iteration.txt").write_text("4")
    run_training(tmp_path / "resumed", "--train-iters", "6", "--load", str(tmp_path / "at4"),
                 "--no-save")
    resumed = _history(tmp_path / "resumed")
    for key in ("lm loss", "nitp loss", "grad norm"):
        for it in (5, 6):
            assert resumed[key][it] == full[key][it], (key, it)  # bitwise on CPU fp32


@pytest.mark.distributed
@pytest.mark.slow
def test_sigkill_during_async_write_leaves_previous_checkpoint_latest(uninterrupted, tmp_path):
    """The writer of iteration 4 stalls mid-file; training goes on (iteration 5 runs) and the
    process is SIGKILLed at iteration 6: the iteration-4 checkpoint never became latest, the
    iteration-2 one resumes exactly."""
    root, full = uninterrupted
    run = tmp_path / "killed"
    proc = run_training(run, "--train-iters", "6", "--save-interval", "2", "--async-save",
                        fault="stall-async-write@4,sigkill@6", expect=-signal.SIGKILL)
    assert "iteration        5/" in proc.stdout  # not blocked by the write in flight
    assert "checkpoint complete" in proc.stdout and "iter_0000004" not in proc.stdout.split(
        "checkpoint complete")[-1].splitlines()[0]
    ckpt = run / "checkpoints"
    assert _latest(ckpt) == 2
    assert not (ckpt / "iter_0000004" / "manifest.json").exists()
    resumed = tmp_path / "resumed"
    proc = run_training(resumed, "--train-iters", "4", "--load", str(ckpt), "--no-save",
                        "--use-checkpoint-opt_param-scheduler")
    assert "at iteration 2" in proc.stdout
    got = _history(resumed)
    for key in ("lm loss", "nitp loss", "grad norm"):
        for it in (3, 4):
            assert got[key][it] == full[key][it], (key, it)


@pytest.mark.distributed
@pytest.mark.slow
def test_per_rank_checksums_make_the_full_manifest_and_ranks_share_verification(tmp_path):
    """DP 2: each rank checksums the files it wrote; the gathered manifest equals a full
    re-read. At load the two ranks each verify part of the files and agree on the verdict."""
    run = tmp_path / "dp2"
    run_training(run, "--train-iters", "2", "--save-interval", "1", "--async-save", nproc=2)
    ckpt = run / "checkpoints"
    for iteration in (1, 2):
        folder = ckpt / f"iter_{iteration:07d}"
        manifest = json.load(open(folder / "manifest.json"))
        assert manifest == _reread(folder)
        assert {"rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(manifest)
        # both ranks wrote shards (the DP replicas share the writing)
        assert any(n.startswith("__0_") for n in manifest)
        assert any(n.startswith("__1_") for n in manifest)
    victim = max((ckpt / "iter_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_training(tmp_path / "bad", "--train-iters", "3", "--load", str(ckpt), "--no-save",
                        nproc=2, expect=1)
    assert "corrupted (CRC32 mismatch)" in proc.stderr and victim.name in proc.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_no_verify_skips_checksums_but_not_sizes(uninterrupted, tmp_path):
    import shutil

    root, full = uninterrupted
    run = tmp_path / "nv"
    run_training(run, "--train-iters", "2", "--save-interval", "1", "--no-verify")
    manifest = json.load(open(run / "checkpoints" / "iter_0000002" / "manifest.json"))
    assert manifest and all(set(e) == {"bytes"} for e in manifest.values())
    # a checkpoint with checksums, one byte flipped: --no-verify does not read it for CRCs
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "full" / "checkpoints", ckpt)
    victim = sorted((ckpt / "iter_0000006").glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_training(tmp_path / "trusting", "--train-iters", "7", "--load", str(ckpt),
                        "--no-save", "--no-verify", "--use-checkpoint-opt_param-scheduler")
    assert "CRC32" not in proc.stdout + proc.stderr and "resumed from" in proc.stdout
    victim.write_bytes(bytes(data[:-10]))  # sizes are still checked
    proc = run_training(tmp_path / "short", "--train-iters", "7", "--load", str(ckpt), "--no-save",
                        "--no-verify", expect=1)
    assert "truncated" in proc.stderr


def test_async_save_with_nothing_to_save_is_refused(capsys):
    from megatron_nitp.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(TRAIN_FLAGS + ["--train-iters", "3", "--async-save", "--no-save"])
    assert "--async-save with --no-save" in capsys.readouterr().err
    args = parse_args(TRAIN_FLAGS + ["--train-iters", "3", "--async-save", "--no-verify"])
    assert args.checkpoint.async_save and not args.checkpoint.verify


@pytest.mark.distributed
@pytest.mark.slow
def test_dp_reshardable_checkpoint_fails_cleanly_and_reshards_over_dp_only(tmp_path):
    """DP 2 with the distributed optimizer saves dp_reshardable (each rank its own shard).
    The last rank's write of iteration 2 fails as on a full disk: every rank stops with the
    same one line, the tracker stays on 1. Iteration 1 resumes at DP 1 (the same TP/PP) to
    the uninterrupted run's iteration-2 loss; at TP 2 it is refused before loading, naming the
    ways there."""
    ckpt = tmp_path / "ckpt"
    flags = ["--use-distributed-optimizer", "--save", str(ckpt)]
    proc = run_training(tmp_path / "dp2", "--train-iters", "3", "--save-interval", "1", *flags,
                        nproc=2, fault="disk-full-in-save@2", expect=1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # every rank raises the same error; torchrun stops the other rank as soon as the first
    # exits, so under load the second line may not be printed
    assert 1 <= len(errors) <= 2 and all(e == errors[0] for e in errors), errors
    assert f"saving {ckpt / 'iter_0000002'} failed: no space left on the device" in errors[0]
    # no trainer traceback (torchrun prints its own ChildFailedError for the exit code 1)
    assert "[rank 1]" in errors[0] and "megatron_nitp/training" not in proc.stderr
    assert _latest(ckpt) == 1 and not (ckpt / "iter_0000002" / "manifest.json").exists()
    meta = json.load(open(ckpt / "iter_0000001" / "nitp.json"))
    assert meta["optimizer_format"] == "dp_reshardable" and meta["layout"]["dp"] == 2
    logged = [line for line in proc.stdout.splitlines() if "iteration        2/" in line]
    loss_at_2 = float(logged[0].split("lm loss: ")[1].split()[0])

    proc = run_training(tmp_path / "tp2", "--train-iters", "3", "--load", str(ckpt), *flags,
                        "--tensor-model-parallel-size", "2", nproc=2, expect=1)
    assert "dp_reshardable" in proc.stderr and "TP 1 -> 2" in proc.stderr
    assert "--dist-ckpt-optim-fully-reshardable" in proc.stderr and "--finetune" in proc.stderr

    run_training(tmp_path / "dp1", "--train-iters", "2", "--load", str(ckpt), *flags, "--no-save",
                 "--use-checkpoint-opt_param-scheduler")
    assert _history(tmp_path / "dp1")["lm loss"][2] == pytest.approx(loss_at_2, rel=1e-5)
