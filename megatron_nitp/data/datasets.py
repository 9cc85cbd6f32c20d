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
import math
import os
import re
from typing import Sequence

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list
from torch.utils.data import Dataset

from megatron_nitp.data.cache import default_cache_root
from megatron_nitp.data.meta import META_SUFFIX, recorded_max_token_id

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
#: With ``--reset-attention-mask``: megatron-core's ``[1, s, s]`` bool mask per sample (True =
#: masked out), ``[b, 1, s, s]`` in a micro-batch.
ATTENTION_MASK = "attention_mask"
#: With ``--nitp-document-boundary mask``: ``[b, s]`` float, 1 where position t+1 belongs to
#: the document of position t (tokens[t] is not EOD), 0 where a new document starts.
CONTINUES_DOCUMENT = "continues_document"
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
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Builds the train, valid and test GPT datasets of one data blend.

    Samples are `seq_length` tokens with `labels` shifted by one. By default documents are
    packed without boundaries: no attention mask is built (the model's causal mask type
    applies), position ids run 0..s-1 and every position has a loss. The three document
    flags are Megatron-LM's, computed by megatron-core (`_get_ltor_masks_and_position_ids`;
    an EOD belongs to the document it ends).

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
        reset_position_ids: Position ids restart at 0 after every EOD.
        reset_attention_mask: Each item carries an `attention_mask` `[1, s, s]` (bool, True =
            masked out) in which a token sees only its own document's earlier tokens.
        eod_mask_loss: `loss_mask` is 0 at the EOD positions.

    Returns:
        The `(train, valid, test)` datasets: `GPTDataset`s, or `BlendedDataset`s for several
        prefixes. An item is a dict of 1-D tensors `tokens`, `labels`, `loss_mask` and
        `position_ids` (plus `dataset_id` in a blend, `attention_mask` with
        `reset_attention_mask`).

    Raises:
        FileNotFoundError: If a `.bin`/`.idx` file of the blend is missing.
        ValueError: If a `.bin` is not the size its `.idx` says, the split builds a split
            without documents, or a token id is outside the tokenizer's vocabulary
            (:func:`check_data`).
    """
    blends = ([_normalize_blend(p) if p else None for p in per_split] if per_split
              else [_normalize_blend(data_prefix)])
    prefixes = [p for blend in blends if blend for p in blend[0]]
    for note in check_data(prefixes, None if per_split else split, num_samples,
                           getattr(tokenizer, "vocab_size", None)):
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"> note: {note}", flush=True)
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
            reset_position_ids=reset_position_ids,
            reset_attention_mask=reset_attention_mask,
            eod_mask_loss=eod_mask_loss,
            create_attention_mask=reset_attention_mask,
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


#: Without a side file, a ``.bin`` up to this size is scanned for its largest token id at start
#: (a second or so); a larger one is not scanned, and the run says so.
SCAN_LIMIT_BYTES = 256 * 2**20
#: The fix named by every data check: the files are remade, not patched.
_REMAKE = "re-run tools/preprocess_data.py to remake it"


def _index(prefix: str):
    """megatron-core's reader of ``<prefix>.idx`` (sizes, pointers, documents; no ``.bin``).

    Raises:
        ValueError: Naming the file and the fix when it is not a complete index (megatron-core
            would fail with a bare ``struct.error`` or numpy message).
    """
    import struct

    from megatron.core.datasets.indexed_dataset import _IndexReader, get_idx_path

    path = get_idx_path(prefix)
    try:
        return _IndexReader(path, multimodal=False)
    except (struct.error, ValueError, AssertionError) as err:
        raise ValueError(f"{path} is not a complete megatron-core index ({err}); copy it again "
                         f"or {_REMAKE}.") from None


def expected_bin_bytes(prefix: str) -> int:
    """The ``.bin`` size the ``.idx`` describes: the last sequence's byte offset plus its
    length in tokens times the token size (0 for no sequence)."""
    index = _index(prefix)
    if len(index) == 0:
        return 0
    return int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size


def check_bin_sizes(prefixes: Sequence[str]) -> None:
    """Fails if a ``.bin`` is not the size its ``.idx`` says: a truncated copy would otherwise
    fail at the first step with a numpy error naming no file, or (cut inside the last
    document) train silently on the wrong tokens.

    Raises:
        ValueError: Naming the file, both sizes and the fix.
    """
    for prefix in prefixes:
        path = prefix + ".bin"
        expected, actual = expected_bin_bytes(prefix), os.path.getsize(path)
        if actual != expected:
            what = "truncated" if actual < expected else "longer than its index"
            raise ValueError(
                f"{path} is {actual:,} bytes but {prefix}.idx describes {expected:,} bytes: the "
                f"file is {what} (an interrupted copy?); copy it again or {_REMAKE}.")


def max_token_id(prefix: str) -> tuple[int | None, str]:
    """The data's largest token id and where it came from: the side file, else a scan of a
    ``.bin`` of at most :data:`SCAN_LIMIT_BYTES`; (None, why) for a larger one without it."""
    import numpy as np

    recorded = recorded_max_token_id(prefix)
    if recorded is not None:
        return recorded, prefix + META_SUFFIX
    path = prefix + ".bin"
    size = os.path.getsize(path)
    if size > SCAN_LIMIT_BYTES:
        return None, (f"{path} has no {META_SUFFIX} side file and is over "
                      f"{SCAN_LIMIT_BYTES // 2**20} MiB, so its token ids were not checked "
                      f"against the tokenizer; {_REMAKE} with its side file")
    if size == 0:
        return -1, path
    tokens = np.memmap(path, dtype=_index(prefix).dtype, mode="r")
    return int(tokens.max()), path


def check_token_ids(prefixes: Sequence[str], vocab_size: int) -> list[str]:
    """Fails if the data holds a token id the tokenizer does not have (data made with a larger
    tokenizer): the embedding lookup would fail at the first step with an IndexError (a
    device-side assert on GPU). Returns notes for the files it could not check.

    Raises:
        ValueError: Naming the file, its largest id, the vocabulary size and the fix.
    """
    notes = []
    for prefix in prefixes:
        largest, source = max_token_id(prefix)
        if largest is None:
            notes.append(source)
        elif largest >= vocab_size:
            raise ValueError(
                f"{prefix}.bin holds token id {largest} (from {source}) but the tokenizer has "
                f"{vocab_size} tokens (ids 0-{vocab_size - 1}): the data was made with another "
                "tokenizer. Pass that tokenizer's --tokenizer-type/--tokenizer-model, or "
                f"{_REMAKE} with this tokenizer.")
    return notes


def _split_matrix(weights: Sequence[float]):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    return convert_split_vector_to_split_matrix(
        parse_and_normalize_split(",".join(f"{w:g}" for w in weights)))


def _empty_split(weights: Sequence[float], counts: dict[str, int]):
    """The first (prefix, split index) that ``weights`` builds without a document, or None.

    megatron-core gives split i of a prefix with n documents the documents
    ``[round(begin_i * n), round(end_i * n))`` (its ``_build_megatron_dataset_splits``)."""
    for prefix, documents in counts.items():
        for i, bounds in enumerate(_split_matrix(weights)):
            if bounds is not None and (int(round(bounds[0] * documents))
                                       == int(round(bounds[1] * documents))):
                return prefix, i
    return None


def working_split(weights: Sequence[float], counts: dict[str, int],
                  num_samples: Sequence[int | None]) -> list[float] | None:
    """A split close to ``weights`` that gives every split it builds a document: a split asked
    for no samples gets share 0 (not built), one asked for samples takes documents from the
    training split. None if there are too few documents for the splits asked for samples."""
    weights = [float(w) for w in weights]
    for _ in range(1000):
        empty = _empty_split(weights, counts)
        if empty is None:
            return weights
        prefix, i = empty
        if not num_samples[i]:
            weights[i] = 0.0
            continue
        step = sum(weights) / counts[prefix]  # about one document's share
        if all(w.is_integer() for w in weights):
            step = float(math.ceil(step))
        if i == 0 or weights[0] - step <= 0:
            return None
        weights[0] -= step
        weights[i] += step
    return None


def check_split(prefixes: Sequence[str], split: str,
                num_samples: tuple[int | None, int | None, int | None]) -> None:
    """Fails early if ``split`` builds a split without a document, whatever it is asked for.

    megatron-core builds every split of nonzero share, even one asked for 0 samples, and
    ``GPTDataset._get_num_epochs`` then loops forever looking for tokens in an empty split: a
    corpus of a few hundred documents with the default ``--split 969,30,1`` would hang at start
    instead of failing.

    Raises:
        ValueError: Naming the split, the prefix, its document count and a ``--split`` that
            works (or, with too few documents, the other fixes).
    """
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    parse_and_normalize_split(split)  # megatron-core's own errors for a malformed split
    weights = [float(w) for w in re.findall(r"[.0-9]+", split)]
    weights += [0.0] * (3 - len(weights))
    counts = {prefix: len(_index(prefix).document_indices) - 1 for prefix in prefixes}
    empty = _empty_split(weights, counts)
    if empty is None:
        return
    prefix, i = empty
    name = ("training", "validation", "test")[i]
    wanted = num_samples[i] or 0
    fixed = working_split(weights, counts, num_samples)
    fix = (f"use --split {','.join(f'{w:g}' for w in fixed)}" if fixed is not None
           else "use more documents")
    raise ValueError(
        f"--split {split} gives the {name} split none of the {counts[prefix]} "
        f"document{'s' if counts[prefix] != 1 else ''} of "
        f"{prefix} (the run asks it for {wanted} samples, and megatron-core would hang "
        f"building an empty split): {fix}, or give the splits their own data "
        "(--train-data-path / --valid-data-path).")


def check_data(prefixes: Sequence[str], split: str | None,
               num_samples: Sequence[int | None], vocab_size: int | None) -> list[str]:
    """Every check of a blend's files that can run before any work: the files are there, each
    ``.bin`` has the size its ``.idx`` says, ``split`` (None: per-split data) gives every split
    it builds documents, and the token ids fit the vocabulary (None: not checked). Returns
    notes on what could not be checked. Raises FileNotFoundError or ValueError naming the fix."""
    check_data_prefixes(prefixes)
    check_bin_sizes(prefixes)
    if split is not None:
        check_split(prefixes, split, tuple(num_samples))
    for prefix in prefixes:
        if len(_index(prefix).document_indices) < 2:  # megatron-core would hang on it
            raise ValueError(f"{prefix} holds no document: {_REMAKE} from a non-empty input.")
    return check_token_ids(prefixes, vocab_size) if vocab_size is not None else []


def requested_samples(train_iters: int, global_batch_size: int, eval_iters: int,
                      eval_interval: int) -> tuple[int, int, int]:
    """Samples a run asks of the (train, valid, test) splits: the test split is never read, and
    the validation split only when the run evaluates."""
    evaluates = eval_interval and eval_iters
    return (train_iters * global_batch_size,
            eval_iters * global_batch_size if evaluates else 0, 0)


def build_mock_datasets(
    tokenizer,
    seq_length: int,
    seed: int,
    num_samples: tuple[int | None, int | None, int | None],
    eval_seed: int | None = EVAL_SEED,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
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
        seq_length, seed, num_samples, eval_seed, reset_position_ids, reset_attention_mask,
            eod_mask_loss: As in :func:`build_datasets`.

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
            reset_position_ids=reset_position_ids,
            reset_attention_mask=reset_attention_mask,
            eod_mask_loss=eod_mask_loss,
            create_attention_mask=reset_attention_mask,
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
    `BATCH_KEYS`, plus `ATTENTION_MASK` `[micro_batch_size, 1, s, s]` when the items carry it
    (`--reset-attention-mask`) and `CONTINUES_DOCUMENT` when `eod` is given; other item keys,
    like a blend's `dataset_id`, are dropped.

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
        eod: The EOD token id, to mark where documents end (`CONTINUES_DOCUMENT`, which stops
            the NITP targets at document boundaries); None: no such key.

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
        eod: int | None = None,
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
        self.eod = eod

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
        keys = BATCH_KEYS + ((ATTENTION_MASK,) if ATTENTION_MASK in samples[0] else ())
        batch = {key: torch.stack([s[key] for s in samples]) for key in keys}
        if self.eod is not None:
            batch[CONTINUES_DOCUMENT] = (batch["tokens"] != self.eod).float()
        return batch
