"""The typed run config: one declaration per setting, Megatron-LM's flag names, frozen values,
one pure ``resolve`` for training and ``--dry-run``, and a lossless round trip through JSON
(what a checkpoint stores)."""

import dataclasses
import json

import pytest

from megatron_nitp.config import megatron_lm, ranges
from megatron_nitp.config import (FLAT, GROUPS, ConfigError, RunConfig, complete, preset_config,
                                  resolve, validate)
from megatron_nitp.config.presets import PRESETS
from megatron_nitp.training.arguments import build_parser, field_docs, parse_args

# Megatron-LM's spellings (megatron/training/arguments.py) for the settings both have: renaming
# one breaks every launch script written for Megatron-LM.
MEGATRON_LM_FLAGS = {
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--num-query-groups", "--kv-channels", "--seq-length", "--max-position-embeddings",
    "--vocab-size", "--make-vocab-size-divisible-by", "--untie-embeddings-and-output-weights",
    "--add-qkv-bias", "--rotary-base", "--norm-epsilon", "--init-method-std", "--hidden-dropout",
    "--attention-dropout", "--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size",
    "--moe-shared-expert-intermediate-size", "--moe-layer-freq", "--moe-aux-loss-coeff",
    "--moe-token-dispatcher-type", "--expert-model-parallel-size", "--micro-batch-size",
    "--global-batch-size", "--train-iters", "--seed", "--weight-decay", "--adam-beta1",
    "--adam-beta2", "--adam-eps", "--clip-grad", "--use-distributed-optimizer", "--bf16",
    "--fp16", "--loss-scale", "--initial-loss-scale", "--lr", "--min-lr", "--lr-decay-style",
    "--lr-warmup-iters", "--lr-decay-iters", "--lr-wsd-decay-style", "--lr-wsd-decay-iters",
    "--data-path", "--split", "--tokenizer-model", "--data-cache-path",
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--sequence-parallel",
    "--context-parallel-size", "--num-layers-per-virtual-pipeline-stage",
    "--num-virtual-stages-per-pipeline-rank",
    "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
    "--distributed-backend", "--transformer-impl", "--distributed-timeout-minutes",
    "--eval-interval", "--eval-iters", "--log-interval", "--log-throughput", "--tensorboard-dir",
    "--save", "--save-interval", "--load", "--finetune",
    "--exit-duration-in-mins", "--exit-interval", "--exit-signal-handler", "--exit-signal",
    "--wandb-project", "--wandb-exp-name", "--wandb-save-dir", "--log-memory-to-tensorboard",
    "--timing-log-level", "--log-straggler", "--train-samples", "--lr-warmup-fraction",
    "--lr-warmup-samples", "--lr-decay-samples", "--lr-wsd-decay-samples", "--vocab-file",
    "--merge-file",
}

#: Megatron-LM's flags that state what every model here is (config/megatron_lm.py)
MEGATRON_LM_DESCRIBED = {"--swiglu", "--normalization", "--position-embedding-type",
                         "--disable-bias-linear", "--group-query-attention", "--use-mcore-models",
                         "--rotary-percent", "--ckpt-format"}

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "10", "--lr-warmup-iters", "0"]


def test_every_flag_is_one_field_and_keeps_megatron_lm_names():
    parser = build_parser("moe")
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert MEGATRON_LM_FLAGS <= flags, sorted(MEGATRON_LM_FLAGS - flags)
    dests = {a.dest for a in parser._actions if a.option_strings} - {"help"}
    launch_only = {"preset", "list_presets", "json", "dry_run", "planned_world_size"}
    described = {d.dest for d in megatron_lm.ACCEPTED + megatron_lm.REFUSED + megatron_lm.RENAMED}
    assert MEGATRON_LM_DESCRIBED <= flags
    # no flag without a field, no field without a flag (but the checked Megatron-LM ones)
    assert dests - launch_only - described == set(FLAT)


def test_every_field_has_help_text():
    for cls, _ in GROUPS.values():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, (cls.__name__, missing)


def test_the_config_is_frozen_and_changes_make_a_new_one():
    config = parse_args(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.hidden_size = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.derived = None
    wider = config.replace(hidden_size=64, nitp_target_layer=2)
    assert (config.model.hidden_size, config.nitp_config.target_layer) == (32, 1)
    assert (wider.model.hidden_size, wider.nitp_config.target_layer) == (64, 2)
    with pytest.raises(KeyError, match="unknown setting 'hiden_size'"):
        config.replace(hiden_size=64)


def test_settings_are_read_by_section_and_by_flag_name_only_through_setting():
    config = parse_args(TINY + ["--num-experts", "4", "--no-nitp"], "moe")
    assert config.setting("num_moe_experts") == config.moe.num_moe_experts == 4
    assert config.setting("nitp") is False and config.nitp_config.enabled is False
    assert config.model.ffn_hidden_size == 352  # the preset's
    assert complete(config.replace(ffn_hidden_size=None)).model.ffn_hidden_size == 4 * 32
    with pytest.raises(AttributeError):  # no flat view: components read their section
        config.hidden_size  # noqa: B018
    with pytest.raises(KeyError, match="no setting 'hiden_size'"):
        config.setting("hiden_size")
    assert config.derived is None  # derived values exist after resolve only


def test_resolve_computes_every_derived_value_and_is_pure():
    config = parse_args(TINY + ["--num-experts", "4", "--moe-layer-freq", "[0]*1+[1]*3",
                                "--tensor-model-parallel-size", "2", "--vocab-size", "1000",
                                "--lr-decay-style", "WSD", "--lr-wsd-decay-ratio", "0.3"], "moe")
    before = config.to_dict()
    resolved = resolve(config, 8, tokenizer_vocab_size=900)
    assert config.to_dict() == before and config.derived is None  # the input is untouched
    assert resolved == resolve(config, 8, tokenizer_vocab_size=900)
    d = resolved.derived
    assert (d.world_size, d.data_parallel_size, d.num_microbatches) == (8, 4, 1)
    assert (d.vocab_size, d.padded_vocab_size) == (1000, 1024)  # 128 x TP 2 = 256 | 1024
    assert d.moe_layer_pattern == (0, 1, 1, 1)
    assert (d.lr_decay_iters, d.lr_wsd_decay_iters) == (10, 3)
    assert resolved.derived.vocab_size == 1000 and resolved.model.vocab_size == 1000
    tokenizer_sized = resolve(config.replace(vocab_size=None), 8, tokenizer_vocab_size=900)
    assert (tokenizer_sized.derived.vocab_size, tokenizer_sized.derived.padded_vocab_size) == (900, 1024)


@pytest.mark.parametrize("world,tokens,message", [
    (3, None, "world size 3 is not divisible by TP x PP x CP = 2"),
    (4, None, "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel "
              "size 2 = 4"),
    (8, 2000, "the tokenizer's vocabulary (2000) is larger than --vocab-size 1000"),
])
def test_resolve_refuses_what_cannot_run(world, tokens, message):
    config = parse_args(TINY + ["--tensor-model-parallel-size", "2", "--vocab-size", "1000",
                                "--global-batch-size", "6" if world == 4 else "8"])
    with pytest.raises(ConfigError) as err:
        resolve(config, world, tokens)
    assert message in str(err.value)


def test_short_run_below_the_warmup_names_the_fix():
    with pytest.raises(ConfigError, match=r"--lr-warmup-iters 30 exceeds --lr-decay-iters 10 "
                                          r"\(= --train-iters\): lower it, e.g. "
                                          r"--lr-warmup-iters 1"):
        validate(preset_config("tiny-dense", train_iters=10))


def test_dry_run_plans_with_the_resolved_values(capsys):
    from megatron_nitp.accounting.dry_run import dry_run

    config = parse_args(["--preset", "dense-2b", "--micro-batch-size", "1", "--train-iters", "5000",
                         "--tensor-model-parallel-size", "2", "--world-size", "64", "--dry-run"])
    assert dry_run(config) == 0
    out = capsys.readouterr().out
    resolved = resolve(config, 64)
    assert (f"micro-batch 1 x DP {resolved.derived.data_parallel_size} x "
            f"{resolved.derived.num_microbatches} "
            "micro-batches") in out
    assert f"padded {resolved.derived.padded_vocab_size}" in out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_configs_equal_to_their_flags(name):
    moe = PRESETS[name].get("model_type") == "moe"
    extra = {} if "micro_batch_size" in PRESETS[name] else {"micro_batch_size": 1}
    extra.update({} if "train_iters" in PRESETS[name] else {"train_iters": 5000})
    flags = ["--preset", name] + [x for k, v in extra.items()
                                  for x in ("--" + k.replace("_", "-"), str(v))]
    parsed = parse_args(flags, "moe" if moe else "dense")
    assert preset_config(name, **extra) == parsed
    for key, value in PRESETS[name].items():
        if key in FLAT:
            assert parsed.setting(key) == value, key


def test_json_round_trip_is_lossless():
    config = resolve(parse_args(TINY + ["--num-experts", "4", "--data-path", "0.3", "a", "0.7",
                                        "b", "--tokenizer-model", "t.model"], "moe"), 2)
    text = json.dumps(config.to_dict())
    back = RunConfig.from_dict(json.loads(text))
    assert back == config
    assert back.data.data_path == ("0.3", "a", "0.7", "b")
    assert back.derived.moe_layer_pattern == config.derived.moe_layer_pattern


def test_every_value_says_where_it_came_from():
    config = parse_args(["--num-attention-heads", "8", "--lr", "1e-3"])
    assert config.source("num_attention_heads") == config.source("lr") == "flag"
    assert config.source("num_query_groups") == "preset tiny-dense"
    assert config.source("seed") == "default" and config.source("preset") == "default"
    resolved = resolve(config, 1, 4000)
    assert resolved.source("padded_vocab_size") == "derived"
    assert resolved.source("vocab_size") == "derived"  # the tokenizer's, no flag gave one
    assert RunConfig.from_dict(json.loads(json.dumps(resolved.to_dict()))).sources == \
        config.sources
    from megatron_nitp.training.arguments import kept_preset_fields

    kept = kept_preset_fields(config)
    assert "num_query_groups" in kept and "min_lr" in kept and "lr" not in kept
    assert kept_preset_fields(parse_args(["--preset", "tiny-dense", "--num-layers", "2"])) == []
    assert kept_preset_fields(parse_args(["--train-iters", "50"])) == []  # no model flag


def test_a_value_no_flag_gave_is_named_in_the_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--num-attention-heads", "3"])
    err = capsys.readouterr().err
    assert ("--num-attention-heads 3 is not divisible by --num-query-groups 2 "
            "(--num-query-groups 2 is the preset tiny-dense's value, not a flag you gave") in err
    # a shorter run or a shallower MoE model than the default preset's: the warm-up and the
    # MoE layer pattern no flag gave are named too (they were not)
    with pytest.raises(SystemExit):
        parse_args(["--train-iters", "7"])
    err = capsys.readouterr().err
    assert ("--lr-warmup-iters 30 exceeds --lr-decay-iters 7 (= --train-iters): lower it, e.g. "
            "--lr-warmup-iters 0 for a short run (--lr-warmup-iters 30 is the preset "
            "tiny-dense's value, not a flag you gave") in err
    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "2", "--num-experts", "2"], "moe")
    err = capsys.readouterr().err
    assert ("--moe-layer-freq gives 4 layers, expected 2 entries of 0/1 (--moe-layer-freq "
            "[0]*1+[1]*3 is the preset tiny-moe's value, not a flag you gave") in err


def test_a_run_prints_and_keeps_its_configuration(dist, tmp_path, capsys):
    from megatron_nitp.training.loop import pretrain

    run_dir = tmp_path / "run"
    summary = pretrain(parse_args(TINY + ["--train-iters", "1", "--eval-interval", "0",
                                          "--no-save", "--no-plot", "--no-progress-bar",
                                          "--run-dir", str(run_dir)]))
    out = capsys.readouterr().out
    assert "> no --preset given: the default preset tiny-dense's values apply" in out
    assert "min_lr" in out.split("> no --preset given")[1].split("\n")[0]
    line = next(x for x in out.splitlines() if x.strip().startswith("hidden_size "))
    assert line.split()[2] == "32" and line.split()[-1] == "flag"
    saved = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    assert saved.model.hidden_size == 32 and saved.source("min_lr") == "preset tiny-dense"
    assert summary["preset"].startswith("tiny-dense (default; flags override part of it")


@pytest.mark.parametrize("flags,message", [
    (["--log-interval", "0"], "--log-interval 0 must be >= 1."),  # was a ZeroDivisionError
    (["--log-interval", "-5"], "--log-interval -5 must be >= 1."),  # logged every iteration
    (["--tensorboard-log-interval", "0"], "--tensorboard-log-interval 0 must be >= 1."),
    (["--tensorboard-queue-size", "0"], "--tensorboard-queue-size 0 must be >= 1."),
    (["--eval-interval", "-1"], "--eval-interval -1 must be >= 0 (0: never)."),
    (["--eval-iters", "-1"], "--eval-iters -1 must be >= 0 (0: no validation)."),
    (["--geometry-interval", "-2"], "--geometry-interval -2 must be >= 0 (0: never)."),
    (["--save-interval", "-2"], "--save-interval -2 must be >= 0"),  # saved every 2nd
    (["--save-keep-last", "0"], "--save-keep-last 0 must be >= 1"),
    # deleted the checkpoint just written once it was the only one (own[:-(-1)] = own[:1])
    (["--save-keep-last", "-1"], "--save-keep-last -1 must be >= 1"),
    (["--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval -1 must be >= 0"),
    # each was a traceback before the ranges: a ZeroDivisionError in the checks ...
    (["--num-query-groups", "0"], "--num-query-groups 0 must be >= 1."),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size 0 must be >= 1."),
    (["--context-parallel-size", "0"], "--context-parallel-size 0 must be >= 1."),
    # ... a ValueError in the pipeline split, or a model that could not be built
    (["--pipeline-model-parallel-size", "-1"], "--pipeline-model-parallel-size -1 must be >= 1."),
    (["--hidden-size", "0"], "--hidden-size 0 must be >= 1."),
    (["--seq-length", "0"], "--seq-length 0 must be >= 1."),
    (["--hidden-dropout", "1"], "--hidden-dropout 1.0 must be in [0, 1)."),
    (["--adam-beta2", "1.5"], "--adam-beta2 1.5 must be in [0, 1)."),
    (["--seed", "-1"], "--seed -1 must be >= 0."),
])
def test_numbers_out_of_range_are_refused_at_start_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(TINY + flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def _outside(bounds):
    """Values just outside ``bounds`` (config/ranges.py): below the lowest, and above the
    highest where there is one; the excluded end itself."""
    low, low_in, high, high_in = bounds
    values = [low - 1] if low_in else [low, low - 1]
    if high is not None:
        values.append(high + 0.5)
        if not high_in:
            values.append(high)
    return values


@pytest.mark.parametrize("name", sorted(ranges.RANGES))
def test_every_number_outside_its_range_is_refused_in_one_line(name):
    """Each ranged setting, just outside its range, is refused by complete() (before any
    arithmetic can divide by it) with the flag, the value and the range."""
    bounds = ranges.RANGES[name]
    base = preset_config("tiny-moe" if name.startswith(("moe_", "num_moe")) else "tiny-dense")
    for value in _outside(bounds):
        with pytest.raises(ConfigError) as err:
            complete(base.replace(**{name: value}))
        meaning = f" ({ranges.MEANINGS[name]})" if name in ranges.MEANINGS else ""
        assert str(err.value) == (f"{ranges.flag_of(name)} {value} must be "
                                  f"{ranges.describe(bounds)}{meaning}."), name
