"""Which documents of an indexed dataset each split holds, as megatron-core assigns them.

Training reads a split through GPTDataset, which mixes documents into samples; what a report or
an evaluation needs is the document list itself (which documents training never sees). Rather
than restate megatron-core's rounding, the split is taken from its own dataset builder.
"""

from __future__ import annotations

import numpy as np


class _KeptIndices:
    """A stand-in for GPTDataset that keeps the document indices the builder gives it."""

    @staticmethod
    def build_low_level_dataset(path, config):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        return IndexedDataset(path)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset):
        from megatron.core.datasets.gpt_dataset import GPTDataset

        return GPTDataset.numel_low_level_dataset(low_level_dataset)

    def __init__(self, dataset, path, indices, num_samples, index_split, config):
        self.indices = np.asarray(indices)

    def __len__(self):
        return len(self.indices)


def document_split(prefix: str, split: str) -> list[np.ndarray | None]:
    """The document indices of each split (train, valid, test) of the indexed dataset at
    ``prefix`` under ``split`` (``"969,30,1"``); None where a split is empty."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.blended_megatron_dataset_config import (
        BlendedMegatronDatasetConfig)

    config = BlendedMegatronDatasetConfig(random_seed=0, sequence_length=1,
                                          blend=([prefix], None), split=split)
    built = BlendedMegatronDatasetBuilder(_KeptIndices, [None] * 3, lambda: True,
                                          config).build()
    return [None if part is None else part.indices for part in built]
