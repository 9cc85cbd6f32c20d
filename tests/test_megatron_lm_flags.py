"""Megatron-LM's command lines run here: its architecture flags (accepted where they describe
our models, refused with the reason where they do not), its sample-based schedule and warm-up
fraction (equal to its own scheduler's learning rates), and GPT2BPETokenizer from
``--vocab-file``/``--merge-file`` (equal to GPT-2's reference byte-pair encoder)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, clean_env

#: Megatron-LM's way of writing the dense-0.5b model (Qwen2-0.5B's shape), as its
#: examples/llama script writes a model: architecture, sample-based schedule, torch_dist.
MEGATRON_LM_0_5B = [
    "--use-mcore-models", "--num-layers", "24", "--hidden-size", "896",
    "--ffn-hidden-size", "4864", "--num-attention-heads", "14", "--group-query-attention",
    "--num-query-groups", "2", "--kv-channels", "64", "--seq-length", "8192",
    "--max-position-embeddings", "8192", "--position-embedding-type", "rope",
    "--rotary-percent", "1.0", "--swiglu", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--add-qkv-bias", "--attention-dropout", "0.0",
    "--hidden-dropout", "0.0", "--init-method-std", "0.02", "--attention-softmax-in-fp32",
    "--micro-batch-size", "1", "--global-batch-size", "512", "--train-samples", "5120000",
    "--lr-decay-samples", "5120000", "--lr-warmup-fraction", "0.01", "--lr", "4.2e-4",
    "--lr-decay-style", "WSD", "--clip-grad", "1.0", "--weight-decay", "0.1",
    "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--bf16", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "152064", "--num-workers", "2",
    "--no-create-attention-mask-in-dataloader", "--ckpt-format", "torch_dist",
    "--nitp-target-layer", "5",
]


def _parse(argv):
    from megatron_nitp.training.arguments import parse_args

    return parse_args(argv)


def test_a_megatron_lm_command_line_is_the_dense_0_5b_model():
    from megatron_nitp.config import preset_config
    from megatron_nitp.accounting.parameters import parameter_counts

    config = _parse(MEGATRON_LM_0_5B)
    preset = preset_config("dense-0.5b")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "seq_length", "add_qkv_bias",
                 "untie_embeddings_and_output_weights", "vocab_size", "nitp_target_layer"):
        assert config.setting(name) == preset.setting(name), name
    assert config.training.train_iters == 5120000 // 512 == 10000
    assert config.schedule.lr_warmup_iters == 100  # 0.01 of the 10,000 decay iterations
    total = parameter_counts(config.flat())["total"]
    assert total == parameter_counts(preset.flat())["total"]
    assert 0.49e9 < total < 0.5e9  # the paper's "0.5B" (Qwen2-0.5B: 494M)


def test_the_flags_of_megatron_lms_llama_and_mixtral_recipes_are_accepted():
    """Megatron-LM's own recipes give --no-position-embedding beside RoPE (refused here until
    2026-12-04: "a model without positions"), and performance runs
    --no-check-for-nan-in-loss-and-grad and --manual-gc: the same model and run, the switches
    that have a meaning here set."""
    plain = _parse(MEGATRON_LM_0_5B)
    recipe = _parse(MEGATRON_LM_0_5B + [
        "--use-rotary-position-embeddings", "--no-position-embedding",
        "--no-check-for-nan-in-loss-and-grad", "--manual-gc", "--manual-gc-interval", "100",
        "--log-timers-to-tensorboard", "--tensorboard-log-interval", "10"])
    assert recipe.model == plain.model and recipe.nitp_config == plain.nitp_config
    assert recipe.training.nan_policy == plain.training.nan_policy == "skip"
    assert (recipe.training.manual_gc, recipe.training.manual_gc_interval) == (True, 100)
    assert recipe.logging.tensorboard_log_interval == 10


@pytest.mark.parametrize("flags, says", [
    (["--normalization", "LayerNorm"], "RMSNorm"),
    (["--position-embedding-type", "learned_absolute"], "RoPE"),
    (["--position-embedding-type", "none"], "RoPE"),
    (["--rotary-percent", "0.5"], "whole head dimension"),
    (["--apply-layernorm-1p"], "(1 + gamma)"),
    (["--squared-relu"], "SwiGLU"),
    (["--qk-layernorm"], "queries and keys"),
    (["--ckpt-format", "torch"], "torch_dist"),
    (["--train-iters", "10"], "--train-samples and --train-iters"),
    (["--lr-warmup-iters", "10"], "--lr-warmup-fraction and --lr-warmup-iters"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json"], "--merge-file"),
    (["--vocab-file", "v.json", "--merge-file", "m.txt"], "GPT2BPETokenizer's files"),
])
def test_flags_asking_for_another_model_are_refused_in_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(MEGATRON_LM_0_5B + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("style", ["cosine", "linear", "WSD"])
def test_the_sample_based_schedule_equals_megatron_lms(style):
    """Megatron-LM steps its scheduler by the global batch over sample counts; here the counts
    become iterations. The learning rate of every iteration is the same (the counts are
    multiples of the global batch), warm-up fraction included."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_nitp.config import resolve
    from megatron_nitp.training.optimizer import build_scheduler

    gbs, train, decay, wsd, fraction = 8, 960, 800, 160, 0.1
    config = resolve(_parse([
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "8", "--global-batch-size", str(gbs),
        "--train-samples", str(train), "--lr-decay-samples", str(decay),
        "--lr-wsd-decay-samples", str(wsd), "--lr-warmup-fraction", str(fraction),
        "--lr", "1e-3", "--min-lr", "1e-5", "--lr-decay-style", style, "--nitp-target-layer",
        "1"]), 1, 128)
    assert (config.training.train_iters, config.derived.lr_decay_iters, config.derived.lr_wsd_decay_iters,
            config.schedule.lr_warmup_iters) == (120, 100, 20, 10)

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)

    ours = build_scheduler(optimizer(), config.training, config.schedule, config.derived)
    theirs = OptimizerParamScheduler(  # megatron/training/training.py, with --train-samples
        optimizer(), init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=fraction * decay,
        lr_decay_steps=decay, lr_decay_style=style, start_wd=0.1, end_wd=0.1,
        wd_incr_steps=train, wd_incr_style="constant", wsd_decay_steps=wsd,
        lr_wsd_decay_style="linear")
    lrs = []
    for _ in range(config.training.train_iters):
        ours.step(increment=1)
        theirs.step(increment=gbs)
        a, b = ours.optimizer.param_groups[0]["lr"], theirs.optimizer.param_groups[0]["lr"]
        assert a == pytest.approx(b, rel=1e-12, abs=1e-18)
        lrs.append(a)
    assert lrs[4] == pytest.approx(1e-3 * 5 / 10)  # warm-up: 5 of 10 iterations
    assert lrs[-1] == pytest.approx(1e-5)


# GPT-2's reference byte-pair encoder (OpenAI's encoder.py, which Megatron-LM's
# gpt2_tokenization.py copies): bytes -> printable characters, the regex split, greedy merges.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode() -> dict:
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _reference_encode(text: str, vocab: dict, merges: list) -> list:
    import regex

    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    byte_char = _bytes_to_unicode()
    ids = []
    for piece in regex.findall(_GPT2_SPLIT, text):
        word = [byte_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(word, word[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = word[i], word[i + 1]
            merged, j = [], 0
            while j < len(word):  # merge every occurrence of the pair, left to right
                if j < len(word) - 1 and word[j] == first and word[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            word = merged
        ids += [vocab[token] for token in word]
    return ids


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A small GPT-2-style vocab.json + merges.txt (byte-level BPE with <|endoftext|>)."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    texts = ["In the beginning God created the heaven and the earth.",
             "And the earth was without form, and void; and darkness was upon the deep.",
             "Numbers 1234 and résumé, naïve ✓ — code: x = f(y) + 2"] * 40
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=420, special_tokens=["<|endoftext|>"])
    tokenizer.save_model(str(folder))
    return {"vocab": str(folder / "vocab.json"), "merges": str(folder / "merges.txt"),
            "texts": texts, "folder": folder}


def test_gpt2_bpe_tokenizer_equals_gpt2s_reference_encoder(gpt2_files, tmp_path, monkeypatch):
    from megatron_nitp.data.tokenizer import build_tokenizer

    monkeypatch.setenv("MEGATRON_NITP_CACHE", str(tmp_path))
    tokenizer = build_tokenizer("GPT2BPETokenizer", gpt2_files["vocab"], None,
                                merge_file=gpt2_files["merges"])
    with open(gpt2_files["vocab"], encoding="utf-8") as f:
        vocab = json.load(f)
    with open(gpt2_files["merges"], encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    assert tokenizer.vocab_size == len(vocab)  # Megatron-LM's: len(encoder)
    assert tokenizer.eod == vocab["<|endoftext|>"]
    for text in ["In the beginning", " darkness  was\n\nupon ✓ 12345 résumé's",
                 "unseen: zebra quartz 😀", "x = f(y)  + 2\t\tend"]:
        ids = tokenizer.tokenize(text)
        assert ids == _reference_encode(text, vocab, merges), text
        assert tokenizer.detokenize(ids) == text
    again = build_tokenizer("GPT2BPETokenizer", gpt2_files["vocab"], None,
                            merge_file=gpt2_files["merges"])
    assert len(os.listdir(tmp_path / "tokenizers")) == 1 and again.vocab_size == len(vocab)


@pytest.mark.distributed
def test_megatron_lm_line_preprocesses_and_trains_on_cpu(gpt2_files, tmp_path):
    """Megatron-LM's preprocess and pretrain command lines (GPT2BPETokenizer, the architecture
    flags, --train-samples, --lr-warmup-fraction), shrunk: the tools read them as Megatron-LM
    does and a tiny model trains."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n"
                              for i, t in enumerate(gpt2_files["texts"] * 2)))
    env = clean_env(MEGATRON_NITP_CACHE=str(tmp_path / "cache"))
    prep = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(corpus),
                           "--output-prefix", str(tmp_path / "data"), "--tokenizer-type",
                           "GPT2BPETokenizer", "--vocab-file", gpt2_files["vocab"],
                           "--merge-file", gpt2_files["merges"]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    shrunk = {"--num-layers": "2", "--hidden-size": "64", "--ffn-hidden-size": "128",
              "--num-attention-heads": "4", "--num-query-groups": "2", "--kv-channels": "16",
              "--seq-length": "32", "--max-position-embeddings": "32",
              "--global-batch-size": "4", "--micro-batch-size": "2", "--train-samples": "16",
              "--lr-decay-samples": "16", "--lr-warmup-fraction": "0.25",
              "--nitp-target-layer": "1"}
    argv = list(MEGATRON_LM_0_5B)
    for flag, value in shrunk.items():
        argv[argv.index(flag) + 1] = value
    for flag in ("--mock-data", "--bf16"):  # real data; fp32 keeps the CPU run quick
        argv.remove(flag)
    at = argv.index("--tokenizer-type")
    del argv[at:at + 4]  # NullTokenizer, --vocab-size
    argv += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files["vocab"],
             "--merge-file", gpt2_files["merges"], "--data-path", str(tmp_path / "data_text_document"),
             "--split", "98,2,0", "--log-interval", "1", "--eval-interval", "2",
             "--eval-iters", "1", "--save-interval", "2", "--save", str(tmp_path / "ckpt"),
             "--run-dir", str(tmp_path / "run"), "--data-cache-path", str(tmp_path / "index"),
             "--no-plot", "--no-progress-bar"]
    proc = subprocess.run([sys.executable, "pretrain_gpt_nitp.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "run" / "summary.json") as f:
        summary = json.load(f)
    assert summary["summary"]["iterations"] == 4, summary["summary"]
    assert summary["history"]["learning rate"][0] == [1, 4.2e-4]  # warm-up: 0.25 of 4 iterations
    with open(gpt2_files["vocab"], encoding="utf-8") as f:
        assert f"vocab {len(json.load(f))}" in proc.stdout
    assert (tmp_path / "ckpt" / "iter_0000004").is_dir()


def test_the_readme_table_names_every_checked_flag():
    from megatron_nitp.config import megatron_lm

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Coming from Megatron-LM"):text.index("## Presets")]
    missing = [d.flag for d in megatron_lm.ACCEPTED + megatron_lm.REFUSED + megatron_lm.RENAMED
               if d.flag not in section]
    assert not missing, missing
