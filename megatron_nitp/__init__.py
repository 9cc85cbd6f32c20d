"""megatron-nitp: Next Implicit Token Prediction (NITP) pretraining on megatron-core.

The method lives in `megatron_nitp.nitp`; the megatron-core model in `megatron_nitp.models`;
the training loop megatron-core does not ship in `megatron_nitp.training`; the CPU
compatibility layer in `megatron_nitp.compat`.
"""

__version__ = "0.1.0"
