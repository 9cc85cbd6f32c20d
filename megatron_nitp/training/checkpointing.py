"""Checkpoints with megatron-core's ``dist_checkpointing`` (sharded: any layout can reload).

Layout of ``--save DIR``::

    DIR/iter_0000300/           dist_checkpointing folder: model (projector included), optimizer
    DIR/iter_0000300/nitp.json  iteration, model flags and NITP config (human-readable)
    DIR/latest_checkpointed_iteration.txt   written last, by rank 0, after every rank finished
"""

from __future__ import annotations

import json
import os

import torch
from megatron.core import dist_checkpointing

from megatron_nitp.training.model import unwrap

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "seq_length", "padded_vocab_size",
               "untie_embeddings_and_output_weights", "add_qkv_bias", "rotary_base")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, args) -> str:
    """Writes model and optimizer shards from every rank, then moves the tracker."""
    path = checkpoint_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    model_sd = unwrap(model).sharded_state_dict(prefix="model.")
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
    }
    dist_checkpointing.save(state, path)
    torch.distributed.barrier()
    if rank == 0:
        meta = {
            "iteration": iteration,
            "model": {k: getattr(args, k) for k in MODEL_FLAGS},
            "nitp": args.nitp_config.__dict__,
        }
        with open(os.path.join(path, "nitp.json"), "w") as f:
            json.dump(meta, f, indent=2)
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER))
    torch.distributed.barrier()
    return path


def load_model_weights(root: str, model) -> int:
    """Loads the model weights of the latest checkpoint under ``root`` into ``model`` (any
    TP/PP layout); returns its iteration."""
    with open(os.path.join(root, TRACKER)) as f:
        iteration = int(f.read().strip())
    path = checkpoint_dir(root, iteration)
    inner = unwrap(model)
    sharded = {"model": inner.sharded_state_dict(prefix="model.")}
    loaded = dist_checkpointing.load(sharded, path, strict="assume_ok_unexpected")
    inner.load_state_dict({k[len("model."):]: v for k, v in loaded["model"].items()}, strict=False)
    return iteration
