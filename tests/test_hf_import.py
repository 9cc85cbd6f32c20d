"""Hugging Face import (megatron_nitp/hf.py, tools/import_checkpoint.py): a tiny Llama and a tiny
Qwen2 made with transformers give our model the same logits, continue pretraining with NITP
from the imported checkpoint (--finetune), and export -> import is exact both ways."""

import json

import pytest
import torch

from tests.helpers import load_tool

transformers = pytest.importorskip("transformers")

VOCAB = 4096  # the built-in corpus's tokenizer: the finetune run trains on it
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
VARIANTS = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False, rms_norm_eps=1e-5,
                                             rope_theta=1000000.0)),
}
TRAIN = ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr-warmup-iters", "0", "--nitp-target-layer", "1", "--eval-interval", "0",
         "--no-plot", "--no-progress-bar", "--geometry-interval", "0", "--log-interval", "1"]


def _tiny_hf(tmp_path, variant):
    """A tiny random HF model saved to ``tmp_path/hf-<variant>``; every tensor (biases and
    norms too) drawn away from its default so that a misplaced one shows."""
    cls, extra = VARIANTS[variant]
    config = cls(**SHAPE, **extra)
    if hasattr(config, "rope_parameters") and "rope_theta" in extra:
        config.rope_parameters = {"rope_type": "default", "rope_theta": extra["rope_theta"]}
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    folder = tmp_path / f"hf-{variant}"
    model.save_pretrained(folder)
    return model, folder


def _logits(ours, hf):
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours(tokens, torch.arange(24).expand(2, -1), None)  # [b, s, V]
        theirs = hf(input_ids=tokens).logits
    return mine, theirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_gives_equal_logits_and_continues_pretraining(dist, tmp_path, capsys, variant):
    from megatron_nitp.export import load_checkpoint_model
    from megatron_nitp.hf import continue_flags
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.loop import pretrain

    hf, folder = _tiny_hf(tmp_path, variant)
    ckpt = tmp_path / "ckpt"
    load_tool("import_checkpoint").main(["--hf", str(folder), "--save", str(ckpt),
                                         "--nitp-target-layer", "1"])
    out = capsys.readouterr().out
    assert "--finetune" in out and "iteration 0" in out
    # the folder has no tokenizer: the command asks for the model's own
    assert "--nitp-target-layer 1 --tokenizer-type TYPE --tokenizer-model MODEL --data-path" in out
    meta = json.loads((ckpt / "iter_0000000" / "nitp.json").read_text())
    assert meta["iteration"] == 0 and meta["imported_from"] == str(folder)
    assert meta["config"]["model"]["add_qkv_bias"] == (variant == "qwen2")

    ours, config = load_checkpoint_model(str(ckpt))
    ours.eval()
    assert sum(p.numel() for p in ours.projector.parameters()) == 12 * 32 ** 2
    mine, theirs = _logits(ours, hf)
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() < 1e-4

    run_dir = tmp_path / "run"
    summary = pretrain(parse_args(TRAIN + continue_flags(config) + [
        "--load", str(ckpt), "--finetune", "--train-iters", "3", "--no-save",
        "--run-dir", str(run_dir)]))
    out = capsys.readouterr().out
    assert f"imported from Hugging Face {folder}" in out
    assert "training starts at iteration 0" in out
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    assert [i for i, _ in history["lm loss"]] == [1, 2, 3]
    assert [i for i, _ in history["nitp loss"]] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in history["total loss"])
    assert summary["lm loss"] is not None


def test_imported_checkpoint_without_finetune_is_refused(dist, tmp_path):
    from megatron_nitp.hf import continue_flags
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.loop import UsageError, pretrain

    from megatron_nitp.hf import import_checkpoint

    _, folder = _tiny_hf(tmp_path, "llama")
    _, config = import_checkpoint(str(folder), str(tmp_path / "ckpt"), ["--nitp-target-layer", "1"])
    with pytest.raises(UsageError, match="load it with --finetune"):
        pretrain(parse_args(TRAIN + continue_flags(config) + [
            "--load", str(tmp_path / "ckpt"), "--train-iters", "1", "--no-save",
            "--run-dir", str(tmp_path / "run")]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_import_round_trip_is_exact(dist, tmp_path, variant):
    """HF -> import -> export gives the HF tensors bit for bit; importing that export again
    gives our first import's state (projector included: the same seeded draw) bit for bit."""
    from safetensors.torch import load_file

    from megatron_nitp.export import load_checkpoint_model

    hf, folder = _tiny_hf(tmp_path, variant)
    load_tool("import_checkpoint").main(["--hf", str(folder), "--save", str(tmp_path / "a")])
    load_tool("export_checkpoint").main(["--load", str(tmp_path / "a"),
                                         "--output", str(tmp_path / "exported")])
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    original = load_file(folder / "model.safetensors")
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name

    load_tool("import_checkpoint").main(["--hf", str(tmp_path / "exported"),
                                         "--save", str(tmp_path / "b")])
    first, _ = load_checkpoint_model(str(tmp_path / "a"))
    first = {k: v.clone() for k, v in first.state_dict().items() if v is not None
             and not k.endswith("_extra_state")}
    second, _ = load_checkpoint_model(str(tmp_path / "b"))
    second = {k: v for k, v in second.state_dict().items() if v is not None
              and not k.endswith("_extra_state")}
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True, model_type="qwen2"), "sliding-window"),
    (dict(model_type="qwen2_moe"), "mixture-of-experts import is not supported"),
    (dict(model_type="mistral"), "only llama and qwen2"),
])
def test_unsupported_features_are_refused(change, message):
    from megatron_nitp.hf import HFFormatError, run_settings

    config = dict(model_type="llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  rope_theta=10000.0, rms_norm_eps=1e-6)
    config.update(change)
    with pytest.raises(HFFormatError, match=message):
        run_settings(config)


def test_model_flags_are_taken_from_config_json_only(tmp_path):
    from megatron_nitp.hf import HFFormatError, import_checkpoint

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, vocab_size=VOCAB)))
    with pytest.raises(HFFormatError, match="--hidden-size.*config.json"):
        import_checkpoint(str(folder), str(tmp_path / "ckpt"), ["--hidden-size", "64"])


def test_vocabulary_needs_no_padding_where_tp_divides_it():
    from megatron_nitp.config import padded_vocab
    from megatron_nitp.hf import vocab_divisor

    for vocab, tp in ((151936, 1), (151936, 2), (151936, 8), (32000, 4), (4096, 2)):
        assert padded_vocab(vocab, vocab_divisor(vocab, tp), tp) == vocab
    assert vocab_divisor(32001, 1) == 1


def test_rope_base_and_norm_epsilon_are_compared_when_the_checkpoint_stores_them():
    """An imported Qwen2 (RoPE base 1e6) loaded without --rotary-base would run with another
    rotation: refused. Checkpoints saved before these fields were stored still load."""
    from megatron_nitp.training.checkpoint import CheckpointError, check_compatible, model_meta
    from tests.helpers import tiny_args

    args = tiny_args()
    meta = {"model": model_meta(args), "nitp": dict(args.nitp_config.__dict__)}
    assert check_compatible(meta, args) == []
    older = {**meta, "model": {k: v for k, v in meta["model"].items()
                               if k not in ("rotary_base", "norm_epsilon")}}
    assert check_compatible(older, args) == []
    changed = {**meta, "model": {**meta["model"], "rotary_base": 1000000}}
    with pytest.raises(CheckpointError, match="model.rotary_base: checkpoint 1000000, this run"):
        check_compatible(changed, args)


def test_the_continue_command_names_the_models_tokenizer(tmp_path):
    """The printed command of tools/import_checkpoint.py carries tokenizer flags: the ones
    given, else the folder's tokenizer.json (Hugging Face) or tokenizer.model (SentencePiece, or
    Llama 2's BOS-first one where tokenizer_config.json adds BOS)."""
    from megatron_nitp.hf import tokenizer_flags

    folder = str(tmp_path)
    assert tokenizer_flags(folder) == ["--tokenizer-type", "TYPE", "--tokenizer-model", "MODEL"]
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert tokenizer_flags(folder) == ["--tokenizer-type", "SentencePieceTokenizer",
                                       "--tokenizer-model", f"{folder}/tokenizer.model"]
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": true}')  # Llama 2's
    assert tokenizer_flags(folder) == ["--tokenizer-type", "Llama2Tokenizer",
                                       "--tokenizer-model", f"{folder}/tokenizer.model"]
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_flags(folder) == ["--tokenizer-type", "HuggingFaceTokenizer",
                                       "--tokenizer-model", folder]
    assert tokenizer_flags(folder, ["--tokenizer-model=tok.model"]) == []
