"""Hugging Face export: no projector, the baseline's parameter count, and the same logits."""

import json

import pytest
import torch

from tests.helpers import load_tool
from tests.test_checkpoint import _run

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("variant", [[], ["--add-qkv-bias", "--untie-embeddings-and-output-weights"]])
def test_export_loads_in_transformers_with_equal_logits(dist, tmp_path, variant):
    run = tmp_path / "run"
    _run(run, "--train-iters", "2", *variant)
    ckpt = run / "checkpoints"
    out = tmp_path / "hf"
    tool = load_tool("export_checkpoint")
    tool.main(["--load", str(ckpt), "--output", str(out), "--keep-projector"])
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == (["Qwen2ForCausalLM"] if variant else ["LlamaForCausalLM"])
    assert (out / "nitp_projector.safetensors").exists() and (out / "tokenizer.model").exists()

    from megatron_nitp.export import load_checkpoint_model

    ours, args = load_checkpoint_model(str(ckpt))
    ours.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    hf.eval()
    baseline = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("projector."))
    assert sum(p.numel() for p in hf.parameters()) == baseline
    assert sum(p.numel() for p in ours.projector.parameters()) == 12 * args.hidden_size ** 2

    tokens = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        mine = ours(tokens, positions, None)  # [b, s, V]
        theirs = hf(input_ids=tokens).logits
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() < 1e-4
