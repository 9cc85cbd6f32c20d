"""Compatibility layer between megatron-core and the machine it runs on.

`apply()` is idempotent and a no-op when CUDA is available: on a GPU nothing is patched.
"""

from megatron_nitp.compat.cpu import apply, is_applied

__all__ = ["apply", "is_applied"]
