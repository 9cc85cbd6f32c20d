"""Concatenates the indexed datasets (.bin/.idx pairs) of a directory into one dataset.

Example (as Megatron-LM's tools/merge_datasets.py):
    python tools/merge_datasets.py --input out/parts --output-prefix out/corpus_text_document

The datasets are taken in the sorted order of their names, so zero-padded names
(part00000, part00001, ...) merge in their numeric order. Exit code 2: a .bin without its
.idx (or the reverse), no dataset, or datasets of different token dtypes.
"""

import os
import sys

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)

from megatron_nitp.cli import ArgumentParser
from megatron_nitp.data.preprocess import merge_datasets


def dataset_prefixes(directory: str) -> list[str]:
    """The data prefixes of the .bin/.idx pairs in `directory`, sorted by name.

    Raises:
        FileNotFoundError: If a `.bin` lacks its `.idx` or the reverse.
    """
    names = {}
    for entry in os.listdir(directory):
        stem, ext = os.path.splitext(entry)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(directory, entry)):
            names.setdefault(stem, set()).add(ext)
    for stem, exts in names.items():
        if exts != {".bin", ".idx"}:
            missing = ({".bin", ".idx"} - exts).pop()
            raise FileNotFoundError(
                f"{os.path.join(directory, stem + exts.pop())} has no {missing} beside it; "
                "remove it or complete the pair"
            )
    return [os.path.join(directory, stem) for stem in sorted(names)]


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True,
                        help="directory holding the .bin/.idx pairs to merge")
    parser.add_argument("--output-prefix", required=True,
                        help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input} is not a directory")

    try:
        prefixes = dataset_prefixes(args.input)
        if not prefixes:
            raise ValueError(f"no .bin/.idx pairs in {args.input}")
        merge_datasets(prefixes, args.output_prefix)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx")


if __name__ == "__main__":
    main()
