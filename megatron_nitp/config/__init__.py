"""The run configuration: typed settings (``schema``), presets as configs, and the checks and
derived values (``resolve``). The command line that fills it is ``training/arguments.py``."""

from megatron_nitp.config.resolve import (DEFAULT_VOCAB_SIZE, ConfigError, complete,
                                          padded_vocab, pipeline_split, read_data_files,
                                          resolve, validate)
from megatron_nitp.config.schema import FLAT, GROUPS, ONE_PROCESS_LAYOUT, Derived, RunConfig

__all__ = ["ConfigError", "DEFAULT_VOCAB_SIZE", "Derived", "FLAT", "GROUPS", "ONE_PROCESS_LAYOUT", "RunConfig",
           "complete", "padded_vocab", "pipeline_split", "preset_config", "read_data_files",
           "resolve", "validate"]


def preset_config(name: str, model_type: str | None = None, **overrides) -> RunConfig:
    """A preset as a complete config, with some settings changed (flat names): what the
    command line gives for ``--preset NAME`` and those flags."""
    from megatron_nitp.config.presets import get_preset

    values = get_preset(name)
    kind = values.pop("model_type", "dense")
    values.update(overrides)
    return complete(RunConfig.from_flat(values, preset=name, model_type=model_type or kind))
