"""Research kit: tools/compare_runs.py, tools/evaluate_representations.py, tools/lm_eval_bridge.py.

Two tiny runs (NITP and the NTP baseline, 3 iterations) are trained once for the module, in
parallel subprocesses."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, clean_env

TINY = ["--train-iters", "3", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size",
        "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr-warmup-iters", "0",
        "--eval-interval", "2", "--eval-iters", "1", "--geometry-interval", "1"]
METRICS = ("lm loss", "nitp loss", "validation lm loss", "effective rank", "cosine similarity")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"nitp": run folder, "ntp": run folder}, trained at the same time."""
    base = tmp_path_factory.mktemp("research-runs")
    env = clean_env()
    procs = {}
    for kind, flags in (("nitp", []), ("ntp", ["--no-nitp"])):
        run_dir = base / f"{kind}-seed1"
        log = open(base / f"{kind}.log", "w")
        # own session: dist_checkpointing helpers are killed with the group afterwards
        procs[kind] = (subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "pretrain_gpt_nitp.py"), *TINY, *flags,
             "--run-dir", str(run_dir)], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True), run_dir, log)
    for kind, (proc, run_dir, log) in procs.items():
        try:
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
    group = _tool("compare_runs").group_name
    assert group("runs/report/ntp-seed1") == "ntp"
    assert group("runs/report/nitp_s3/") == "nitp"
    assert group("runs/tiny-dense-nitp-20250101-120000") == "tiny-dense-nitp"
    assert group("runs/tiny-dense-ntp-20250101-120000-seed2") == "tiny-dense-ntp"
    assert group("baseline") == "baseline"


def test_compare_runs_writes_plots_and_final_values(runs, tmp_path, capsys):
    tool = _tool("compare_runs")
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
    for label, kind in (("NTP", "ntp"), ("NITP", "nitp")):
        for key in METRICS:
            expected = finals[kind][key]
            if expected is None:  # the NTP baseline has no NITP loss
                assert (label, key) == ("NTP", "nitp loss") and table[label][key] is None
                continue
            got = table[label][key]
            assert got["n"] == 1 and got["std"] == 0.0
            assert _close(got["mean"], expected), (label, key, got, expected)
    for key in ("lm loss", "validation lm loss", "effective rank", "cosine similarity"):
        values = [finals["ntp"][key], finals["nitp"][key]]
        got = table["both"][key]
        assert got["n"] == 2
        assert _close(got["mean"], float(np.mean(values)))
        assert _close(got["std"], float(np.std(values, ddof=1)), rel=1e-4)
        assert f"{got['mean']:.4f} ± {got['std']:.4f}" in printed
    assert table["NTP"]["iterations"] == [3]


def test_compare_runs_falls_back_to_summary_json(runs, tmp_path):
    tool = _tool("compare_runs")
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


def _check_result(result, hidden=32):
    g, p, c = result["geometry"], result["probe"], result["cloze"]
    assert 1.0 <= g["effective_rank"] <= hidden
    assert -1.0 <= g["cosine_similarity"] <= 1.0
    assert g["lm_loss"] > 0 and _close(g["perplexity"], math.exp(g["lm_loss"]))
    assert g["tokens"] > 0
    for key in ("logreg_accuracy", "logreg_train_accuracy", "centroid_accuracy",
                "majority_accuracy"):
        assert 0.0 <= p[key] <= 1.0
    assert 0.0 <= c["accuracy"] <= 1.0 and c["items"] > 0 and c["target_nll"] > 0


def test_evaluate_representations_default_data(dist, runs, tmp_path, capsys):
    tool = _tool("evaluate_representations")
    out = tmp_path / "eval.json"
    result = tool.main(["--load", os.path.join(runs["nitp"], "checkpoints"), "--json", str(out),
                        "--max-tokens", "2048", "--probe-train-per-class", "12",
                        "--probe-test-per-class", "6", "--cloze-max-items", "40"])
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


def test_evaluate_representations_user_files_ntp(dist, runs, tmp_path):
    tool = _tool("evaluate_representations")
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
                        "--probe-file", str(probe), "--seed", "3"])
    assert result["nitp"] is False
    _check_result(result)
    assert result["probe"]["classes"] == ["animal", "city"]
    assert result["probe"]["test_items"] == 2 * 4 and result["probe"]["train_items"] == 2 * 8
    assert result["cloze"]["items"] == 4  # the lines of --text
    assert result["geometry"]["source"] == str(text)


def test_cloze_target_is_first_token_of_final_word():
    from megatron_nitp.data.corpus import prepare_default_corpus
    from megatron_nitp.data.tokenizer import SentencePieceTokenizer
    from megatron_nitp.evaluation import final_word_target, train_document_count

    tok = SentencePieceTokenizer(prepare_default_corpus()[1])
    ids, j = final_word_target(tok, "In the beginning God created the heaven and the earth.")
    assert tok.detokenize(ids[:j]) == "In the beginning God created the heaven and the"
    assert tok.detokenize(ids[j:j + 1]).strip() == "earth"
    assert final_word_target(tok, "Amen.") is None
    assert train_document_count(1189, "969,30,1") == 1152
    assert train_document_count(100, "100,0,0") == 100


# --------------------------------------------------------------------------- lm-eval


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
DOCS = [
    {"context": "In the beginning God created the heaven and the",
     "choices": [" earth", " sword", " camel"], "label": 0, "answer": " earth",
     "text": "In the beginning God created the heaven and the earth."},
    {"context": "The LORD is my", "choices": [" table", " shepherd", " river"], "label": 1,
     "answer": " shepherd", "text": "The LORD is my shepherd; I shall not want."},
    {"context": "Jesus", "choices": [" wept", " sailed"], "label": 0, "answer": " wept",
     "text": "Jesus wept."},
]


def test_lm_eval_bridge_on_a_local_task(dist, runs, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    transformers = pytest.importorskip("transformers")
    import torch

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(body.format(data=data))
    hf = tmp_path / "hf"
    _tool("export_checkpoint").main(["--load", os.path.join(runs["nitp"], "checkpoints"),
                                     "--output", str(hf)])
    bridge = _tool("lm_eval_bridge")
    out = tmp_path / "lm_eval.json"
    results = bridge.main(["--model-dir", str(hf), "--tasks", ",".join(TASKS),
                           "--include-path", str(tasks), "--output", str(out), "--device", "cpu"])
    scores = json.load(open(out))["results"]
    assert 0.0 <= scores["nitp_tiny_mc"]["acc,none"] <= 1.0
    assert scores["nitp_tiny_ppl"]["word_perplexity,none"] > 1.0
    assert scores["nitp_tiny_ppl"]["bits_per_byte,none"] > 0.0
    assert 0.0 <= scores["nitp_tiny_gen"]["exact_match,none"] <= 1.0
    assert results["results"].keys() == scores.keys()

    # The bridge's log-likelihoods are those of the Hugging Face model with our tokenizer.
    from lm_eval.api.instance import Instance

    lm = bridge.make_lm_class()(str(hf), device="cpu")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    context, continuation = "In the beginning God created the heaven and the", " earth"
    request = Instance("loglikelihood", {}, (context, continuation), 0)
    (logprob, _), = lm.loglikelihood([request])
    whole = lm.tok.tokenize(context + continuation)
    n_ctx = len(lm.tok.tokenize(context))
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([whole[:-1]])).logits[0, :, :lm.vocab_size]
    lp = torch.log_softmax(logits.float(), -1)
    expected = sum(float(lp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))
    assert math.isclose(logprob, expected, rel_tol=1e-4, abs_tol=1e-4)

    text = DOCS[1]["text"]
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.tok.eod] + lm.tok.tokenize(text)
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([ids[:-1]])).logits[0, :, :lm.vocab_size]
    lp = torch.log_softmax(logits.float(), -1)
    expected = sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
    assert math.isclose(rolling, expected, rel_tol=1e-4, abs_tol=1e-4)


# --------------------------------------------------------------------------- make_report


def test_make_report_from_tiny_runs(dist, runs, tmp_path):
    results = tmp_path / "results"
    base = os.path.dirname(runs["nitp"])
    _tool("compare_runs").main(["--label", f"NTP={runs['ntp']}", "--label", f"NITP={runs['nitp']}",
                                "--output", str(results / "compare"),
                                "--json", str(results / "compare.json")])
    evaluate = _tool("evaluate_representations")
    for kind in ("ntp", "nitp"):
        evaluate.main(["--load", os.path.join(runs[kind], "checkpoints"), "--json",
                       str(results / f"eval-{kind}-seed1.json"), "--max-tokens", "1024",
                       "--probe-train-per-class", "8", "--probe-test-per-class", "4",
                       "--cloze-max-items", "20"])
    output = tmp_path / "results.md"
    _tool("make_report").main(["--runs", base, "--seeds", "1", "--iters", "3", "--results",
                               str(results), "--output", str(output)])
    text = output.read_text()
    assert (results / "nitp_loss_phases.png").exists()
    assert "](results/compare.png)" in text and "](results/nitp_loss_phases.png)" in text
    ntp_valid = _summary(runs["ntp"])["validation lm loss"]
    assert f"{ntp_valid:.4f} ± 0.0000" in text
    for heading in ("## Results", "## NITP loss phases", "## Reading", "## Per-seed values"):
        assert heading in text
