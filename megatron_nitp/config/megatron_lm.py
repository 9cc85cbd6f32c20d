"""Megatron-LM's flags that describe the models built here: accepted, or refused with the reason.

A ``pretrain_gpt.py`` command line copied from Megatron-LM spells out the architecture that every
model here already is (Qwen2/Llama-style blocks: SwiGLU, RMSNorm, RoPE, no bias in the linear
layers but the optional QKV bias, grouped-query attention). Such flags change nothing here; they
are accepted so the script runs unchanged. A value that asks for another architecture
(``--normalization LayerNorm``, learned positions, a partial rotary) is refused in one line that
says why, never ignored. The flags that do set something (``--lr-warmup-fraction``,
``--train-samples``, ``--vocab-file`` ...) are ordinary settings of ``config/schema.py``.

The README's "Coming from Megatron-LM" table lists these, the refused ones and our own flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Described:
    """One Megatron-LM flag that states a property of the model or the run.

    ``accepted``: the values that describe what happens here (None: a switch, accepted when
    given); ``refused``: value (or ``True`` for a switch) -> why it cannot run here."""

    flag: str
    means: str
    accepted: Optional[tuple] = None
    refused: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return "megatron_lm_" + self.flag.lstrip("-").replace("-", "_")


_NOT_QWEN = "the models here are Qwen2/Llama-style"

#: Megatron-LM flags accepted because they describe every model here (or change nothing here).
ACCEPTED = (
    Described("--use-mcore-models", "megatron-core's GPTModel: the only model here"),
    Described("--swiglu", "SwiGLU MLP: every model here"),
    Described("--disable-bias-linear",
              "no bias in the linear layers (the QKV bias is --add-qkv-bias): every model here"),
    Described("--group-query-attention",
              "grouped-query attention: --num-query-groups sets the key/value heads (here it "
              "applies with or without this flag)"),
    Described("--normalization", "RMSNorm: every model here", accepted=("RMSNorm",),
              refused={"LayerNorm": f"{_NOT_QWEN} (RMSNorm); LayerNorm is not built here"}),
    Described("--position-embedding-type", "rotary position embeddings (RoPE): every model here",
              accepted=("rope",),
              refused={v: f"{_NOT_QWEN} (RoPE, --rotary-base); {v} positions are not built here"
                       for v in ("learned_absolute", "yarn", "mrope", "relative", "none")}),
    Described("--use-rotary-position-embeddings", "RoPE (Megatron-LM's older spelling)"),
    Described("--no-position-embedding",
              "no learned absolute position embedding (Megatron-LM accepts it only beside "
              "RoPE): every model here"),
    Described("--rotary-percent", "rotary embedding over the whole head dimension",
              accepted=("1.0", "1"),
              refused={"*": "RoPE here rotates the whole head dimension: use --rotary-percent 1.0"}),
    Described("--attention-softmax-in-fp32",
              "the attention softmax in fp32 (megatron-core's fused softmax does it in bf16 "
              "runs; the default attention here computes it in fp32 without the flag)"),
    Described("--no-masked-softmax-fusion", "no effect: the attention path is --attention-backend"),
    Described("--no-bias-swiglu-fusion", "no effect: the linear layers have no bias"),
    Described("--no-bias-dropout-fusion", "no effect: the linear layers have no bias"),
    Described("--ckpt-format", "megatron-core's torch_dist dist-checkpointing: how every "
              "checkpoint here is written", accepted=("torch_dist",),
              refused={"*": "checkpoints here are written in torch_dist (megatron-core's "
                            "dist-checkpointing): use --ckpt-format torch_dist"}),
    Described("--num-workers", "no effect: micro-batches are read in the training process "
              "(the index is cached; a read is a memory-mapped slice)", accepted=("*",)),
    Described("--no-create-attention-mask-in-dataloader",
              "no effect: the data loader builds no attention mask unless "
              "--reset-attention-mask asks for one"),
    Described("--no-mmap-bin-files", "no effect: the .bin files are memory-mapped"),
    Described("--log-timers-to-tensorboard",
              "no effect: the per-phase times (--timing-log-level 1 or 2) go to TensorBoard "
              "whenever they are logged"),
    Described("--check-for-nan-in-loss-and-grad",
              "no effect: every step here checks its losses and gradients for NaN/Inf (one "
              "norm per gradient buffer); --nan-policy says what such a step does"),
    Described("--no-check-for-nan-in-loss-and-grad",
              "no effect: every step here checks its losses and gradients for NaN/Inf (one "
              "norm per gradient buffer, no copy); --nan-policy skip (the default) leaves the "
              "weights untouched by such a step, stop ends the run"),
)

#: Megatron-LM switches that ask for something not built here, with the reason.
REFUSED = (
    Described("--apply-layernorm-1p", "", refused={
        True: f"{_NOT_QWEN} with plain RMSNorm weights; the (1 + gamma) form is not built here"}),
    Described("--squared-relu", "", refused={True: f"{_NOT_QWEN} (SwiGLU MLP)"}),
    Described("--openai-gelu", "", refused={True: f"{_NOT_QWEN} (SwiGLU MLP)"}),
    Described("--quick-geglu", "", refused={True: f"{_NOT_QWEN} (SwiGLU MLP)"}),
    Described("--qk-layernorm", "", refused={
        True: f"{_NOT_QWEN} without a norm on queries and keys (Qwen3's qk-norm is not built "
              "here)"}),
)

#: Flags of old Megatron-LM versions that current Megatron-LM no longer has, with their
#: replacement (a value flag: refused whatever its value).
RENAMED = (
    Described("--virtual-pipeline-model-parallel-size", "", refused={
        "*": "not a Megatron-LM flag (any more): give --num-virtual-stages-per-pipeline-rank V "
             "or --num-layers-per-virtual-pipeline-stage N"}),
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of :data:`ACCEPTED` and :data:`REFUSED` to ``parser``, in one group."""
    group = parser.add_argument_group(
        "Megatron-LM flags that describe these models (accepted so a copied script runs; a "
        "value that asks for another architecture is refused with the reason)")
    for d in ACCEPTED:
        if d.accepted is None:
            group.add_argument(d.flag, dest=d.dest, action="store_true", help=d.means)
        else:
            values = " or ".join(v for v in d.accepted if v != "*") or "any value"
            group.add_argument(d.flag, dest=d.dest, default=None, help=f"{d.means} ({values})")
    for d in REFUSED:
        group.add_argument(d.flag, dest=d.dest, action="store_true",
                           help=f"refused: {d.refused[True]}")
    for d in RENAMED:
        group.add_argument(d.flag, dest=d.dest, default=None, help=f"refused: {d.refused['*']}")


def check(namespace: argparse.Namespace) -> Optional[str]:
    """The one-line refusal of the first Megatron-LM flag that asks for another architecture
    (None when every one given describes what runs here)."""
    for d in ACCEPTED + REFUSED + RENAMED:
        value = getattr(namespace, d.dest, None)
        if value is None or value is False:
            continue
        if value is True:
            if True in d.refused:
                return f"{d.flag}: {d.refused[True]}."
            continue
        if d.accepted and _matches(value, d.accepted):
            continue
        why = d.refused.get(value) or d.refused.get("*")
        if why is None:
            why = f"accepted: {', '.join(d.accepted)}"
        return f"{d.flag} {value}: {why}."
    return None


def _matches(value: str, accepted: tuple) -> bool:
    """``value`` is one of ``accepted`` (``*``: any), numerically for numbers (``1.00``)."""
    if "*" in accepted or value in accepted:
        return True
    try:
        return any(float(value) == float(a) for a in accepted)
    except ValueError:
        return False
