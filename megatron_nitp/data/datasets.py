"""Train/valid/test GPT datasets from megatron-core, and Megatron-ordered micro-batches.

Dataset building is delegated to megatron-core's `BlendedMegatronDatasetBuilder`, which
caches its shuffle/sample indices on disk. When torch.distributed is initialized,
megatron-core builds the cache on rank 0 first and the other ranks read it after a
barrier. When it is not (a single process, tests, or ranks that build before
`init_process_group`), megatron-core would let every process write the same cache files
concurrently, so builds are serialized with a file lock in the cache folder instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
from typing import Sequence

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list
from torch.utils.data import Dataset

from megatron_nitp.data.corpus import default_cache_root

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
#: Seed of the validation and test splits' sample order, whatever ``--seed`` is: runs that
#: differ only in their seed are validated on the same batches.
EVAL_SEED = 1234


def _normalize_blend(data_prefix: str | Sequence) -> tuple[list[str], list[float] | None]:
    items = [data_prefix] if isinstance(data_prefix, str) else [str(x) for x in data_prefix]
    if not items:
        raise ValueError("data_prefix is empty")
    return get_blend_from_list(items)


def check_data_prefixes(prefixes: Sequence[str]) -> None:
    """Fails early, with the path and a fix, if a dataset's `.bin` or `.idx` is unusable.

    Args:
        prefixes: Data prefixes, i.e. paths without the `.bin`/`.idx` suffix.

    Raises:
        FileNotFoundError: If a file is missing or unreadable.
    """
    for prefix in prefixes:
        for path in (prefix + ".bin", prefix + ".idx"):
            if os.path.isfile(path) and os.access(path, os.R_OK):
                continue
            hint = ""
            candidates = sorted(glob.glob(glob.escape(prefix) + "_*_document.idx"))
            if candidates:
                hint = f" Did you mean the data prefix {candidates[0][:-len('.idx')]}?"
            raise FileNotFoundError(
                f"dataset file missing or unreadable: {path} (data prefix {prefix!r}).{hint} "
                "Create it with `python tools/preprocess_data.py --input FILE... "
                "[--tokenizer-type TYPE] --tokenizer-model MODEL --output-prefix OUT`, which "
                "writes OUT_text_document.bin/.idx (OUT_<key>_document for --json-keys <key>); "
                "pass OUT_text_document as the data prefix."
            )


@contextlib.contextmanager
def _exclusive_lock(directory: str):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_datasets(
    data_prefix: str | Sequence,
    tokenizer,
    seq_length: int,
    seed: int,
    split: str,
    num_samples: tuple[int | None, int | None, int | None],
    cache_dir: str | None = None,
    per_split: Sequence | None = None,
    eval_seed: int | None = EVAL_SEED,
    build_timeout_minutes: float | None = None,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Builds the train, valid and test GPT datasets of one data blend.

    Samples are `seq_length` tokens with `labels` shifted by one; no attention mask is
    built (the model uses a causal mask type) and position ids are not reset at EOD.

    Args:
        data_prefix: A data prefix, or a list in Megatron's `--data-path` format:
            `[p1, p2, ...]` or `[w1, p1, w2, p2, ...]` with weights.
        tokenizer: A tokenizer with `eod`, `pad` and `vocab_size` (`build_tokenizer`'s); it
            must be the one the data was tokenized with.
        seq_length: Tokens per sample.
        seed: Seed of the document and sample shuffling.
        split: Megatron split string, e.g. `"969,30,1"`: relative shares of the documents
            that go to train, valid and test.
        num_samples: Samples wanted per split; the data is repeated over epochs if needed.
            A split with weight 0 in `split` is returned as None.
        cache_dir: Folder for megatron-core's index cache; defaults to
            `default_cache_root()/dataset-index`.
        per_split: Megatron-LM's `--train/valid/test-data-path`: three blends (each in
            `--data-path` format, or None for no such split) used instead of `data_prefix`
            and `split`.
        eval_seed: Seed of the validation and test splits' sample order (None: `seed`). Fixed
            by default, so runs with different `--seed`s are validated on the same batches.
        build_timeout_minutes: In a job of several ranks, how long the others may wait for
            global rank 0's first build of the index (`--dataset-build-timeout-minutes`;
            `index_cache.rank0_builds_first`). None: megatron-core's own barrier only.

    Returns:
        The `(train, valid, test)` datasets: `GPTDataset`s, or `BlendedDataset`s for several
        prefixes. An item is a dict of 1-D tensors `tokens`, `labels`, `loss_mask` and
        `position_ids` (plus `dataset_id` in a blend).

    Raises:
        FileNotFoundError: If a `.bin`/`.idx` file of the blend is missing.
    """
    blends = ([_normalize_blend(p) if p else None for p in per_split] if per_split
              else [_normalize_blend(data_prefix)])
    prefixes = [p for blend in blends if blend for p in blend[0]]
    check_data_prefixes(prefixes)
    if not per_split:
        check_split(prefixes, split, num_samples)
    cache_dir = cache_dir or os.path.join(default_cache_root(), "dataset-index")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # Without torch.distributed, megatron-core's BlendedDataset calls get_rank() before
    # writing its cache and fails; the blend is then built in memory, and its GPTDataset
    # indices go to megatron-core's default cache folder next to each data prefix.
    blended = any(blend and len(blend[0]) > 1 for blend in blends)
    path_to_cache = cache_dir if distributed or not blended else None

    def build(random_seed: int):
        config = GPTDatasetConfig(
            random_seed=random_seed,
            sequence_length=seq_length,
            blend=None if per_split else blends[0],
            blend_per_split=blends if per_split else None,
            split=None if per_split else split,
            path_to_cache=path_to_cache,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        builder = BlendedMegatronDatasetBuilder(
            GPTDataset, list(num_samples), is_built_on_rank=lambda: True, config=config
        )
        return builder.build()

    def build_all():
        train, valid, test = build(seed)
        if eval_seed is not None and eval_seed != seed:
            _, valid, test = build(eval_seed)
        return train, valid, test

    if distributed and build_timeout_minutes is not None and torch.distributed.get_world_size() > 1:
        from megatron_nitp.data.index_cache import rank0_builds_first

        lock = rank0_builds_first(cache_dir, build_timeout_minutes)
    else:
        lock = contextlib.nullcontext() if distributed else _exclusive_lock(cache_dir)
    with lock:
        return build_all()


def check_split(prefixes: Sequence[str], split: str,
                num_samples: tuple[int | None, int | None, int | None]) -> None:
    """Fails early if ``split`` leaves a split that must give samples without a document.

    megatron-core cuts each prefix's documents at ``round(share * documents)`` (its
    ``_build_megatron_dataset_splits``); a split that gets no document but is asked for samples
    makes ``GPTDataset`` loop forever looking for tokens, so a tiny corpus with the default
    ``--split 969,30,1`` would hang at start instead of failing.

    Raises:
        ValueError: Naming the prefix, its document count and the fix.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        documents = len(IndexedDataset(prefix).document_indices) - 1
        for name, bounds, wanted in zip(("training", "validation", "test"), matrix, num_samples):
            if bounds is None or not wanted:
                continue
            if int(round(bounds[0] * documents)) == int(round(bounds[1] * documents)):
                raise ValueError(
                    f"--split {split} gives the {name} split none of the {documents} documents "
                    f"of {prefix}, and the run needs {wanted} {name} samples: give that split a "
                    "larger share (e.g. --split 80,20,0), use more documents, or give the "
                    "splits their own data (--train-data-path / --valid-data-path)"
                    + (" or --eval-interval 0" if name == "validation" else "") + ".")


def build_mock_datasets(
    tokenizer,
    seq_length: int,
    seed: int,
    num_samples: tuple[int | None, int | None, int | None],
    eval_seed: int | None = EVAL_SEED,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """megatron-core's mock GPT datasets (``--mock-data``): no corpus, no file read or written.

    ``MockGPTLowLevelDataset`` holds 100,000 synthetic documents of 1 to 4095 tokens, each the
    run ``1, 2, 3, ...`` (modulo the vocabulary) ended by EOD; ``MockGPTDataset`` cuts them into
    samples exactly as ``GPTDataset`` cuts a corpus (megatron-core splits the documents 1:1:1
    between train, valid and test). The indices are built in memory (no cache path), so a
    smoke test or a benchmark touches no data or cache folder.

    Args:
        tokenizer: Gives ``vocab_size`` and ``eod`` (e.g. ``build_tokenizer("NullTokenizer",
            None, vocab_size)``).
        seq_length, seed, num_samples, eval_seed: As in :func:`build_datasets`.

    Returns:
        The ``(train, valid, test)`` ``MockGPTDataset``s; items as in :func:`build_datasets`.
    """
    def build(random_seed: int):
        config = GPTDatasetConfig(
            random_seed=random_seed,
            sequence_length=seq_length,
            blend=None,
            blend_per_split=None,
            split=None,
            path_to_cache=None,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        assert config.mock  # megatron-core's rule: no blend is mock data
        builder = BlendedMegatronDatasetBuilder(
            MockGPTDataset, list(num_samples), is_built_on_rank=lambda: True, config=config
        )
        return builder.build()

    train, valid, test = build(seed)
    if eval_seed is not None and eval_seed != seed:
        _, valid, test = build(eval_seed)
    return train, valid, test


class MicroBatchIterator:
    """Yields one data-parallel rank's micro-batches in Megatron's sample order.

    A micro-batch is a dict of `[micro_batch_size, seq_length]` tensors with the keys
    `BATCH_KEYS`; other item keys, like a blend's `dataset_id`, are dropped.

    Megatron's pretraining sampler hands out consecutive dataset indices: at consumed-sample
    counter `c`, rank `r` of `dp_size` gets `[c + r*mbs, c + (r+1)*mbs)` and the counter then
    advances by `mbs * dp_size`. Following the same order makes a run resumable from a
    checkpoint's `consumed_samples` and independent of the data-parallel size.

    Args:
        dataset: A map-style dataset whose items are dicts holding `BATCH_KEYS` tensors,
            e.g. a dataset returned by `build_datasets`.
        micro_batch_size: Samples per micro-batch on each rank.
        data_parallel_rank: This rank's index among the data-parallel ranks.
        data_parallel_size: Number of data-parallel ranks.
        consumed_samples: Samples consumed by all ranks so far, e.g. from a checkpoint.

    Attributes:
        consumed_samples: Samples consumed by all ranks so far, including the micro-batches
            this iterator has yielded.
    """

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
    ) -> None:
        if dataset is None or len(dataset) == 0:
            raise ValueError("dataset is empty; check the split weights and num_samples")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """Returns the next micro-batch, a dict of `[micro_batch_size, seq_length]` tensors.

        Raises:
            StopIteration: When the dataset cannot fill a micro-step on every rank; all
                ranks stop at the same step, so none waits on the others forever.
        """
        step = self.micro_batch_size * self.data_parallel_size
        if self.consumed_samples + step > len(self.dataset):
            raise StopIteration(
                f"dataset exhausted: {self.consumed_samples} of {len(self.dataset)} samples "
                f"consumed, a micro-step needs {step} more; build it with more num_samples"
            )
        start = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        samples = [self.dataset[i] for i in range(start, start + self.micro_batch_size)]
        self.consumed_samples += step
        return {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}
