"""Pretrain a dense GPT with Next Implicit Token Prediction (NITP) on megatron-core.

    python pretrain_gpt_nitp.py                      # tiny model on CPU, built-in corpus
    python pretrain_gpt_nitp.py --no-nitp            # the NTP baseline, same data and seed
    torchrun --nproc-per-node 2 pretrain_gpt_nitp.py --tensor-model-parallel-size 2
"""

from megatron_nitp.training.entry import main

if __name__ == "__main__":
    main(model_type="dense")
