"""Megatron-LM checkpoints in and out (megatron_nitp/megatron_lm.py, tools/import_checkpoint.py
--megatron, tools/export_checkpoint.py --format megatron).

The Megatron-LM checkpoint is made without Megatron-LM, as its ``checkpointing.py`` writes one
(``generate_state_dict`` + ``dist_checkpointing.save`` into ``iter_%07d``, then the tracker):
megatron-core's plain GPTModel (local spec) under key ``model`` with no prefix, and the common
entries ``args`` (argparse.Namespace), ``iteration``, ``checkpoint_version``."""

import argparse
import json
import os

import pytest
import torch

from tests.helpers import load_tool

VOCAB = 4096  # the built-in corpus's tokenizer: the continued run trains on it
SEQ = 32
FLAGS = ["--nitp-target-layer", "1"]
QUIET = ["--eval-interval", "0", "--no-plot", "--no-progress-bar", "--geometry-interval", "0",
         "--log-interval", "1"]


def _megatron_args(**changes):
    """The args a Megatron-LM ``pretrain_gpt.py`` run of our tiny shape stores (after its
    validate_args: ffn, kv_channels and the padded vocabulary filled in)."""
    fields = dict(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=8, seq_length=SEQ,
        max_position_embeddings=SEQ, padded_vocab_size=VOCAB, vocab_size=None,
        make_vocab_size_divisible_by=128, untie_embeddings_and_output_weights=True,
        add_qkv_bias=True, add_bias_linear=False, swiglu=True, normalization="RMSNorm",
        norm_epsilon=1e-5, position_embedding_type="rope", rotary_base=10000,
        rotary_percent=1.0, qk_layernorm=False, num_experts=None, transformer_impl="local",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, global_batch_size=4,
        micro_batch_size=2, train_iters=20, lr=3e-4, min_lr=3e-5, lr_decay_style="cosine",
        lr_warmup_iters=0, consumed_train_samples=40, ckpt_format="torch_dist",
        tokenizer_type=None, tokenizer_model=None, bf16=False,
    )
    fields.update(changes)
    return argparse.Namespace(**fields)


def _gpt_model(margs):
    """megatron-core's own GPTModel (local spec) of ``margs``' shape, every tensor drawn away
    from its default so that a misplaced one shows."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=margs.num_layers, hidden_size=margs.hidden_size,
        ffn_hidden_size=margs.ffn_hidden_size, num_attention_heads=margs.num_attention_heads,
        num_query_groups=margs.num_query_groups, kv_channels=margs.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=margs.norm_epsilon, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=margs.add_qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        bias_dropout_fusion=False, masked_softmax_fusion=False)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=margs.padded_vocab_size,
                     max_sequence_length=margs.max_position_embeddings,
                     share_embeddings_and_output_weights=not
                     margs.untie_embeddings_and_output_weights,
                     position_embedding_type="rope", rotary_base=margs.rotary_base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    return model.eval()


def _save_megatron_lm(root, margs, model, iteration=10, local_names=False):
    """``root`` as Megatron-LM's save_checkpoint leaves it (torch_dist, no optimizer).
    ``local_names``: the norms under the local spec's own names (a spec without megatron-core's
    TE key map)."""
    from megatron.core import dist_checkpointing

    state = model.sharded_state_dict()
    if local_names:
        for value in state.values():
            value.key = value.key.replace("self_attention.linear_qkv.layer_norm_",
                                          "input_layernorm.").replace(
                "mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    dist_checkpointing.save({"args": margs, "checkpoint_version": 3.0, "iteration": iteration,
                             "model": state, "num_floating_point_operations_so_far": 0}, str(path))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def _logits(model):
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(tokens, torch.arange(24).expand(2, -1), None)  # [b, s, V]


@pytest.mark.parametrize("local_names", [False, True])
def test_import_gives_equal_logits_and_continues_the_iteration(dist, tmp_path, capsys,
                                                               local_names):
    from megatron_nitp.export import load_checkpoint_model
    from megatron_nitp.megatron_lm import continue_command
    from megatron_nitp.training.arguments import parse_args
    from megatron_nitp.training.loop import pretrain

    # the local-names case also covers tied embeddings without QKV bias
    margs = _megatron_args(**(dict(untie_embeddings_and_output_weights=False, add_qkv_bias=False)
                              if local_names else {}))
    gpt = _gpt_model(margs)
    _save_megatron_lm(tmp_path / "mlm", margs, gpt, local_names=local_names)
    ckpt = tmp_path / "ckpt"
    load_tool("import_checkpoint").main(["--megatron", str(tmp_path / "mlm"),
                                         "--save", str(ckpt)] + FLAGS)
    out = capsys.readouterr().out
    assert "iteration 10, 40 samples consumed" in out and "not imported: the optimizer" in out
    assert "--nitp-start-iter 10" in out and f"--load {ckpt}" in out
    meta = json.loads((ckpt / "iter_0000010" / "nitp.json").read_text())
    assert meta["imported_from"] == str(tmp_path / "mlm")
    assert meta["imported_format"] == "megatron-lm" and meta["consumed_samples"] == 40

    ours, config = load_checkpoint_model(str(ckpt))
    ours.eval()
    assert (_logits(ours) - _logits(gpt)).abs().max().item() < 1e-6
    if local_names:
        return

    run_dir = tmp_path / "run"  # the printed command (a later NITP start), two iterations
    command = continue_command(str(ckpt), config, FLAGS + ["--nitp-start-iter", "11"])
    assert command[:4] == ["--load", str(ckpt), "--save", str(ckpt)]
    pretrain(parse_args(command + QUIET + ["--train-iters", "12", "--no-save",
                                           "--run-dir", str(run_dir)]))
    out = capsys.readouterr().out
    assert "resumed from" in out and "at iteration 10 (40 samples consumed)" in out
    assert "the optimizer starts fresh" in out
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    assert [i for i, _ in history["lm loss"]] == [11, 12]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in history["total loss"])


def test_refused_architecture_and_plain_load_say_so_in_one_line(dist, tmp_path):
    from megatron_nitp.training.checkpoint import CheckpointError, find_checkpoint

    margs = _megatron_args()
    _save_megatron_lm(tmp_path / "mlm", _megatron_args(normalization="LayerNorm"),
                      _gpt_model(margs))
    with pytest.raises(SystemExit) as err:
        load_tool("import_checkpoint").main(["--megatron", str(tmp_path / "mlm"),
                                             "--save", str(tmp_path / "ckpt")])
    message = str(err.value)
    assert message.startswith("error: Megatron-LM checkpoint not supported: normalization "
                              "LayerNorm (RMSNorm only)") and "\n" not in message
    with pytest.raises(CheckpointError, match="is a Megatron-LM checkpoint.*--megatron"):
        find_checkpoint(str(tmp_path / "mlm"))


@pytest.mark.parametrize("change, message", [
    (dict(position_embedding_type="learned_absolute"), "position_embedding_type"),
    (dict(add_bias_linear=True), "biases in the linear layers"),
    (dict(swiglu=False), "SwiGLU"),
    (dict(num_experts=8), "mixture of experts"),
])
def test_other_architectures_are_refused(change, message):
    from megatron_nitp.megatron_lm import MegatronFormatError, run_settings

    with pytest.raises(MegatronFormatError, match=message):
        run_settings(_megatron_args(**change))


def test_export_to_megatron_lm_and_back_is_exact(dist, tmp_path):
    """Our checkpoint -> Megatron-LM folder: megatron-core's GPTModel loads it and gives our
    logits; importing it again gives our weights (projector: the same seeded draw) bit for
    bit."""
    from megatron.core import dist_checkpointing

    from megatron_nitp.export import load_checkpoint_model

    margs = _megatron_args()
    _save_megatron_lm(tmp_path / "mlm", margs, _gpt_model(margs))
    load_tool("import_checkpoint").main(["--megatron", str(tmp_path / "mlm"),
                                         "--save", str(tmp_path / "a")] + FLAGS)
    load_tool("export_checkpoint").main(["--load", str(tmp_path / "a"), "--format", "megatron",
                                         "--output", str(tmp_path / "back")])
    back = tmp_path / "back"
    assert (back / "latest_checkpointed_iteration.txt").read_text() == "10"
    common = dist_checkpointing.load_common_state_dict(str(back / "iter_0000010"))
    assert common["iteration"] == 10 and common["checkpoint_version"] == 3.0
    assert common["args"].padded_vocab_size == VOCAB and common["args"].add_qkv_bias
    assert common["args"].consumed_train_samples == 40
    keys = dist_checkpointing.load_tensors_metadata(str(back / "iter_0000010"))
    assert not any(k.startswith("projector.") for k in keys)

    gpt = _gpt_model(margs)
    with torch.no_grad():
        for param in gpt.parameters():
            param.zero_()
    loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()},
                                     str(back / "iter_0000010"))  # as Megatron-LM's load does
    gpt.load_state_dict(loaded["model"])
    ours, _ = load_checkpoint_model(str(tmp_path / "a"))
    ours.eval()
    assert (_logits(gpt) - _logits(ours)).abs().max().item() < 1e-6

    load_tool("import_checkpoint").main(["--megatron", str(back), "--save",
                                         str(tmp_path / "b")] + FLAGS)
    first = {k: v.clone() for k, v in ours.state_dict().items()
             if v is not None and not k.endswith("_extra_state")}
    second, _ = load_checkpoint_model(str(tmp_path / "b"))
    second = {k: v for k, v in second.state_dict().items()
              if v is not None and not k.endswith("_extra_state")}
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert os.path.exists(tmp_path / "b" / "iter_0000010" / "nitp.json")
