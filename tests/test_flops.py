"""FLOPs and parameter accounting (megatron_nitp/accounting/flops.py, parameters.py) and its CLI
(tools/flops_overhead.py)."""

import json
import os
import subprocess
import sys

import pytest

from megatron_nitp.accounting.flops import exact_flops, layer_forward_flops, mtp_flops, paper_flops
from megatron_nitp.accounting.parameters import parameter_counts
from megatron_nitp.accounting.shape import ModelShape
from megatron_nitp.config.presets import PRESETS

from tests.helpers import ROOT, clean_env, load_tool  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "flops_overhead.py")


def _tool(*flags, timeout=120):
    done = subprocess.run([sys.executable, TOOL, *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _printed(x: float) -> str:
    """The paper's precision: 3 significant digits."""
    return f"{x:.2e}"


# ---------------------------------------------------------------------------------------------
# The paper's Appendix G, 9B-A1B MoE
# ---------------------------------------------------------------------------------------------


def test_paper_convention_reproduces_appendix_g_for_the_9b_moe():
    f = paper_flops(PRESETS["moe-9b-a1b"])
    assert _printed(f.nitp) == "1.18e+08"
    assert _printed(f.backbone) == "3.89e+09"
    assert _printed(f.unembedding) == "1.17e+09"
    assert _printed(f.ntp_total) == "5.06e+09"
    assert f"{100 * f.overhead:.1f}%" == "2.3%"
    # the formulas themselves: L (18 d^2 + 18 k d d_e) + 6 V d, 72 d^2 + 18 d
    d, de, k, L, V = 1280, 640, 9, 24, 152064
    assert f.backbone == L * (18 * d**2 + 18 * k * d * de)
    assert f.unembedding == 6 * V * d
    assert f.projector == 72 * d**2 and f.cosine == 18 * d


def test_paper_convention_applies_the_moe_formula_to_every_layer():
    """The 9B's first layer is dense (FFN 10944) but the paper counts it as an MoE layer."""
    preset = PRESETS["moe-9b-a1b"]
    assert preset["moe_layer_freq"] == "[0]*1+[1]*23"
    all_moe = paper_flops(dict(preset, moe_layer_freq=1))
    assert paper_flops(preset).backbone == all_moe.backbone
    # the exact convention counts the dense layer with its real width
    assert exact_flops(preset).backbone != exact_flops(dict(preset, moe_layer_freq=1)).backbone


@pytest.mark.distributed
def test_paper_figures_from_explicit_flags_on_the_cli():
    out = _tool("--num-layers", "24", "--hidden-size", "1280", "--num-attention-heads", "8",
                "--num-query-groups", "4", "--kv-channels", "160", "--seq-length", "8192",
                "--vocab-size", "152064", "--num-moe-experts", "144", "--moe-router-topk", "8",
                "--moe-ffn-hidden-size", "640", "--moe-shared-expert-intermediate-size", "640",
                "--untie-embeddings-and-output-weights", "--json")
    paper = json.loads(out)["models"]["custom"]["paper"]
    assert _printed(paper["ntp_total"]) == "5.06e+09"
    assert _printed(paper["nitp"]) == "1.18e+08"


# ---------------------------------------------------------------------------------------------
# The exact convention, counted by hand
# ---------------------------------------------------------------------------------------------

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            kv_channels=16, ffn_hidden_size=128, seq_length=32, vocab_size=1000)


def test_exact_convention_of_a_tiny_dense_model_by_hand():
    # d = 64, q = 4 x 16 = 64, kv = 2 x 16 = 32, f = 128, s = 32, V = 1000 -> padded 1024.
    # One layer, forward, 2 FLOPs per multiply-add:
    q_proj = 2 * 64 * 64                # 8192
    kv_proj = 2 * 2 * 64 * 32           # 8192
    out_proj = 2 * 64 * 64              # 8192
    scores = 2 * 64 * 32 // 2           # Q K^T over s/2 keys (causal): 2048
    values = 2 * 64 * 32 // 2           # A V: 2048
    mlp = 2 * 3 * 64 * 128              # gate, up, down: 49152
    layer = q_proj + kv_proj + out_proj + scores + values + mlp
    assert layer == 77824
    backbone = 3 * 2 * layer            # training = 3 x forward, 2 layers: 466944
    unembedding = 3 * 2 * 64 * 1024     # 393216 (the input embedding is a lookup)
    projector = 3 * 2 * 3 * 64 * 256    # three d x 4d matrices, fwd + bwd: 294912
    cosine = (6 + 6) * 64               # fwd p.z, p.p, z.z; bwd into p only: 768

    f = exact_flops(TINY)
    assert f.backbone == backbone == 466944
    assert f.unembedding == unembedding == 393216
    assert f.projector == projector and f.cosine == cosine
    assert f.ntp_total == 860160
    assert f.nitp == 295680
    assert f.overhead == pytest.approx(295680 / 860160)

    full = exact_flops(TINY, causal=False)  # the whole s x s square
    assert full.backbone == backbone + 3 * 2 * (scores + values)


def test_exact_convention_of_a_tiny_moe_model_by_hand():
    moe = dict(TINY, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
               moe_shared_expert_intermediate_size=32, moe_layer_freq="[0]*1+[1]*1")
    dense_layer = 77824
    attention = 8192 * 3 + 4096
    routed = 2 * 3 * 64 * 32 * 2        # top-2 experts of width 32: 24576
    shared = 2 * 3 * 64 * 32            # 12288
    router = 2 * 64 * 4                 # 512
    moe_layer = attention + routed + shared + router
    assert layer_forward_flops(ModelShape.from_dict(moe), moe=True) == {
        "attention_linear": 24576.0, "attention_scores": 4096.0, "mlp": 36864.0,
        "router": 512.0}
    assert exact_flops(moe).backbone == 3 * (dense_layer + moe_layer)
    # the paper's convention: MoE formula on both layers, no router, no s term, V unpadded
    paper = paper_flops(moe)
    assert paper.backbone == 2 * (6 * 3 * 64 * 64 + 18 * 64 * (2 * 32 + 32))
    assert paper.unembedding == 6 * 1000 * 64


def test_mtp_flops_by_hand():
    # one more layer + eh_proj (2d -> d) + one more unembedding, x 3
    assert mtp_flops(TINY) == 3 * (77824 + 2 * 2 * 64 * 64 + 2 * 64 * 1024)


def test_parameter_counts_by_hand():
    counts = parameter_counts(TINY)
    embedding = 1024 * 64                          # padded vocabulary
    layer = 2 * 64 + 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128
    assert counts["embedding"] == embedding
    assert counts["total"] == embedding + 2 * layer + 64 == 139584
    assert counts["activated"] == counts["total"]
    assert counts["nitp_projector"] == 12 * 64 * 64

    untied = parameter_counts(dict(TINY, untie_embeddings_and_output_weights=True,
                                   add_qkv_bias=True))
    assert untied["total"] == counts["total"] + embedding + 2 * (64 + 2 * 32)

    moe = parameter_counts(dict(TINY, num_moe_experts=4, moe_router_topk=2,
                                moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
                                moe_layer_freq="[0]*1+[1]*1"))
    expert = 3 * 64 * 32
    moe_layer = 2 * 64 + 64 * 128 + 64 * 64 + 4 * 64 + 4 * expert + expert
    assert moe["total"] == embedding + layer + moe_layer + 64
    assert moe["activated"] == moe["total"] - 2 * expert


def test_parameter_counts_of_the_paper_models_match_their_names():
    billions = {name: (parameter_counts(p)["total"] / 1e9, parameter_counts(p)["activated"] / 1e9)
                for name, p in PRESETS.items()}
    assert billions["moe-9b-a1b"][0] == pytest.approx(9, abs=0.5)
    assert billions["moe-9b-a1b"][1] == pytest.approx(1, abs=0.1)
    assert billions["moe-45b-a5.5b"][0] == pytest.approx(45, abs=1)
    assert billions["moe-45b-a5.5b"][1] == pytest.approx(5.5, abs=0.1)
    assert billions["dense-0.5b"][0] == pytest.approx(0.494, abs=0.001)  # Qwen2-0.5B


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_cli_all_json_lists_every_preset():
    report = json.loads(_tool("--all", "--json"))
    assert set(report["models"]) == set(PRESETS)
    for entry in report["models"].values():
        for convention in ("paper", "exact"):
            f = entry[convention]
            assert f["ntp_total"] == pytest.approx(f["backbone"] + f["unembedding"])
            assert 0 < f["overhead"] < 0.25
        assert entry["parameters"]["activated"] <= entry["parameters"]["total"]


@pytest.mark.distributed
def test_cli_table_prints_both_conventions():
    out = _tool("--preset", "moe-9b-a1b")
    assert "paper convention" in out and "exact convention" in out
    assert out.count("moe-9b-a1b") == 2
    assert "5.06e9" in out and "2.33%" in out


@pytest.mark.distributed
def test_cli_compare_mtp_needs_measure():
    done = subprocess.run([sys.executable, TOOL, "--compare-mtp"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env=clean_env())
    assert done.returncode != 0 and "--compare-mtp needs --measure" in done.stderr


@pytest.mark.distributed
def test_cli_measure_smoke_on_a_very_small_model(capsys):
    """Two timed iterations per arm of a 2-layer d=32 model (a few seconds): the plumbing, not
    the numbers."""
    out = _tool("--measure", "--num-layers", "2", "--hidden-size", "32",
                "--num-attention-heads", "4", "--seq-length", "16", "--measure-iters", "2",
                "--warmup-iters", "1", "--no-memory", "--json")
    result = json.loads(out)
    assert set(result["seconds"]) == {"ntp", "nitp"}
    assert all(len(t) == 2 and min(t) > 0 for t in result["seconds"].values())
    assert result["overhead_exact_causal"] > 0
    # what gpu_check.sh prints from the JSON: the model and kernels that were timed
    tool = load_tool("flops_overhead")
    tool.print_measurement(result)
    printed = capsys.readouterr().out
    assert ("model: tiny-dense, 2 layers, hidden 32, seq 16, micro-batch 2, fp32, NITP layer k "
            "1; layer spec local, attention sdpa") in printed
    assert "NITP vs NTP, analytic (exact)" in printed
