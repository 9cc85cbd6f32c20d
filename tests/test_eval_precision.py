"""Evaluation and export compute in fp32 whatever the run trained in (a --bf16 checkpoint used
to be rebuilt as a bf16 model without a word); ``--bf16`` on the tool asks for bf16, and the
tools print which."""

import re

import pytest
import torch

from megatron_nitp.training.arguments import parse_args
from megatron_nitp.training.loop import pretrain
from tests.helpers import TINY_MODEL, TINY_RUN, load_tool

TINY = TINY_MODEL + TINY_RUN + ["--global-batch-size", "2", "--nitp-target-layer", "1",
                                "--train-iters", "1"]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, dist):
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    pretrain(parse_args(TINY + ["--bf16", "--run-dir", str(run_dir)]))
    return str(run_dir / "checkpoints")


def test_a_bf16_checkpoint_is_loaded_in_fp32_unless_asked(bf16_checkpoint):
    from megatron_nitp.export import load_checkpoint_model

    model, config = load_checkpoint_model(bf16_checkpoint)
    assert not config.training.bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    low, low_config = load_checkpoint_model(bf16_checkpoint, bf16=True)
    assert low_config.training.bf16 and low.embedding.word_embeddings.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.named_parameters(), low.named_parameters()):
        assert torch.equal(a.to(b.dtype), b), name  # the same (bf16-rounded) weights


def test_evaluate_representations_prints_its_precision(bf16_checkpoint, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join("In the beginning God created the heaven and the earth. " * 3
                                for _ in range(4)))
    tool = load_tool("evaluate_representations")
    flags = ["--load", bf16_checkpoint, "--text", str(text), "--max-tokens", "256"]
    result = tool.main(flags)
    assert result["precision"] == "fp32 (trained in bf16; --bf16 evaluates in bf16)"
    assert re.search(r"\nprecision +fp32 \(trained in bf16;", capsys.readouterr().out)
    assert tool.main(flags + ["--bf16"])["precision"] == "bf16 (trained in bf16)"
