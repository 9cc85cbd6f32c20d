"""megatron-nitp: Next Implicit Token Prediction (NITP) pretraining on megatron-core.

The method lives in `megatron_nitp.nitp`; the megatron-core model in `megatron_nitp.models`;
the training loop megatron-core does not ship in `megatron_nitp.training`; the CPU
compatibility layer in `megatron_nitp.compat`.
"""

__version__ = "0.1.0"

import torch as _torch

if not _torch.cuda.is_available():
    from megatron_nitp.compat import cpu as _cpu

    _cpu.install_import_stubs()
    _cpu.quiet_import_warnings()
