"""megatron-core models with the NITP objective."""

from megatron_nitp.models.gpt import NITPGPTModel

__all__ = ["NITPGPTModel"]
