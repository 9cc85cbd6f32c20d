"""Pretrain a DeepSeek-V2-style mixture-of-experts GPT with NITP on megatron-core.

    python pretrain_moe_nitp.py                                   # tiny MoE on CPU
    python pretrain_moe_nitp.py --list-presets                    # the paper's models
    torchrun --nproc-per-node 2 pretrain_moe_nitp.py --expert-model-parallel-size 2
"""

from megatron_nitp.training.entry import main

if __name__ == "__main__":
    main(model_type="moe")
