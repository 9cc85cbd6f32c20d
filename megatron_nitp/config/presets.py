"""Model presets: the paper's models (Table 4) and tiny CPU models.

A preset fills the defaults of the command-line flags (``--preset NAME``); any flag given on the
command line overrides it. Values are in the flags' own names (``dest`` of argparse).
"""

from __future__ import annotations

PAPER_RECIPE = dict(
    seq_length=8192,
    lr_decay_style="WSD",
    lr_warmup_iters=2000,
    lr_wsd_decay_ratio=0.2,
    weight_decay=0.1,
    adam_beta1=0.9,
    adam_beta2=0.95,
    clip_grad=1.0,
    vocab_size=152064,
    add_qkv_bias=True,
    bf16=True,
)

PRESETS: dict[str, dict] = {
    "tiny-dense": dict(
        description="tiny dense GPT for CPU runs and tests",
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=352,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=128,
        micro_batch_size=8,
        global_batch_size=16,
        train_iters=300,
        lr=3e-3,
        min_lr=3e-4,
        lr_decay_style="WSD",
        lr_warmup_iters=30,
        lr_wsd_decay_ratio=0.2,
        nitp_target_layer=1,
        nitp_loss_weight=1.0,
        eval_interval=100,
        eval_iters=4,
        log_interval=10,
        geometry_interval=20,
    ),
    "dense-0.5b": dict(
        PAPER_RECIPE,
        description="paper dense 0.5B (Qwen2-0.5B shape)",
        num_layers=24,
        hidden_size=896,
        ffn_hidden_size=4864,
        num_attention_heads=14,
        num_query_groups=2,
        kv_channels=64,
        lr=4.2e-4,
        global_batch_size=512,
        nitp_target_layer=5,
        nitp_loss_weight=1.0,
    ),
    "dense-2b": dict(
        PAPER_RECIPE,
        description="paper dense 2B",
        num_layers=28,
        hidden_size=1792,
        ffn_hidden_size=10752,
        num_attention_heads=14,
        num_query_groups=2,
        kv_channels=128,
        lr=4.2e-4,
        global_batch_size=1024,
        nitp_target_layer=6,
        nitp_loss_weight=1.0,
    ),
    "dense-3b": dict(
        PAPER_RECIPE,
        description="paper dense 3B",
        num_layers=28,
        hidden_size=2560,
        ffn_hidden_size=10240,
        num_attention_heads=20,
        num_query_groups=4,
        kv_channels=128,
        lr=4.2e-4,
        global_batch_size=1024,
        nitp_target_layer=6,
        nitp_loss_weight=0.8,
    ),
}


def _moe(description, hidden, layers, heads, groups, head_dim, dense_ffn, experts, topk,
         expert_ffn, lr, gbs, k, lam, **extra):
    """A DeepSeek-V2-style MoE preset: 1 dense layer, then MoE layers with `experts` routed
    SwiGLU experts (top-k) plus one shared expert of the same width; untied embeddings."""
    return dict(
        PAPER_RECIPE,
        description=description,
        model_type="moe",
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=dense_ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=expert_ffn,
        moe_shared_expert_intermediate_size=expert_ffn,
        moe_layer_freq=f"[0]*1+[1]*{layers - 1}",
        untie_embeddings_and_output_weights=True,
        lr=lr,
        global_batch_size=gbs,
        nitp_target_layer=k,
        nitp_loss_weight=lam,
        **extra,
    )


PRESETS.update({
    "tiny-moe": dict(
        PRESETS["tiny-dense"],
        description="tiny DeepSeek-V2-style MoE for CPU runs and tests",
        model_type="moe",
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        moe_shared_expert_intermediate_size=64,
        moe_layer_freq="[0]*1+[1]*3",
        untie_embeddings_and_output_weights=True,
    ),
    "moe-1.9b-a0.3b": _moe("paper MoE 1.9B-A0.3B", 512, 16, 8, 4, 64, 10944, 144, 8, 496,
                           6.0e-4, 256, 3, 1.0),
    "moe-3b-a0.5b": _moe("paper MoE 3B-A0.5B", 768, 17, 8, 4, 96, 10944, 144, 8, 544,
                         8.7e-4, 512, 4, 1.0),
    "moe-9b-a1b": _moe("paper MoE 9B-A1B", 1280, 24, 8, 4, 160, 10944, 144, 8, 640,
                       4.2e-4, 1024, 5, 0.8),
    "moe-45b-a5.5b": _moe("paper MoE 45B-A5.5B (WSD with exponential decay)", 3072, 24, 24, 8,
                          128, 12288, 144, 12, 1408, 2.8e-4, 768, 5, 0.6,
                          lr_wsd_decay_style="exponential"),
})

DEFAULT_PRESET = "tiny-dense"


def moe_layer_pattern(spec: str | list, num_layers: int) -> list[int]:
    """Megatron's ``--moe-layer-freq`` as a per-layer 0/1 list (1 = MoE layer).

    Accepts an int N (every N-th layer is MoE; also as a string, as the command line gives it),
    a list, or Megatron's expression string such as ``"[0]*1+[1]*15"`` (evaluated without
    builtins: only list literals, ``*`` and ``+``).
    """
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec)
    if isinstance(spec, int):
        pattern = [1 if i % spec == 0 else 0 for i in range(num_layers)]
    elif isinstance(spec, str):
        import ast

        tree = ast.parse(spec, mode="eval")
        allowed = (ast.Expression, ast.BinOp, ast.List, ast.Constant, ast.Mult, ast.Add, ast.Load)
        if not all(isinstance(node, allowed) for node in ast.walk(tree)):
            raise ValueError(f"--moe-layer-freq {spec!r}: use an int or e.g. '[0]*1+[1]*15'")
        pattern = eval(compile(tree, "<moe-layer-freq>", "eval"), {"__builtins__": {}})
    else:
        pattern = list(spec)
    if len(pattern) != num_layers or any(p not in (0, 1) for p in pattern):
        raise ValueError(
            f"--moe-layer-freq gives {len(pattern)} layers, expected {num_layers} entries of 0/1"
        )
    return pattern


def get_preset(name: str) -> dict:
    """The preset's flag defaults; a clear error listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; valid presets: {', '.join(PRESETS)}")
    preset = dict(PRESETS[name])
    preset.pop("description", None)
    return preset
