"""The per-layer geometry probe (training/probe.py): values against a hand computation from the
model's own tensors, a fixed probe batch, no side effects on training, history keys."""

import json

import pytest
import torch
import torch.nn.functional as F

from megatron_nitp.data.datasets import CONTINUES_DOCUMENT
from megatron_nitp.geometry import effective_rank
from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.probe import POSITION, Probe
from tests.helpers import TINY_MODEL, TINY_RUN

FLAGS = TINY_MODEL + TINY_RUN + ["--nitp-target-layer", "1", "--train-iters", "4", "--no-save"]


@pytest.fixture(scope="module")
def run(dist):
    from megatron_nitp.training.loop import setup

    return setup(parse_args(FLAGS))


def _hand(run, probe):
    """The probe's values from the model's own forward on the probe batch (eval mode)."""
    from megatron_nitp.training.model import unwrap

    model = unwrap(run.model)
    model.eval()
    states = {1: [], "final": []}
    cosines = []
    with torch.no_grad():
        for i, batch in enumerate(probe.batches):
            out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                        loss_mask=batch["loss_mask"],
                        document_mask=batch.get(CONTINUES_DOCUMENT), return_hidden=True,
                        microbatch=i)
            counted = batch["loss_mask"].reshape(-1) > 0
            for layer, x in ((1, out.taps[1]), ("final", out.hidden)):
                states[layer].append(x.transpose(0, 1).reshape(-1, x.shape[-1])[counted])
            cos = F.cosine_similarity(model.projector(out.hidden)[:-1].float(),
                                      out.taps[1][1:].float(), dim=-1).T  # [b, s - 1]
            mask = batch["loss_mask"][:, :-1] > 0
            if CONTINUES_DOCUMENT in batch:
                mask &= batch[CONTINUES_DOCUMENT][:, :-1] > 0
            cosines.append(cos[mask])
    model.train()
    values = {}
    for layer, parts in states.items():
        x = torch.cat(parts).double()
        n = x.shape[0]
        u = F.normalize(x, dim=-1)
        name = "final" if layer == "final" else f"layer {layer}"
        values[f"probe effective rank {name}"] = effective_rank(x).item()
        values[f"probe cosine similarity {name}"] = ((u @ u.T).sum() - n).item() / (n * (n - 1))
        values[f"probe norm {name}"] = x.norm(dim=-1).mean().item()
    return values, torch.cat(cosines).double()


def test_probe_values_equal_a_hand_computation_and_leave_training_alone(run):
    from tests.parallel_harness import _local_snapshot, _same

    probe = Probe.build(run.args, run.train_iter, None)
    before = _local_snapshot(run)
    values, cosines = probe.measure(run.model, run.args)
    after = _local_snapshot(run)
    assert [name for name in before if not _same(before[name], after[name])] == []
    assert set(values) == set(probe.keys())
    hand, hand_cos = _hand(run, probe)
    for key, value in hand.items():
        assert values[key] == pytest.approx(value, rel=1e-5), key
    for name in ("layer 1", "final"):
        assert values[f"probe drift {name}"] == 0.0  # the first probe
        assert 1.0 < values[f"probe effective rank {name}"] <= run.args.model.hidden_size
    assert cosines.numel() == hand_cos.numel() == 4 * 15
    assert torch.allclose(cosines.sort().values, hand_cos.sort().values, atol=1e-5)
    assert values["probe cos(P(h),z) mean"] == pytest.approx(hand_cos.mean().item(), abs=1e-6)
    for q in (10, 50, 90):
        assert values[f"probe cos(P(h),z) p{q}"] == pytest.approx(
            torch.quantile(hand_cos, q / 100).item(), abs=1e-5)
    # the same model: the same values, no drift
    again, _ = probe.measure(run.model, run.args)
    assert again["probe drift layer 1"] == pytest.approx(0.0, abs=1e-12)
    assert again["probe norm final"] == values["probe norm final"]


def test_probe_batch_is_fixed_whatever_the_data_position(run):
    """Read from the dataset, not the iterator: a resumed run (samples consumed) gets the
    same probe batch; the validation data's first global batch when the run evaluates."""
    first = Probe.build(run.args, run.train_iter, None)
    consumed = run.train_iter.consumed_samples
    try:
        run.train_iter.consumed_samples = 12
        resumed = Probe.build(run.args, run.train_iter, None)
        assert run.train_iter.consumed_samples == 12
    finally:
        run.train_iter.consumed_samples = consumed
    assert len(first.batches) == run.args.derived.num_microbatches == 2
    for a, b in zip(first.batches, resumed.batches):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [b[POSITION][0, 0].item() for b in first.batches] == [0, 2 * 16]
    assert not first.held_out


def _pretrain(tmp_path, monkeypatch, probe_on):
    from megatron_nitp.training import probe as probe_module
    from megatron_nitp.training.loop import pretrain

    if not probe_on:
        monkeypatch.setattr(probe_module.Probe, "measure", lambda self, model, args: ({}, None))
    run_dir = tmp_path / ("on" if probe_on else "off")
    pretrain(parse_args(FLAGS + ["--geometry-interval", "2", "--run-dir", str(run_dir)]))
    monkeypatch.undo()
    with open(run_dir / "summary.json") as f:
        return json.load(f)["history"], run_dir


def test_training_with_the_probe_equals_training_without(dist, tmp_path, monkeypatch):
    on, run_dir = _pretrain(tmp_path, monkeypatch, True)
    off, _ = _pretrain(tmp_path, monkeypatch, False)
    for key in ("lm loss", "nitp loss", "grad norm", "effective rank"):
        assert on[key] == off[key], key  # bitwise
    assert not any(key.startswith("probe") for key in off)
    for key in ("probe effective rank layer 1", "probe effective rank final",
                "probe cosine similarity final", "probe norm layer 1", "probe drift layer 1",
                "probe drift final", "probe cos(P(h),z) p50", "probe cos(P(h),z) mean"):
        assert [i for i, _ in on[key]] == [1, 2, 4], key
    drift = dict(on["probe drift layer 1"])
    assert drift[1] == 0.0 and drift[4] > 0.0
    assert dict(on["probe drift final"])[4] > 0.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert [e.step for e in events.Histograms("probe cos(P(h),z)")] == [1, 2, 4]
    assert [e.step for e in events.Scalars("probe drift layer 1")] == [1, 2, 4]


def test_report_section_and_figure(tmp_path):
    """tools/report: the probe section (a table of the last probe per arm and layer, the
    cos(P(h), z) percentiles) and its figure; nothing for runs without a probe."""
    from types import SimpleNamespace

    from tests.helpers import load_tool

    load_tool("make_report")
    from report.figures import PROBE_FIGURE, plot_probe, probe_layers
    from report.sections import SECTIONS, probe

    def history(layers, drift):
        keys = {f"probe {what} {layer}": [[1, 2.0], [4, value]] for layer in layers
                for what, value in (("effective rank", 3.0), ("cosine similarity", 0.5),
                                    ("norm", 1.5), ("drift", drift))}
        return {"history": keys}

    runs = {"ntp": {"1": history(["final"], 0.25)},
            "nitp": {"1": history(["layer 1", "final"], 0.125)}}
    runs["nitp"]["1"]["history"].update({f"probe cos(P(h),z) p{q}": [[4, q / 100]]
                                         for q in (10, 50, 90)})
    facts = SimpleNamespace(runs=runs, labels=["1"], rel="results")
    assert probe in SECTIONS and probe_layers(runs, ["1"]) == ["layer 1", "final"]
    text = "\n".join(probe.render(facts))
    assert f"](results/{PROBE_FIGURE})" in text
    assert "| NTP | final | 3.000 | 0.500 | 1.500 | 0.250 |" in text
    assert "| NITP | layer 1 | 3.000 | 0.500 | 1.500 | 0.125 |" in text
    assert "| NTP | layer 1 |" not in text
    assert "0.100 / 0.500 / 0.900" in text
    assert plot_probe(runs, ["1"], str(tmp_path / PROBE_FIGURE)) is not None
    assert (tmp_path / PROBE_FIGURE).stat().st_size > 10_000
    bare = {"ntp": {"1": {"history": {}}}, "nitp": {"1": {"history": {}}}}
    assert probe.render(SimpleNamespace(runs=bare, labels=["1"], rel="r")) == []
    assert plot_probe(bare, ["1"], str(tmp_path / "none.png")) is None


def test_stored_references_come_back_only_for_the_same_probe_tokens(run, tmp_path):
    """Probe.checkpoint_files / resume: the first probe's states come back when the stored
    tokens are this rank's; other tokens (another layout's per-rank batches) or no stored
    references (an older checkpoint) drop them with one line, without failing."""
    probe = Probe.build(run.args, run.train_iter, None)
    probe.measure(run.model, run.args)
    files = probe.checkpoint_files()
    assert list(files) == ["probe/dp_00000_cp_00000.pt"]
    (tmp_path / "probe").mkdir()
    for rel, obj in files.items():
        torch.save(obj, tmp_path / rel)
    again = Probe.build(run.args, run.train_iter, None)
    assert again.resume(str(tmp_path)) is None
    assert again.reference.keys() == probe.reference.keys()
    assert all(torch.equal(again.reference[k], probe.reference[k]) for k in probe.reference)
    stored = files["probe/dp_00000_cp_00000.pt"]
    stored["of"]["tokens"][1] = stored["of"]["tokens"][1].flip(0)  # another rank's samples
    torch.save(stored, tmp_path / "probe/dp_00000_cp_00000.pt")
    other = Probe.build(run.args, run.train_iter, None)
    line = other.resume(str(tmp_path))
    assert "drift restarts" in line and "other probe tokens" in line and other.reference == {}
    (tmp_path / "probe/dp_00000_cp_00000.pt").unlink()
    assert "another data-parallel" in other.resume(str(tmp_path))
    assert "holds no probe references" in other.resume(str(tmp_path / "elsewhere"))
    assert other.reference == {}


def _probe_run(run_dir, *flags):
    from megatron_nitp.training.loop import pretrain

    pretrain(parse_args(FLAGS + ["--geometry-interval", "1", "--run-dir", str(run_dir), *flags]))
    with open(run_dir / "summary.json") as f:
        return json.load(f)["history"]


def test_drift_continues_across_a_resume(dist, tmp_path, capsys):
    """Four iterations in one go (its asynchronous checkpoint at 2 kept) against a resume of
    that checkpoint for iterations 3 and 4: the same drift curve, not a restart from 0. A
    checkpoint without the probe's references (written before they were stored) still
    resumes; its drift restarts and the log says so once."""
    import shutil

    full = _probe_run(tmp_path / "full", "--save-interval", "2", "--async-save")
    checkpoints = tmp_path / "full" / "checkpoints"
    assert (checkpoints / "iter_0000002" / "probe" / "dp_00000_cp_00000.pt").exists()
    capsys.readouterr()
    resumed = _probe_run(tmp_path / "resumed", "--load", str(checkpoints))
    assert "drift restarts" not in capsys.readouterr().out
    for key in ("probe drift layer 1", "probe drift final"):
        assert [i for i, _ in resumed[key]] == [3, 4], key
        want = dict(full[key])
        assert want[3] > 0.0
        for i, value in resumed[key]:
            assert value == pytest.approx(want[i], rel=1e-5), (key, i)
    assert resumed["lm loss"] == [e for e in full["lm loss"] if e[0] > 2]

    older = tmp_path / "older"
    shutil.copytree(checkpoints, older)
    shutil.rmtree(older / "iter_0000002" / "probe")
    manifest = older / "iter_0000002" / "manifest.json"
    entries = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in entries.items()
                                    if not k.startswith("probe")}))
    restarted = _probe_run(tmp_path / "restarted", "--load", str(older))
    out = capsys.readouterr().out
    assert out.count("drift restarts") == 1 and "holds no probe references" in out
    assert dict(restarted["probe drift layer 1"])[3] == 0.0
    assert dict(restarted["probe drift layer 1"])[4] > 0.0
