"""The checkpoint folder's start checks (writable, lineage, free space), rotation and the tracker
within a lineage, failed saves in one line, the optimizer format a save writes and what a resume
at another layout does with it, and the plan's checkpoint figures. In-process (one gloo rank)."""

import errno
import json
import os

import pytest

from tests.helpers import TINY_MODEL, TINY_RUN, tiny_args

TINY = TINY_MODEL + TINY_RUN + ["--nitp-target-layer", "1", "--train-iters", "2", "--mock-data"]


class ModelBuilt(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Stops a run where it would build the model: a check that passes it came too late."""
    from megatron_nitp.training import model

    def refuse(*args, **kwargs):
        raise ModelBuilt()

    monkeypatch.setattr(model, "build_model", refuse)


def _pretrain(tmp_path, *flags):
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.loop import pretrain

    return pretrain(parse_args(TINY + ["--run-dir", str(tmp_path / "run")] + list(flags)))


def _fake_checkpoint(root, iteration, meta=None):
    """A complete-looking checkpoint folder (manifest present) named by the tracker."""
    from megatron_nitp.training import checkpoint as ck

    path = ck.checkpoint_dir(str(root), iteration)
    os.makedirs(path)
    with open(os.path.join(path, ck.MANIFEST), "w") as f:
        json.dump({}, f)
    if meta is not None:
        with open(os.path.join(path, ck.META), "w") as f:
            json.dump(meta, f)
    (root / ck.TRACKER).write_text(str(iteration))
    return path


def test_a_new_run_refuses_a_folder_that_holds_another_runs_checkpoints(dist, tmp_path,
                                                                         no_model):
    """The field report: a run without --load saving into a folder with an older run's
    iter_0000030 moved the tracker back to its own 2 (and --save-keep-last deleted its own
    checkpoints). Now refused at start, before the model is built, naming folder and fixes."""
    from megatron_nitp.training.loop import UsageError

    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt, 30)
    with pytest.raises(UsageError) as err:
        _pretrain(tmp_path, "--save", str(ckpt), "--save-interval", "1", "--save-keep-last", "1")
    message = str(err.value)
    assert "\n" not in message
    assert f"{ckpt} already holds checkpoints" in message and "iter_0000030" in message
    assert "another --save folder" in message and f"--load {ckpt}" in message
    assert (ckpt / "iter_0000030").is_dir() and (ckpt / "latest_checkpointed_iteration.txt"
                                                 ).read_text() == "30"
    # --finetune of the folder into itself would start over at iteration 0: refused too
    with pytest.raises(UsageError, match="--finetune starts a new run"):
        _pretrain(tmp_path, "--save", str(ckpt), "--load", str(ckpt), "--finetune")
    # resuming it (--load the same folder) passes the check and goes on to build the model
    with pytest.raises(ModelBuilt):
        _pretrain(tmp_path, "--save", str(ckpt), "--load", str(ckpt))
    # a crashed first save's leftover (no manifest, no tracker) is nothing to protect
    leftover = tmp_path / "leftover"
    os.makedirs(leftover / "iter_0000002")
    with pytest.raises(ModelBuilt):
        _pretrain(tmp_path, "--save", str(leftover))


def test_load_of_an_empty_folder_starts_from_scratch_unless_told_to_stop(dist, tmp_path,
                                                                          capsys):
    """Megatron-LM's --load of a folder without a checkpoint: a warning and a fresh start, so
    one command line (--load = --save) serves the first launch and every requeue;
    --exit-on-missing-checkpoint stops with exit code 1 instead. A folder that holds anything
    (a crashed save's iter_*, a tracker naming an incomplete checkpoint) is still refused."""
    from megatron_nitp.training import checkpoint as ck
    from megatron_nitp.training.entry import main
    from megatron_nitp.training.loop import UsageError

    ckpt = tmp_path / "ckpt"
    summary = _pretrain(tmp_path, "--load", str(ckpt), "--save", str(ckpt))
    out = capsys.readouterr().out
    assert f"warning: no checkpoint in {ckpt}: starting from scratch" in out
    assert "resumed from" not in out and summary["iterations"] == 2
    assert (ckpt / ck.TRACKER).read_text() == "2"
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = TINY + ["--run-dir", str(tmp_path / "run2"), "--load", str(empty),
                   "--exit-on-missing-checkpoint"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    line = str(exit_.value.code)  # a message: Python exits with 1, Megatron-LM's code
    assert line.startswith(f"error: no checkpoint in {empty}") and "\n" not in line
    assert "--exit-on-missing-checkpoint" in line and "--load path" in line
    assert not (tmp_path / "run2" / "checkpoints").exists()
    with pytest.raises(UsageError, match="--finetune needs the weights it names"):
        _pretrain(tmp_path, "--load", str(empty), "--finetune", "--no-save")
    leftover = tmp_path / "leftover"
    os.makedirs(leftover / "iter_0000002")  # a crashed first save: not nothing
    with pytest.raises(UsageError, match="is missing but the folder is not empty "
                                         r"\(iter_0000002"):
        _pretrain(tmp_path, "--load", str(leftover), "--no-save")
    broken = tmp_path / "broken"  # the tracker names a checkpoint whose save never finished
    _fake_checkpoint(broken, 2)
    os.remove(broken / "iter_0000002" / ck.MANIFEST)
    with pytest.raises(UsageError, match="iter_0000002 is incomplete"):
        _pretrain(tmp_path, "--load", str(broken), "--no-save")


@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]],
                         ids=["adam", "distributed"])
def test_a_resume_with_another_schedule_needs_one_of_megatron_lms_two_options(dist, tmp_path,
                                                                              capsys, optimizer):
    """Constant to iteration 2, then a linear WSD decay to 0 at 4; saved at 2. Resuming at 2
    with another decay (minus_sqrt down to --min-lr 1e-4) is refused unless told which
    schedule wins: --override-opt_param-scheduler follows the new one from iteration 3
    (the lr logged after step i is the schedule's at i), --use-checkpoint-opt_param-scheduler
    the old one. Both given: a usage error."""
    import math
    import shutil

    from megatron_nitp.training import checkpoint as ck
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.loop import UsageError

    def learning_rates(run):
        with open(tmp_path / run / "summary.json") as f:
            return {int(i): v for i, v in json.load(f)["history"]["learning rate"]}

    schedule = ["--train-iters", "4", "--lr", "1e-3", "--min-lr", "0", "--lr-decay-style", "WSD",
                "--lr-wsd-decay-iters", "2", "--log-interval", "1"] + optimizer
    ckpt = tmp_path / "ckpt"
    _pretrain(tmp_path / "a", *schedule, "--save", str(ckpt), "--save-interval", "2")
    assert learning_rates("a/run") == pytest.approx({1: 1e-3, 2: 1e-3, 3: 5e-4, 4: 0.0})
    at2 = tmp_path / "at2"
    shutil.copytree(ckpt / "iter_0000002", at2 / "iter_0000002")
    (at2 / ck.TRACKER).write_text("2")
    branch = schedule + ["--lr-wsd-decay-style", "minus_sqrt", "--min-lr", "1e-4",
                         "--load", str(at2), "--no-save"]
    with pytest.raises(UsageError) as err:
        _pretrain(tmp_path / "b", *branch)
    message = str(err.value)
    assert "\n" not in message and "--min-lr: checkpoint 0.0, this run 0.0001" in message
    assert "--lr-wsd-decay-style: checkpoint 'linear', this run 'minus_sqrt'" in message
    assert "--override-opt_param-scheduler" in message
    assert "--use-checkpoint-opt_param-scheduler" in message
    assert not (tmp_path / "b" / "run" / "summary.json").exists()
    _pretrain(tmp_path / "c", *branch, "--override-opt_param-scheduler")
    new = {3: 1e-4 + (1 - math.sqrt(0.5)) * 9e-4, 4: 1e-4}  # minus_sqrt halfway, then the end
    assert {i: v for i, v in learning_rates("c/run").items() if i > 2} == pytest.approx(new)
    _pretrain(tmp_path / "d", *branch, "--use-checkpoint-opt-param-scheduler")  # either spelling
    assert {i: v for i, v in learning_rates("d/run").items() if i > 2} == pytest.approx(
        {3: 5e-4, 4: 0.0})
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--override-opt_param-scheduler",
                           "--use-checkpoint-opt_param-scheduler"])
    assert "are exclusive" in capsys.readouterr().err


def test_an_unwritable_save_folder_is_refused_before_the_model_is_built(dist, tmp_path,
                                                                         no_model):
    from megatron_nitp.training.loop import UsageError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError) as err:
        _pretrain(tmp_path, "--save", str(blocker / "ckpt"))
    message = str(err.value)
    assert "\n" not in message
    assert f"the checkpoint folder {blocker / 'ckpt'} is not writable (Not a directory)" in message
    assert "--save folder" in message


@pytest.mark.parametrize("flag,what", [("--run-dir", "run folder"),
                                       ("--tensorboard-dir", "TensorBoard folder"),
                                       ("--data-cache-path", "data cache folder")])
def test_the_other_folders_a_run_writes_are_probed_before_the_data(dist, tmp_path, no_model,
                                                                   monkeypatch, flag, what):
    """An unwritable --run-dir, --tensorboard-dir or --data-cache-path is named in one line
    before the datasets are built: a traceback from os.makedirs after the model was built
    (TensorBoard), megatron-core's multi-line exception from the dataset build (the cache) or
    a message naming the checkpoint folder inside the run folder, before."""
    from megatron_nitp.training import loop

    def no_data(*args, **kwargs):
        raise AssertionError("the datasets were built before the folder was checked")

    monkeypatch.setattr(loop, "prepare_data", no_data)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    from megatron_nitp.training.arguments import parse_args

    # the cache is megatron-core's index of a real corpus (the mock data writes none)
    flags = [f for f in TINY if f != "--mock-data"] + ["--run-dir", str(tmp_path / "run")]
    with pytest.raises(loop.UsageError) as err:
        loop.pretrain(parse_args(flags + [flag, str(blocker / "sub")]))
    assert str(err.value) == (f"the {what} {blocker / 'sub'} is not writable (Not a directory): "
                              f"give a {flag} folder this user can write, or fix its permissions")


def test_free_space_is_compared_with_the_planned_checkpoint(dist, tmp_path, no_model,
                                                            monkeypatch, capsys):
    """Refused if the disk cannot hold one checkpoint (accounting.checkpoint.checkpoint_bytes), a warning if it
    cannot hold two; the figures are in the message."""
    import collections
    import shutil

    from megatron_nitp.training import checkpoint as ck
    from megatron_nitp.training.loop import UsageError
    from megatron_nitp.accounting.checkpoint import checkpoint_bytes

    args = tiny_args("--mock-data")
    need = checkpoint_bytes(args)
    usage = collections.namedtuple("usage", "total used free")
    gib = 1024**3

    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * need, 9 * need, need // 2))
    with pytest.raises(UsageError) as err:
        _pretrain(tmp_path, "--save", str(tmp_path / "full"), "--vocab-size", "128")
    message = str(err.value)
    assert f"has {need // 2 / gib:.2f} GiB free" in message
    assert f"about {need / gib:.2f} GiB" in message and "another --save folder" in message

    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * need, 0, 3 * need // 2))
    warnings = ck.check_save_folder(str(tmp_path / "tight"), args.checkpoint, need)
    assert len(warnings) == 1 and "less than two checkpoints" in warnings[0]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * need, 0, 2 * need))
    assert ck.check_save_folder(str(tmp_path / "roomy"), args.checkpoint, need) == []


def _finalize(root, iteration, keep_last=None):
    """Finalizes a save of ``iteration`` (an empty folder) as save_checkpoint does: manifest,
    tracker, rotation."""
    from megatron_nitp.training import checkpoint as ck
    from megatron_nitp.training.checkpoint.save import _finalize as finalize

    path = ck.checkpoint_dir(str(root), iteration)
    os.makedirs(path)
    finalize(str(root), path, iteration, {}, keep_last, False, None)


def _iterations(root):
    return sorted(p for p in os.listdir(root) if p.startswith("iter_"))


def test_rotation_keeps_the_checkpoint_just_written_and_never_touches_newer_ones(dist,
                                                                                  tmp_path):
    """Rotation ranked every complete checkpoint by number: with another run's iter_0000030 in
    the folder, --save-keep-last 1 kept 30 and deleted the run's own 1 and 2 while the tracker
    named 2. Only checkpoints up to the one just written are candidates now."""
    _fake_checkpoint(tmp_path, 30)
    _fake_checkpoint(tmp_path, 1)
    _finalize(tmp_path, 2, keep_last=1)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert _iterations(tmp_path) == ["iter_0000002", "iter_0000030"]
    _finalize(tmp_path, 3, keep_last=2)
    assert _iterations(tmp_path) == ["iter_0000002", "iter_0000003", "iter_0000030"]
    # a count below 1 (refused as --save-keep-last) deletes nothing: own[:-(-1)] would have
    # taken the oldest, the checkpoint just written once it is the only one
    _finalize(tmp_path, 4, keep_last=-1)
    _finalize(tmp_path, 5, keep_last=0)
    assert _iterations(tmp_path) == ["iter_0000002", "iter_0000003", "iter_0000004",
                                     "iter_0000005", "iter_0000030"]


def test_the_tracker_never_moves_back_silently(dist, tmp_path, capsys):
    from megatron_nitp.training import checkpoint as ck

    _fake_checkpoint(tmp_path, 6)
    _finalize(tmp_path, 5)
    assert (tmp_path / ck.TRACKER).read_text() == "5"
    assert (f"moving {tmp_path / ck.TRACKER} back from iteration 6 to 5"
            in capsys.readouterr().out)


@pytest.fixture
def tiny_model(dist):
    """(args, model, optimizer, scheduler) of a 2-layer model, distributed optimizer (DP 1)."""
    from megatron_nitp.training.checkpoint.state import materialize_adam_state
    from megatron_nitp.training.initialize import set_seed
    from megatron_nitp.training.model import build_model, wrap_model
    from megatron_nitp.training.optimizer import build_optimizer

    args = tiny_args("--use-distributed-optimizer")
    set_seed(args.training.seed)
    model = wrap_model(build_model(args), args)
    optimizer, scheduler = build_optimizer(model, args.training, args.schedule, args.derived)
    materialize_adam_state(optimizer)
    return args, model, optimizer, scheduler


def _save(tiny, root, iteration):
    from megatron_nitp.training import checkpoint as ck

    args, model, optimizer, scheduler = tiny
    return ck.save_checkpoint(str(root), iteration, model, optimizer, scheduler, args)


def test_a_full_disk_is_named_in_one_line_and_the_previous_checkpoint_stays_latest(
        tiny_model, tmp_path, monkeypatch):
    """The field report: a full disk surfaced as torch's zip writer's "unexpected pos 704 vs
    598" in a 20-line traceback. Both the test hook's ENOSPC in megatron-core's shard write and
    that torch.save error now read "no space left", and the tracker stays on the last good
    checkpoint, the failed one without a manifest."""
    import torch

    from megatron_nitp.training import checkpoint as ck
    from megatron_nitp.training import faults

    _save(tiny_model, tmp_path, 1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith(".pt") and "rng" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 "
                               "vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ck.CheckpointError, match="failed: no space left on the device"):
        _save(tiny_model, tmp_path, 3)
    assert (tmp_path / ck.TRACKER).read_text() == "1"
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setenv(faults.ENV, "disk-full-in-save@2")
    with pytest.raises(ck.CheckpointError) as err:
        _save(tiny_model, tmp_path, 2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"saving {tmp_path / 'iter_0000002'} failed: no space left on "
                              f"the device of {tmp_path}")
    assert "previous checkpoint is still the latest" in message and "[rank 0]" in message
    assert ck.read_tracker(str(tmp_path)) == 1
    assert not (tmp_path / "iter_0000002" / ck.MANIFEST).exists()
    ck.verify_checkpoint(ck.checkpoint_dir(str(tmp_path), 1))

    # --async-save: the forked writer's failure, at finalization, is the same one line
    monkeypatch.setenv(faults.ENV, "disk-full-in-save@4")
    args, model, optimizer, scheduler = tiny_model
    saves = ck.AsyncSaves()
    ck.save_checkpoint(str(tmp_path), 4, model, optimizer, scheduler, args, async_saves=saves)
    with pytest.raises(ck.CheckpointError) as err:
        saves.wait()
    assert str(err.value).startswith(f"saving {tmp_path / 'iter_0000004'} failed: no space "
                                     "left on the device")
    assert ck.read_tracker(str(tmp_path)) == 1


def test_permission_denied_is_named(tmp_path):
    from megatron_nitp.training import checkpoint as ck

    err = RuntimeError("Worker failure")
    err.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/x/__0_0.distcp")
    message = ck.describe_save_failure(str(tmp_path), str(tmp_path / "iter_0000004"), err)
    assert "failed: permission denied" in message and "--save folder" in message


def test_periodic_saves_are_dp_reshardable_and_record_it(tiny_model, tmp_path):
    """The default save writes the distributed optimizer's own shards (dp_reshardable) and says
    so in nitp.json; --dist-ckpt-optim-fully-reshardable writes the fully reshardable form.
    Both load back into the same optimizer, state equal."""
    import torch

    from megatron_nitp.training import checkpoint as ck

    args, model, optimizer, scheduler = tiny_model
    path = _save(tiny_model, tmp_path / "dp", 1)
    assert ck.read_meta(path)["optimizer_format"] == "dp_reshardable"
    assert ck.read_meta(path)["layout"]["dp"] == 1
    full = tiny_args("--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable")
    path = ck.save_checkpoint(str(tmp_path / "full"), 1, model, optimizer, scheduler, full)
    assert ck.read_meta(path)["optimizer_format"] == "fully_reshardable"

    def state():
        return [t.clone() for t in
                (v for s in optimizer.optimizer.state.values() for v in s.values())]

    before = state()
    for folder in ("dp", "full"):
        for group in optimizer.optimizer.state.values():
            for tensor in group.values():
                tensor.add_(1.0)
        ck.load_checkpoint(str(tmp_path / folder), model, optimizer, scheduler, args)
        assert all(torch.equal(a, b) for a, b in zip(before, state())), folder


def test_a_dp_reshardable_checkpoint_at_another_tp_is_refused_before_the_model(
        dist, tmp_path, no_model):
    from megatron_nitp.training.loop import UsageError

    ckpt = tmp_path / "ckpt"
    meta = {"iteration": 4, "optimizer_format": "dp_reshardable",
            "layout": {"tp": 2, "pp": 1, "ep": 1, "etp": 2, "cp": 1, "dp": 1}}
    _fake_checkpoint(ckpt, 4, meta)
    with pytest.raises(UsageError) as err:
        _pretrain(tmp_path, "--load", str(ckpt), "--save", str(ckpt),
                  "--use-distributed-optimizer")
    message = str(err.value)
    assert "\n" not in message and "dp_reshardable" in message and "TP 2 -> 1" in message
    assert "--dist-ckpt-optim-fully-reshardable" in message and "--finetune" in message
    # the same layout at another DP, the fully reshardable form and weights only pass
    from megatron_nitp.training import checkpoint as ck

    args = tiny_args("--use-distributed-optimizer")
    ck.check_optimizer_layout({**meta, "layout": {**meta["layout"], "tp": 1, "etp": 1,
                                                  "dp": 4}}, args, "x")
    ck.check_optimizer_layout({**meta, "optimizer_format": "fully_reshardable"}, args, "x")
    with pytest.raises(ModelBuilt):
        _pretrain(tmp_path, "--load", str(ckpt), "--save", str(tmp_path / "new"),
                  "--use-distributed-optimizer", "--finetune")


def test_checkpoint_figures_match_hand_counts(capsys):
    """A 2-layer d=32 model, fp32, vocab 128, tied embeddings, SwiGLU projector (r = 4):
    embedding 128 x 32 = 4096; a layer: 2 norms 64, QKV 32 x (32 + 2 x 16) = 2048, out 1024,
    FFN 3 x 32 x 64 = 6144 -> 9280; final norm 32; projector 3 x 4 x 32^2 = 12288.
    P = 4096 + 2 x 9280 + 32 + 12288 = 34976. Distributed optimizer in fp32: 4 B weights + 12 B
    optimizer on disk; at world 4 (DP 4) per rank dp_reshardable writes (4 + 12) P / 4 and
    reads 4 P + 12 P / 4; fully_reshardable gathers 12 P at save and reads 16 P at load."""
    from megatron_nitp.accounting.checkpoint import checkpoint_bytes, checkpoint_host_memory
    from megatron_nitp.accounting.dry_run import dry_run
    from megatron_nitp.config import resolve
    from megatron_nitp.training.arguments import parse_args

    base = TINY_MODEL + ["--micro-batch-size", "1", "--nitp-target-layer", "1", "--train-iters",
                         "4", "--vocab-size", "128"]
    p = 34976
    args = resolve(parse_args(base + ["--use-distributed-optimizer"]), 4, 128)
    assert checkpoint_bytes(args) == 16 * p
    assert checkpoint_host_memory(args) == {"format": "dp_reshardable",
                                            "save": 16 * p / 4, "load": 4 * p + 12 * p / 4}
    full = resolve(parse_args(base + ["--use-distributed-optimizer",
                                      "--dist-ckpt-optim-fully-reshardable"]), 4, 128)
    assert checkpoint_host_memory(full) == {"format": "fully_reshardable",
                                            "save": 4 * p / 4 + 12 * p, "load": 16 * p}
    plain = resolve(parse_args(base), 4, 128)  # fp32 plain optimizer: the weights are main
    assert checkpoint_bytes(plain) == 12 * p
    assert checkpoint_host_memory(plain)["load"] == 12 * p

    assert dry_run(parse_args(base + ["--use-distributed-optimizer", "--world-size",
                                      "4"])) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "checkpoint" in x)
    assert f"{16 * p / 1024:.1f} KiB on disk" in line
    assert f"{16 * p / 4 / 1024:.1f} KiB at save" in line
    assert f"{(4 * p + 3 * p) / 1024:.1f} KiB at load" in line and "dp_reshardable" in line


def test_fully_reshardable_without_the_distributed_optimizer_is_refused(capsys):
    from megatron_nitp.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(TINY + ["--dist-ckpt-optim-fully-reshardable"])
    assert "add --use-distributed-optimizer or drop the flag" in capsys.readouterr().err
    assert parse_args(TINY + ["--dist-ckpt-optim-fully-reshardable",
                              "--use-distributed-optimizer"]).checkpoint.dist_ckpt_optim_fully_reshardable
