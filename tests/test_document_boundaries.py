"""Document boundaries (Megatron-LM's ``--reset-position-ids``, ``--reset-attention-mask``,
``--eod-mask-loss``, and ``--nitp-document-boundary``): on a corpus of short documents the
batches carry the positions, attention mask and loss mask built by hand; with the mask, a
document's logits do not depend on the document before it (SDPA and unfused attention alike);
NITP pairs no position with another document's target, and the step's N_nitp counts exactly the
model's NITP mask; the mask's context-parallel slices line up with the sharded shift's positions.
Parallel equality with the flags on: tests/test_parallel.py's ``pp2-k-on-first-stage-documents``
layout (and tests/test_cp_slice.py slices the mask in a launched CP job)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_nitp.data import build_tokenizer
from megatron_nitp.data.datasets import (ATTENTION_MASK, CONTINUES_DOCUMENT, MicroBatchIterator,
                                         build_datasets, build_mock_datasets)
from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.initialize import set_seed
from megatron_nitp.training.model import build_model
from tests.helpers import tiny_args, write_short_documents, nitp_terms

VOCAB = 64  # NullTokenizer: ids 0..63, 63 = EOD
EOD = VOCAB - 1
SEQ = 16
DOCUMENTS = ("--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss")


def _expected(tokens):
    """By hand, from a sample's ``[s]`` tokens: (position ids ``[s]``, attention mask ``[1, s, s]``
    with True = masked out, loss mask ``[s]``). An EOD ends its document: the next token starts
    a new one at position 0 and sees nothing before it."""
    document, start, docs, positions = 0, 0, [], []
    for i, token in enumerate(tokens.tolist()):
        docs.append(document)
        positions.append(i - start)
        if token == EOD:
            document, start = document + 1, i + 1
    s = len(docs)
    allowed = torch.tensor([[j <= i and docs[i] == docs[j] for j in range(s)] for i in range(s)])
    loss_mask = torch.tensor([0.0 if t == EOD else 1.0 for t in tokens.tolist()])
    return torch.tensor(positions), ~allowed.unsqueeze(0), loss_mask


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    # 2 to 7 tokens a document: several per 16-token sample
    return write_short_documents(tmp_path_factory.mktemp("short-documents") / "docs", 40, 7,
                                 VOCAB)


def _dataset(prefix, tmp_path, **flags):
    train, _, _ = build_datasets(prefix, build_tokenizer("NullTokenizer", None, VOCAB), SEQ,
                                 seed=1, split="1,0,0", num_samples=(8, 0, 0),
                                 cache_dir=str(tmp_path / "cache"), **flags)
    return train


def test_batches_carry_the_hand_built_positions_masks_and_loss_mask(short_documents, tmp_path):
    on = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    batch = next(MicroBatchIterator(_dataset(short_documents, tmp_path, **on), 4, eod=EOD))
    assert batch[ATTENTION_MASK].shape == (4, 1, SEQ, SEQ)
    assert batch[ATTENTION_MASK].dtype == torch.bool
    inside = 0
    for b in range(4):
        tokens = batch["tokens"][b]
        inside += int((tokens[:-1] == EOD).sum())
        positions, mask, loss_mask = _expected(tokens)
        assert torch.equal(batch["position_ids"][b], positions), b
        assert torch.equal(batch[ATTENTION_MASK][b], mask), b
        assert torch.equal(batch["loss_mask"][b], loss_mask), b
        assert torch.equal(batch[CONTINUES_DOCUMENT][b], (tokens != EOD).float()), b
    assert inside >= 8, "the corpus must put several documents in a sample"
    # off (the default): packed without boundaries, the same tokens
    plain = next(MicroBatchIterator(_dataset(short_documents, tmp_path), 4))
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert torch.equal(plain["tokens"], batch["tokens"])
    assert torch.equal(plain["position_ids"], torch.arange(SEQ).expand(4, -1))
    assert bool((plain["loss_mask"] == 1).all())


def test_flags_default_off_and_the_nitp_boundary_follows_the_attention_mask():
    args = tiny_args()
    assert not (args.data.reset_position_ids or args.data.reset_attention_mask or args.data.eod_mask_loss)
    assert args.nitp_config.document_boundary == "allow" and not args.nitp_config.masks_documents
    args = tiny_args(*DOCUMENTS)
    assert args.data.reset_position_ids and args.data.reset_attention_mask and args.data.eod_mask_loss
    assert args.nitp_config.document_boundary == "mask" and args.nitp_config.masks_documents
    assert tiny_args("--reset-attention-mask", "--nitp-document-boundary",
                     "allow").nitp_config.document_boundary == "allow"
    assert tiny_args("--nitp-document-boundary", "mask").nitp_config.masks_documents
    # shift 0 pairs t with itself: nothing crosses a boundary
    assert not tiny_args(*DOCUMENTS, "--nitp-shift", "0").nitp_config.masks_documents


def test_what_cannot_apply_the_mask_is_refused(capsys):
    from megatron_nitp import kernels

    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
             "--train-iters", "1", "--lr-warmup-iters", "0", "--reset-attention-mask",
             "--dry-run"]

    def refusal(*more):
        with pytest.raises(SystemExit) as exit_:
            parse_args(flags + list(more))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        return err

    assert ("--reset-attention-mask with --context-parallel-size 2: context-parallel attention "
            "cannot take a per-document mask; use --context-parallel-size 1"
            in refusal("--context-parallel-size", "2"))
    with kernels.simulate(cuda=True, te=True):
        assert ("--reset-attention-mask with Transformer Engine's attention (--attention-backend "
                "auto), which would ignore the per-document mask: use --attention-backend sdpa "
                "or unfused." in refusal())
        parse_args(flags + ["--attention-backend", "sdpa"])
        parse_args(flags + ["--attention-backend", "sdpa", "--transformer-impl", "local"])


def _tokens_with_documents():
    """``[2, 16]`` tokens below EOD, with EODs at (0, 4), (0, 10), (1, 7) and (1, 15)."""
    tokens = torch.randint(0, EOD, (2, SEQ), generator=torch.Generator().manual_seed(3))
    for b, t in ((0, 4), (0, 10), (1, 7), (1, 15)):
        tokens[b, t] = EOD
    return tokens


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_a_documents_logits_do_not_depend_on_the_document_before(dist, backend):
    args = tiny_args("--attention-backend", backend, *DOCUMENTS)
    set_seed(11)
    model = build_model(args, NITPConfig(enabled=False), True, True)
    tokens = _tokens_with_documents()
    other = tokens.clone()
    other[0, :4] = (other[0, :4] + 1) % EOD  # another first document in row 0
    other[1, :7] = (other[1, :7] + 5) % EOD
    masks = [_expected(row) for row in tokens]
    positions = torch.stack([m[0] for m in masks])
    attention = torch.stack([m[1] for m in masks])
    with torch.no_grad():
        first, second = (model(t, positions, attention) for t in (tokens, other))
        unmasked = model(other, positions, None)
    # logits [b, s, V]: equal from each row's second document on, different before
    torch.testing.assert_close(second[0, 5:], first[0, 5:], rtol=0, atol=1e-6)
    torch.testing.assert_close(second[1, 8:], first[1, 8:], rtol=0, atol=1e-6)
    assert not torch.allclose(second[0, :4], first[0, :4])
    assert not torch.allclose(unmasked[0, 5:], first[0, 5:], atol=1e-4), "mask not applied"


def test_sdpa_equals_unfused_with_the_document_mask(dist):
    logits = {}
    for backend in ("sdpa", "unfused"):
        args = tiny_args("--attention-backend", backend, *DOCUMENTS)
        set_seed(12)
        model = build_model(args, NITPConfig(enabled=False), True, True)
        tokens = _tokens_with_documents()
        masks = [_expected(row) for row in tokens]
        with torch.no_grad():
            logits[backend] = model(tokens, torch.stack([m[0] for m in masks]),
                                    torch.stack([m[1] for m in masks]))
    torch.testing.assert_close(logits["sdpa"], logits["unfused"], rtol=1e-5, atol=1e-5)


def test_nitp_mask_and_loss_stop_at_document_boundaries(dist):
    from megatron_nitp.training.step import _global_counts

    args = tiny_args(*DOCUMENTS)
    set_seed(13)
    model = build_model(args, NITPConfig(target_layer=1), True, True)
    seen = {}
    model.decoder.layers[0].register_forward_hook(
        lambda module, inputs, output: seen.__setitem__("z", output[0].detach()))
    tokens = _tokens_with_documents()
    masks = [_expected(row) for row in tokens]
    positions = torch.stack([m[0] for m in masks])
    attention = torch.stack([m[1] for m in masks])
    loss_mask = torch.ones(2, SEQ)
    loss_mask[1, 2] = 0.0
    continues = (tokens != EOD).float()
    lm, nitp, nitp_mask, hidden = nitp_terms(model(tokens, positions, attention, labels=tokens,
                                        loss_mask=loss_mask, document_mask=continues,
                                        return_hidden=True))
    expected_mask = torch.ones(2, SEQ)
    for b, t in ((0, 4), (0, 10), (1, 7), (1, 15), (0, 15), (1, 2)):
        expected_mask[b, t] = 0.0
    assert torch.equal(nitp_mask, expected_mask)
    # the loss by hand from the captured tensors: 1 - cos(P(h_t), z_{t+1}) where the mask is 1
    with torch.no_grad():
        predictions = model.projector(hidden)  # [s, b, h]
        z = seen["z"]
        by_hand = torch.zeros(2, SEQ)
        for b in range(2):
            for t in range(SEQ - 1):
                if expected_mask[b, t]:
                    by_hand[b, t] = 1 - F.cosine_similarity(predictions[t, b], z[t + 1, b], dim=0)
    torch.testing.assert_close(nitp.detach(), by_hand, rtol=1e-5, atol=1e-6)
    # the step's N_nitp counts exactly these positions
    batch = {"loss_mask": loss_mask, CONTINUES_DOCUMENT: continues}
    counts = _global_counts([batch], model.objectives)
    assert counts.tolist() == [loss_mask.sum().item(), expected_mask.sum().item()]
    # allow (no document mask): today's pairs, across documents
    _, nitp_all, mask_all, _ = nitp_terms(model(tokens, positions, attention, labels=tokens,
                                     loss_mask=loss_mask))
    expected_all = loss_mask.clone()
    expected_all[:, -1] = 0.0
    assert torch.equal(mask_all, expected_all)
    torch.testing.assert_close(nitp_all * expected_mask, nitp.detach())
    assert bool((nitp_all[0, [4, 10]] > 0).all())
    assert _global_counts([{"loss_mask": loss_mask}], model.objectives)[1] == expected_all.sum().item()


def test_mock_data_with_the_flags(dist, tmp_path, monkeypatch):
    """megatron-core's mock documents (a run 1, 2, ... ended by EOD) with the three flags: the
    masks are megatron-core's for those tokens, and a run trains on them."""
    from megatron_nitp.training.loop import pretrain

    tokenizer = build_tokenizer("NullTokenizer", None, VOCAB)
    on = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    train, _, _ = build_mock_datasets(tokenizer, SEQ, 1, (64, 0, 0), **on)
    batch = next(MicroBatchIterator(train, 2, eod=tokenizer.eod))
    for b in range(2):
        positions, mask, loss_mask = _expected(batch["tokens"][b])
        assert torch.equal(batch["position_ids"][b], positions)
        assert torch.equal(batch[ATTENTION_MASK][b], mask)
        assert torch.equal(batch["loss_mask"][b] * loss_mask, batch["loss_mask"][b])
    monkeypatch.chdir(tmp_path)
    summary = pretrain(parse_args([
        "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "2", "--lr-warmup-iters", "0",
        "--nitp-target-layer", "1", "--mock-data", "--vocab-size", str(VOCAB), "--no-save",
        "--no-plot", "--no-progress-bar", "--run-dir", str(tmp_path / "run"), *DOCUMENTS]))
    assert summary["lm loss"] > 0 and summary["nitp loss"] > 0


def test_a_checkpoint_from_before_the_flag_resumes_as_allow():
    """Checkpoints saved before ``document_boundary`` was stored trained with ``allow``: they
    resume without it, and a run that masks is told the objective changed."""
    from megatron_nitp.training.checkpoint import CheckpointError, check_compatible, model_meta

    args = tiny_args()
    nitp = {k: v for k, v in args.nitp_config.__dict__.items() if k != "document_boundary"}
    older = {"model": model_meta(args), "nitp": nitp}
    assert check_compatible(older, args) == []
    with pytest.raises(CheckpointError, match="nitp.document_boundary: checkpoint 'allow', "
                                              "this run 'mask'"):
        check_compatible(older, tiny_args(*DOCUMENTS))


class _Group:
    """A stand-in context-parallel group of ``size`` ranks seen from ``rank`` (in-process)."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("cp", [2, 4])
def test_the_document_mask_follows_the_context_parallel_shards(dist, monkeypatch, cp):
    """Each CP rank's slice of the document mask (``step._cp_slice``: megatron-core's slicing of
    the whole batch) is its own tokens' mask at the global positions the sharded shift gives it
    (``local_positions``), so the CP-local NITP masks put together are the unsharded one.
    (Under SP the model gathers the shift's validity over TP to the CP-local length before
    applying the mask, so TP changes nothing here.)"""
    from megatron.core import parallel_state

    from megatron_nitp.nitp.shift import local_positions
    from megatron_nitp.training import step

    tokens = torch.cat([_tokens_with_documents(), _tokens_with_documents().flip(1)], dim=1)
    seq = tokens.shape[1]
    continues = (tokens != EOD).float()
    unsharded = continues.clone()
    unsharded[:, -1] = 0.0  # no t+1
    together = torch.full_like(continues, -1.0)
    # megatron-core 0.19 asks torch.distributed for the group's size and rank
    world_size, get_rank = torch.distributed.get_world_size, torch.distributed.get_rank
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: (
        group.size() if isinstance(group, _Group) else world_size(group)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: (
        group.rank() if isinstance(group, _Group) else get_rank(group)))
    for rank in range(cp):
        monkeypatch.setattr(parallel_state, "get_context_parallel_group",
                            lambda rank=rank: _Group(cp, rank))
        local = step._cp_slice({"tokens": tokens.clone(), CONTINUES_DOCUMENT: continues.clone()})
        positions = local_positions(seq, rank, cp)
        assert torch.equal(local["tokens"], tokens[:, positions])
        assert torch.equal(local[CONTINUES_DOCUMENT], (local["tokens"] != EOD).float())
        valid = (positions + 1 < seq).float()  # shift_targets_sharded's validity
        together[:, positions] = local[CONTINUES_DOCUMENT] * valid
    assert torch.equal(together, unsharded)
