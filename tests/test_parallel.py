"""Parallel layouts equal one process, number for number (gloo, CPU, tiny model, fp32).

Every layout starts from the same initial weights (a checkpoint written by the single-process
reference and loaded through megatron-core's dist_checkpointing, which reshards them), trains 3
iterations on the same data, and is compared with the single-process reference of the same
NITP target layer k:

- test_layout_equals_single_process: per-iteration lm loss, nitp loss, global grad norm and
  effective rank to a relative 1e-5; the nitp loss is > 0 at every step (NITP is on, so a zero
  would mean the auxiliary loss silently dropped out on the last stage); the bytes of layer-k
  targets routed between pipeline stages, and the most of them an owning rank holds in pending
  sends at once, equal ``routed_bytes_per_step``; and the whole
  checkpoint state after the steps (every backbone and projector weight, and the optimizer's
  exp_avg and exp_avg_sq of every parameter, assembled into global tensors from all ranks)
  has the reference's keys and values (see ``parallel_runs.assert_state_close``), while every
  replicated copy (DP replicas, TP-replicated norms, the last stage's tied output layer) equals
  the copy that is saved, bit for bit. The layouts cover TP, TP+SP, PP with k before, on and after the
  stage boundary, PP4, DP, DP with the distributed optimizer (against the plain optimizer of
  one process), TP x PP, TP+SP+PP with k before the last stage, DP x PP, and PP with
  Megatron-LM's document flags (attention mask, reset positions, EOD loss mask; NITP targets
  masked at EODs) on a corpus of short documents.
- test_evaluate_*: the pp2-k-on-first-stage and dp2 layouts also call evaluate() after step
  1. It must give the one-process validation lm and nitp loss (relative 1e-5), route a
  training step's layer-k bytes per validation batch, and leave every rank's weights,
  gradients, optimizer state, scheduler, data position, RNG states and train/eval modes
  bitwise unchanged; the training after it must still equal the reference, which never
  evaluates. In one process, the same run with and without the call trains bit-identically.
- test_routing_buffers_are_released_during_the_step: each TP rank routes 1/TP of the target
  rows (its own shard under SP), and the send buffers held at once stay below the step's M
  micro-batches wherever 1F1B has a steady phase on the owning stage.
- test_mtp_under_pipeline_parallelism_equals_single_process: NITP with megatron-core's
  multi-token prediction under PP=2 equals one process (losses incl. the mtp loss, state);
  under PP 2 x VPP 2 it is one of test_interleaved_layout_equals_single_process's layouts.

Runs of one world size go one after the other in one launch (``parallel_harness.py --runs``):
the interpreter and megatron-core are imported once per world size, which keeps this module
within a CI budget of two CPU cores.
"""

import pytest
import torch

from megatron_nitp.layout import routed_bytes_per_step
from tests.helpers import write_short_documents
from tests.parallel_runs import FLAGS, Launcher, assert_state_close

EVAL_ITERS = 2
EVALUATE = ["--evaluate-at", "1", "--eval-iters", str(EVAL_ITERS)]


REFERENCE_FLAGS = {
    "ref1": ["--nitp-target-layer", "1"],
    "ref2": ["--nitp-target-layer", "2"],
    "ref3": ["--nitp-target-layer", "3"],
    "ref1-evaluate": ["--nitp-target-layer", "1"] + EVALUATE,
}
# untied: megatron-core cannot checkpoint the MTP stage of a PP model with tied embeddings
# (refused by validate; tests/test_objectives.py)
MTP = ["--nitp-target-layer", "1", "--mtp-num-layers", "1", "--untie-embeddings-and-output-weights"]
SP = ["--sequence-parallel"]
# Megatron-LM's document flags (NITP then masks its targets at EODs), on a corpus of short
# documents (several per sequence) with its own reference and initial checkpoint
DOCUMENTS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
# name: (k, tp, pp, dp, more flags). The 4 layers are split evenly over the pipeline stages.
LAYOUTS = {
    "tp2": (1, 2, 1, 1, []),
    # evaluate() and the geometry probe on TP-gathered states and per-position terms
    "tp2-sp": (1, 2, 1, 1, SP + EVALUATE),
    # megatron-core's unfused attention against the one-process reference's SDPA (auto on
    # CPU): equal under TP 2 + SP with GQA (tests/test_attention.py: one process)
    "tp2-sp-unfused": (1, 2, 1, 1, SP + ["--attention-backend", "unfused"]),
    "pp2-k-on-first-stage": (1, 1, 2, 1, EVALUATE),
    "pp2-k-on-last-stage": (3, 1, 2, 1, []),
    "dp2": (1, 1, 1, 2, EVALUATE),
    "dp2-distributed-optimizer": (1, 1, 1, 2, ["--use-distributed-optimizer"]),
    # megatron-core's communication overlap (gloo runs it too): bucketed gradient reduce-scatter
    # in the backward pass, parameter all-gather in the next forward's pre-hooks
    "dp2-distributed-optimizer-overlap": (1, 1, 1, 2, ["--use-distributed-optimizer",
                                                       "--overlap-grad-reduce",
                                                       "--overlap-param-gather"] + EVALUATE),
    # activation recomputation on both stages; layer k recomputed on the owner stage (its
    # hook re-fires in the backward pass: ignored, one send per micro-batch)
    "pp2-k-on-first-stage-full-recompute": (1, 1, 2, 1, ["--recompute-granularity", "full",
                                                         "--recompute-method", "uniform",
                                                         "--recompute-num-layers", "1"]),
    "pp2-k-on-first-stage-selective-recompute": (1, 1, 2, 1, [
        "--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"]),
    "pp4-k-on-stage-1": (2, 1, 4, 1, []),
    "tp2xpp2": (2, 2, 2, 1, []),
    "tp2-sp-pp2-k-before-last-stage": (1, 2, 2, 1, SP),
    "dp2xpp2-k-on-stage-boundary": (2, 1, 2, 2, []),
    # the attention mask, reset positions, EOD-masked loss and NITP document mask on both
    # stages, layer k routed from the first
    "pp2-k-on-first-stage-documents": (1, 1, 2, 1, DOCUMENTS),
}
EVALUATED = [name for name, layout in LAYOUTS.items() if "--evaluate-at" in layout[4]]

# The interleaved schedule (virtual pipeline stages). Until the NITP target is routed under
# interleaving, layer k lies on the last rank's last chunk: a 6-layer model split 2 + 4 over
# PP 2, each rank's layers in 2 chunks (rank 0: [1] [4]; rank 1: [2 3] [5 6]), k = 5; and the
# 4-layer model without NITP and with the cosine regularization (1 layer per chunk).
SIX = ["--num-layers", "6", "--nitp-target-layer", "5"]
UNEVEN_VPP2 = ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2"]
VPP2 = ["--num-virtual-stages-per-pipeline-rank", "2"]
VPP_REFERENCES = {
    "ref-ntp": ["--no-nitp"],
    "ref-cosine-reg": ["--nitp-objective", "cosine_reg"],
}
# Two tapped layers and two horizons (4 NITP terms, each its own projector): plain PP 2 routes
# layer 1 from stage 0 and reads layer 3 on the last stage; PP 2 x VPP 2 (one layer per chunk:
# rank 0 holds [1] [3], rank 1 [2] [4]) routes both from rank 0's two chunks.
TWO_TAPS = ["--nitp-target-layer", "1", "--nitp-extra-target-layers", "3", "--nitp-horizon", "2"]
PP2_VPP2 = ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]
EIGHT = ["--num-layers", "8", "--nitp-target-layer", "2"]
# name: (reference, world size, flags after FLAGS; "INIT" is the reference's initial checkpoint)
VPP_LAYOUTS = {
    "pp2-vpp2-ntp": ("ref-ntp", 2, ["--no-nitp", "--pipeline-model-parallel-size", "2",
                                    "--num-layers-per-virtual-pipeline-stage", "1"]),
    "pp2-vpp2-cosine-reg": ("ref-cosine-reg", 2, ["--nitp-objective", "cosine_reg",
                                                  "--pipeline-model-parallel-size", "2",
                                                  "--num-virtual-stages-per-pipeline-rank", "2"]),
    # layer k routed under interleaving, matched by micro-batch: from rank 0's first chunk, from
    # its second chunk, and handed over in memory from the last rank's first chunk
    # (and evaluate() under the interleaved forward-only schedule with the target routed)
    "pp2-vpp2-k-rank0-chunk0": ("ref1-evaluate", 2, ["--nitp-target-layer", "1"] + PP2_VPP2
                                + EVALUATE),
    "pp2-vpp2-k-rank0-chunk1": ("ref3", 2, ["--nitp-target-layer", "3"] + PP2_VPP2),
    "pp2-vpp2-k-rank1-chunk0": ("ref2", 2, ["--nitp-target-layer", "2"] + PP2_VPP2),
    "pp2-two-taps": ("ref-two-taps", 2, TWO_TAPS + ["--pipeline-model-parallel-size", "2"]),
    "pp2-vpp2-two-taps": ("ref-two-taps", 2, TWO_TAPS + PP2_VPP2),
    "dp2xpp2-vpp2-k-rank0-chunk0": ("ref1", 4, ["--nitp-target-layer", "1"] + PP2_VPP2),
    # NITP + megatron-core's MTP: the MTP blocks and an embedding copy on rank 1's last chunk
    # only, layer k = 1 routed from rank 0's first chunk (pp2-mtp's flags, interleaved)
    "pp2-vpp2-mtp-k-rank0-chunk0": ("ref-mtp", 2, MTP + PP2_VPP2),
    # 8 layers, one per chunk (rank r: [r+1] [r+5]): k = 2 on rank 1's first chunk, routed to
    # rank 3's last chunk over two middle ranks
    "pp4-vpp2-k-rank1-chunk0": ("ref-8-layers", 4, EIGHT + [
        "--pipeline-model-parallel-size", "4", "--num-virtual-stages-per-pipeline-rank", "2"]),
    # evaluate() under the interleaved forward-only schedule, and a checkpoint saved after the
    # steps (test_checkpoint_under_vpp_resumes_with_and_without_vpp)
    "pp2-vpp2-k-on-last-chunk": ("ref-vpp", 2, SIX + UNEVEN_VPP2 + VPP2 + EVALUATE),
    "dp2xpp2-vpp2-k-on-last-chunk": ("ref-vpp", 4, SIX + UNEVEN_VPP2 + VPP2),
    # the distributed optimizer with overlapped reduce-scatter / all-gather: each chunk's
    # start_grad_sync / start_param_sync called by the interleaved schedule
    "dp2xpp2-vpp2-distributed-optimizer-overlap": ("ref-vpp", 4, SIX + UNEVEN_VPP2 + VPP2 + [
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]),
}
# resumed (optimizer included) and not trained: the state as loaded, resharded from the
# interleaved checkpoint to the plain schedule and back
RESUMED = {
    "resume-vpp-as-pp2": SIX + UNEVEN_VPP2 + ["--load", "CKPT-VPP", "--save-final", "CKPT-PP2"],
    "resume-pp2-as-vpp2": SIX + UNEVEN_VPP2 + VPP2 + ["--load", "CKPT-PP2"],
}


def _layout_flags(name, init):
    k, tp, pp, dp, flags = LAYOUTS[name]
    return FLAGS + ["--nitp-target-layer", str(k), "--load", str(init),
                    "--tensor-model-parallel-size", str(tp),
                    "--pipeline-model-parallel-size", str(pp)] + flags


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Results by run name: the one-process references first (ref1 writes the initial
    checkpoint the others load), then one launch per world size."""
    root = tmp_path_factory.mktemp("parallel")
    init = root / "init"
    references = {name: FLAGS + flags + (["--save-init", str(init)] if name == "ref1"
                                        else ["--load", str(init)])
                  for name, flags in REFERENCE_FLAGS.items()}
    # NITP + megatron-core's MTP (its blocks on the last stage): a model with more
    # parameters, so its own initial checkpoint
    references["ref-mtp"] = FLAGS + MTP + ["--save-init", str(root / "init-mtp")]
    documents = _documents_data(root)
    references["ref1-documents"] = (FLAGS + DOCUMENTS + documents
                                    + ["--save-init", str(root / "init-documents")])
    groups = {1: references}
    for name, (k, tp, pp, dp, flags) in LAYOUTS.items():
        groups.setdefault(tp * pp * dp, {})[name] = (
            _layout_flags(name, root / "init-documents") + documents
            if name.endswith("-documents") else _layout_flags(name, init))
    groups.setdefault(2, {})["pp2-mtp"] = FLAGS + MTP + ["--load", str(root / "init-mtp"),
                                          "--pipeline-model-parallel-size", "2"]
    for name, flags in VPP_REFERENCES.items():
        references[name] = FLAGS + flags + ["--load", str(init)]
    references["ref-vpp"] = FLAGS + SIX + EVALUATE + ["--save-init", str(root / "init-vpp")]
    references["ref-two-taps"] = FLAGS + TWO_TAPS + ["--save-init", str(root / "init-two-taps")]
    references["ref-8-layers"] = FLAGS + EIGHT + ["--save-init", str(root / "init-8-layers")]
    for name, (reference, world, flags) in VPP_LAYOUTS.items():
        start = root / {"ref-vpp": "init-vpp", "ref-two-taps": "init-two-taps",
                        "ref-8-layers": "init-8-layers",
                        "ref-mtp": "init-mtp"}.get(reference, "init")
        groups.setdefault(world, {})[name] = FLAGS + flags + ["--load", str(start)]
    groups[2]["pp2-vpp2-k-on-last-chunk"] += ["--save-final", str(root / "ckpt-vpp")]
    for name, flags in RESUMED.items():  # after the save, in the same launch
        paths = {"CKPT-VPP": str(root / "ckpt-vpp"), "CKPT-PP2": str(root / "ckpt-pp2")}
        groups[2][name] = FLAGS + [paths.get(f, f) for f in flags] + ["--resume"]
    launcher = Launcher(root, groups)

    def get(name):
        launcher("ref1")  # every layout loads the initial checkpoint it writes
        return launcher(name)

    return get


def _documents_data(root):
    """Flags of the short-document corpus (documents of 2 to 12 tokens, NullTokenizer)."""
    prefix = write_short_documents(root / "short-documents", 200, 12)
    return ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
            "--split", "1,0,0", "--data-cache-path", str(root / "short-documents-cache")]


def _reference(name):
    """The one-process run a layout is compared with: same k, same data and flags."""
    return f"ref{LAYOUTS[name][0]}" + ("-documents" if name.endswith("-documents") else "")


def _routing(name):
    """``routed_bytes_per_step`` for layout ``name``: the layer-k target bytes one global
    batch routes to the last stage, and the send buffers an owning rank holds at once."""
    k, tp, pp, dp, flags = LAYOUTS[name]
    return routed_bytes_per_step(
        seq_length=32, micro_batch_size=2, hidden_size=32, target_layer=k, num_layers=4,
        num_microbatches=8 // 2 // dp, tensor_parallel=tp, pipeline_parallel=pp,
        data_parallel=dp, sequence_parallel="--sequence-parallel" in flags, dtype_bytes=4,
    )


def _routed_bytes(name):
    """Layer-k target bytes one global batch routes to the last stage under layout ``name``."""
    return _routing(name)["bytes_per_step_total"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_single_process(results, name):
    ref_metrics, ref_state, _ = results(_reference(name))
    metrics, state, _ = results(name)
    assert len(metrics) == len(ref_metrics) == 3
    assert metrics[0]["routed bytes per step"] == _routed_bytes(name)
    for got in metrics:
        assert got["routing peak bytes held"] == _routing(name)["peak_bytes_held_per_rank"]
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        assert got["nitp loss"] > 0 and want["nitp loss"] > 0, (name, step)
        for key in ("lm loss", "nitp loss", "grad norm", "effective rank", "params norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (name, step, key)
        assert got["num zeros"] == want["num zeros"], (name, step)
    assert_state_close(state, ref_state, name)


ROUTED = [name for name in LAYOUTS if _routing(name)["routed"]]


@pytest.mark.parametrize("rows,tp", [(32, 2), (30, 4), (5, 4), (3, 4)])
def test_tp_shares_of_the_target_cover_it(rows, tp):
    """Without SP, TP rank r routes rows ``[r c, (r + 1) c)`` of z, ``c = ceil(L / tp)``, the
    last shares zero-padded to c rows: the last stage's all-gather of the shares, trimmed to L
    rows, is z. ``routed_bytes_per_step`` counts the padded shares."""
    from megatron_nitp.layout import routed_rows
    from megatron_nitp.nitp.routing import TargetRouter

    z = torch.randn(rows, 2, 3)
    chunk = routed_rows(rows, tp, sequence_parallel=False)
    assert chunk == -(-rows // tp) and routed_rows(rows, tp, sequence_parallel=True) == rows
    shares = []
    for rank in range(tp):
        router = object.__new__(TargetRouter)  # only the slicing: no process group
        router.tp_split, router.tp_rank = tp, rank
        shares.append(router._share(z))
        assert shares[-1].shape == (chunk, 2, 3) and shares[-1].is_contiguous()
    gathered = torch.cat(shares)
    assert torch.equal(gathered[:rows], z) and not gathered[rows:].any()
    per_micro = routed_bytes_per_step(
        seq_length=rows, micro_batch_size=2, hidden_size=3, num_microbatches=1, target_layer=1,
        num_layers=2, tensor_parallel=tp, pipeline_parallel=2, dtype_bytes=4,
    )["bytes_per_microbatch_per_rank"]
    assert per_micro == chunk * 2 * 3 * 4


@pytest.mark.distributed
@pytest.mark.parametrize("name", ROUTED)
def test_routing_buffers_are_released_during_the_step(results, name):
    """An owning rank's pending layer-k sends hold at most ``min(PP - owner, M)``
    micro-batches' targets at once, released as the backward reaches the owner, not all M
    until the end of the step; without SP each TP rank routes 1/TP of the rows."""
    _, tp, pp, dp, _ = LAYOUTS[name]
    routing = _routing(name)
    metrics, _, _ = results(name)
    micro, per_micro = 8 // 2 // dp, routing["bytes_per_microbatch_per_rank"]
    assert per_micro == 32 // tp * 2 * 32 * 4  # [s/tp, b, h] fp32, with or without SP
    for got in metrics:
        assert 0 < got["routing peak bytes held"] <= micro * per_micro
        if pp - routing["owner_stage"] < micro:  # the steady 1F1B phase releases buffers
            assert got["routing peak bytes held"] < micro * per_micro


@pytest.mark.distributed
def test_mtp_under_pipeline_parallelism_equals_single_process(results):
    """The MTP objective beside NITP under PP=2 (MTP blocks and an embedding copy on the last
    stage, layer k on the first): losses, grad norm and the whole state equal one process."""
    ref_metrics, ref_state, _ = results("ref-mtp")
    metrics, state, _ = results("pp2-mtp")
    assert any(key.startswith("model.mtp.") for key in state["tensors"])
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        assert got["mtp loss"] > 0 and got["nitp loss"] > 0, step
        for key in ("lm loss", "nitp loss", "mtp loss", "grad norm", "params norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
    assert_state_close(state, ref_state, "pp2-mtp")


@pytest.mark.distributed
def test_evaluate_in_one_process_changes_nothing(results):
    """The reference with an evaluate() call after step 1 trains bit-identically to the one
    without: the call touched no weight, optimizer state, data position or RNG."""
    metrics, state, _ = results("ref1")
    eval_metrics, eval_state, evaluation = results("ref1-evaluate")
    assert evaluation["changed"] == []
    assert evaluation["metrics"]["lm loss"] > 0 and evaluation["metrics"]["nitp loss"] > 0
    assert eval_metrics == metrics
    assert eval_state["tensors"].keys() == state["tensors"].keys()
    for key, tensor in state["tensors"].items():
        assert torch.equal(eval_state["tensors"][key], tensor), key


@pytest.mark.distributed
@pytest.mark.parametrize("name", EVALUATED)
def test_evaluate_equals_single_process_and_changes_nothing(results, name):
    """Validation losses under PP=2 / DP=2 equal one process's; nothing evaluate() could
    disturb changed on any rank (test_layout_equals_single_process[name] checks that the
    training after the call still equals the reference that never evaluates)."""
    _, _, want = results("ref1-evaluate")
    _, _, got = results(name)
    assert got["changed"] == []
    assert got["routed bytes"] == EVAL_ITERS * _routed_bytes(name)  # a training step's targets
    assert got["metrics"].keys() == want["metrics"].keys() == {"lm loss", "nitp loss"}
    for key in ("lm loss", "nitp loss"):
        assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5), key
    assert got["probe routed bytes"] == _routed_bytes(name)  # one global batch's targets
    assert_probe_equal(got, want)


def assert_probe_equal(got, want):
    """The per-layer geometry probe (training/probe.py) of a layout equals one process's: the
    same keys and values, the same cos(P(h), z) at every (sample, position)."""
    assert got["probe"].keys() == want["probe"].keys()
    assert "probe drift layer 1" in got["probe"] or "probe drift layer 5" in got["probe"]
    for key, value in want["probe"].items():
        assert got["probe"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert len(got["probe cosines"]) == len(want["probe cosines"]) > 0
    assert got["probe cosines"] == pytest.approx(want["probe cosines"], abs=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(VPP_LAYOUTS))
def test_interleaved_layout_equals_single_process(results, name):
    """megatron-core's interleaved schedule over model chunks (DDP per chunk, one optimizer
    over all of them), and several tapped layers under PP, equal one process: every logged
    loss, grad norm, geometry and the whole state; NITP > 0 wherever layer k is (routed from an
    earlier rank's chunk, handed over within the last rank, or on the last chunk), and without
    NITP; with MTP, its loss > 0 and its blocks in the state. The routed bytes are one
    ``[s, b, h]`` fp32 state per micro-batch per tap sent over the wire."""
    reference, _, flags = VPP_LAYOUTS[name]
    ref_metrics, ref_state, _ = results(reference)
    metrics, state, _ = results(name)
    assert len(metrics) == len(ref_metrics) == 3
    nitp = "--no-nitp" not in flags and "cosine_reg" not in flags
    per_tap = 32 * 2 * 32 * 4 * 4  # s b h fp32, 4 micro-batches
    dp = 2 if name.startswith("dp2") else 1
    sent = {"pp2-vpp2-k-rank0-chunk0": 1, "pp2-vpp2-k-rank0-chunk1": 1, "pp2-two-taps": 1,
            "pp2-vpp2-two-taps": 2, "dp2xpp2-vpp2-k-rank0-chunk0": 1,
            "pp4-vpp2-k-rank1-chunk0": 1, "pp2-vpp2-mtp-k-rank0-chunk0": 1}.get(name, 0)
    mtp = "--mtp-num-layers" in flags
    keys = [k for k in ref_metrics[0] if " loss" in k] + ["grad norm", "effective rank",
                                                          "params norm"]
    assert ("cosine reg loss" in keys) == ("cosine_reg" in flags)
    assert len([k for k in keys if k.startswith("nitp loss k=")]) == (4 if "taps" in name else 0)
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        # DP 2: each replica routes its half of the micro-batches; the job total is the same
        assert got["routed bytes per step"] == sent * per_tap, (name, step)
        assert 0 < got["routing peak bytes held"] <= sent * per_tap / dp if sent else True
        if nitp:
            assert got["nitp loss"] > 0 and want["nitp loss"] > 0, (name, step)
        if mtp:
            assert got["mtp loss"] > 0 and want["mtp loss"] > 0, (name, step)
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (name, step, key)
    assert any(key.startswith("model.mtp.") for key in state["tensors"]) == mtp
    assert_state_close(state, ref_state, name)


@pytest.mark.distributed
@pytest.mark.parametrize("name,reference", [("pp2-vpp2-k-on-last-chunk", "ref-vpp"),
                                            ("pp2-vpp2-k-rank0-chunk0", "ref1-evaluate")])
def test_evaluate_under_vpp_equals_single_process_and_changes_nothing(results, name, reference):
    """evaluate() under the interleaved forward-only schedule, with layer k on the last chunk
    and routed from rank 0's first chunk (one training step's targets per validation batch)."""
    _, _, want = results(reference)
    _, _, got = results(name)
    assert got["changed"] == [] and want["changed"] == []
    assert got["metrics"].keys() == want["metrics"].keys() == {"lm loss", "nitp loss"}
    for key in ("lm loss", "nitp loss"):
        assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5), key
    routed = 32 * 2 * 32 * 4 * 4 if "rank0" in name else 0
    assert got["routed bytes"] == EVAL_ITERS * routed
    assert_probe_equal(got, want)


@pytest.mark.distributed
def test_checkpoint_under_vpp_resumes_with_and_without_vpp(results):
    """A checkpoint saved under the interleaved schedule resumes (weights, Adam moments) at PP
    2 without it, and that one back under it: megatron-core's dist-checkpointing reshards the
    chunks (global layer keys); the state as loaded equals the saved state exactly."""
    _, saved, _ = results("pp2-vpp2-k-on-last-chunk")
    for name in RESUMED:
        _, state, _ = results(name)
        assert state["tensors"].keys() == saved["tensors"].keys(), name
        for key, tensor in saved["tensors"].items():
            assert torch.equal(state["tensors"][key], tensor), (name, key)
