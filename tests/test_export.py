"""Hugging Face export: no projector, the baseline's parameter count, and the same logits."""

import json

import pytest
import torch

from tests.helpers import load_tool, run_training

transformers = pytest.importorskip("transformers")


@pytest.mark.distributed
@pytest.mark.parametrize("variant", [[], ["--add-qkv-bias", "--untie-embeddings-and-output-weights"]])
def test_export_loads_in_transformers_with_equal_logits(dist, tmp_path, variant):
    run = tmp_path / "run"
    run_training(run, "--train-iters", "2", *variant)
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
    assert sum(p.numel() for p in ours.projector.parameters()) == 12 * args.model.hidden_size ** 2

    tokens = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        mine = ours(tokens, positions, None)  # [b, s, V]
        theirs = hf(input_ids=tokens).logits
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() < 1e-4


def test_export_writes_a_tokenizer_that_encodes_like_ours(dist, tmp_path):
    """AutoTokenizer on the exported folder (what lm-eval's own ``hf`` model loads) gives our
    SentencePiece ids: no BOS/EOS added, byte fallback, spaces, digits and newlines kept."""
    from megatron_nitp.config import preset_config
    from megatron_nitp.data.corpus import prepare_default_corpus
    from megatron_nitp.data.tokenizer import build_tokenizer
    from megatron_nitp.export import TOKENIZER_RECORD, export_tokenizer, exported_tokenizer

    _, model_path = prepare_default_corpus()
    out = tmp_path / "hf"
    out.mkdir()
    written = export_tokenizer(preset_config("tiny-dense", tokenizer_model=model_path), str(out))
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
            TOKENIZER_RECORD} <= set(written)
    ours = build_tokenizer("SentencePieceTokenizer", model_path)
    assert exported_tokenizer(str(out)).tokenize("In the beginning") == ours.tokenize(
        "In the beginning")
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    text = ("In the beginning God created the heaven and the earth.\n\nAnd the earth was "
            "without form, and void;  2 Kings 3:14 (1611)\tnaïve café — 日本語 🙂 ")
    assert theirs.encode(text) == ours.tokenize(text)
    assert theirs.decode(ours.tokenize(text)) == text
    assert theirs.eos_token_id == 2 and theirs.pad_token_id == 3


def test_moe_export_loads_as_qwen2_moe_with_equal_logits(dist, tmp_path):
    """The tiny-moe preset (dense first layer, shared expert, top-2 of 8) as
    ``Qwen2MoeForCausalLM``: the same logits. Routers drawn wide so that no token's top-k is a
    near tie that rounding could flip."""
    from megatron_nitp.config import preset_config, resolve
    from megatron_nitp.export import load_checkpoint_model
    from megatron_nitp.models.initialization import initialize_weights
    from megatron_nitp.training.checkpoint import save_checkpoint
    from megatron_nitp.training.model import build_model

    args = resolve(preset_config("tiny-moe", add_qkv_bias=True), 1, 4000)
    model = build_model(args, pre_process=True, post_process=True)
    initialize_weights(model, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.copy_(torch.randn(param.shape, generator=gen))
            elif name.endswith("linear_qkv.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(str(ckpt), 1, model, None, None, args)
    out = tmp_path / "hf"
    load_tool("export_checkpoint").main(["--load", str(ckpt), "--output", str(out)])
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["mlp_only_layers"] == [0] and config["norm_topk_prob"] is True

    ours, _ = load_checkpoint_model(str(ckpt))
    ours.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    gates = [p for n, p in hf.named_parameters() if n.endswith("shared_expert_gate.weight")]
    assert len(gates) == 3  # layers 1-3 (zeros: sigmoid 0.5, the shared down_proj doubled)
    baseline = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("projector."))
    assert sum(p.numel() for p in hf.parameters()) == baseline + sum(g.numel() for g in gates)
    tokens = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours(tokens, torch.arange(24).expand(2, -1), None)
        theirs = hf(input_ids=tokens).logits
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() < 1e-4
