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

DEFAULT_PRESET = "tiny-dense"


def get_preset(name: str) -> dict:
    """The preset's flag defaults; a clear error listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; valid presets: {', '.join(PRESETS)}")
    preset = dict(PRESETS[name])
    preset.pop("description", None)
    return preset
