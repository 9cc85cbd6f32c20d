"""megatron-nitp: Next Implicit Token Prediction (NITP) pretraining on megatron-core.

The method lives in `megatron_nitp.nitp`; the megatron-core model in `megatron_nitp.models`;
the training loop megatron-core does not ship in `megatron_nitp.training`; the CPU
compatibility layer in `megatron_nitp.compat`.
"""

__version__ = "0.1.0"

from megatron_nitp.compat import cpu as _cpu
from megatron_nitp.device import has_cuda as _has_cuda

# Before megatron-core is first imported: stub its modules that import triton where triton is
# missing (the CPU wheel of torch), and, without CUDA, silence its "TE/Apex not installed"
# warnings (expected there; on a GPU they are news and stay) and run its torch.compile'd helpers
# eagerly (compat.cpu.skip_megatron_jit).
_cpu.install_import_stubs()
if not _has_cuda():
    _cpu.quiet_import_warnings()
    _cpu.skip_megatron_jit()
