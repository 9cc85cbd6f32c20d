"""Measures preprocessing throughput (tokens/s) with 1, 2 and all CPU workers.

Builds a JSON-lines corpus of at least --size-mb MB by repeating the built-in corpus (the
King James Bible, one chapter per line) in a temporary directory, tokenizes it with the
built-in corpus's tokenizer (or the one --tokenizer-type/--tokenizer-model name, e.g. the
Qwen2 tokenizer.json folder of a real run) and prints tokens/s per worker count and the
speed-up over one worker. It also checks that every run wrote the same bytes. Figures, not a test: they depend
on the machine and on what else runs on it.

Example:
    python tools/preprocess_benchmark.py --size-mb 50
    python tools/preprocess_benchmark.py --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model data/qwen2-tokenizer --workers 1 8 32
"""

import filecmp
import json
import os
import tempfile

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)

from megatron_nitp.cli import ArgumentParser
from megatron_nitp.data import prepare_default_corpus, preprocess_corpus
from megatron_nitp.data.corpus import kjv_chapters
from megatron_nitp.data.tokenizer import TOKENIZER_TYPES


def write_corpus(path: str, size_mb: float) -> tuple[int, int]:
    """Writes copies of the built-in corpus until the file holds `size_mb` MB; returns the
    number of documents and bytes."""
    lines = [json.dumps({"text": chapter}) + "\n" for chapter in kjv_chapters()]
    documents = written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            for line in lines:
                f.write(line)
                written += len(line.encode())
                documents += 1
    return documents, written


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50.0, help="corpus size to build")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to measure (default: 1, 2 and all CPUs)")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                        choices=TOKENIZER_TYPES, help="the tokenizer to measure")
    parser.add_argument("--tokenizer-model", default=None,
                        help="its file or folder (default: the built-in corpus's SentencePiece)")
    parser.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    parser.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = args.workers or sorted({1, 2, cpus})

    model = args.vocab_file or args.tokenizer_model
    if model is None:
        if args.tokenizer_type != "SentencePieceTokenizer":
            parser.error(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model "
                         "(GPT2BPETokenizer: --vocab-file and --merge-file)")
        _, model = prepare_default_corpus()
    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        documents, size = write_corpus(corpus, args.size_mb)
        print(f"corpus: {documents:,} documents, {size / 1e6:.1f} MB; {cpus} CPUs; "
              f"partitions {args.partitions}; {args.tokenizer_type} {model}", flush=True)
        rates = {}
        for workers in counts:
            result = preprocess_corpus([corpus], model, os.path.join(tmp, f"w{workers}"),
                                       workers=workers, partitions=args.partitions,
                                       tokenizer_type=args.tokenizer_type,
                                       merge_file=args.merge_file)
            rates[workers] = result.tokens / result.seconds
            print(f"workers {workers:3d}: {result.tokens:,} tokens in {result.seconds:6.1f} s = "
                  f"{rates[workers]:12,.0f} tokens/s  ({result.documents / result.seconds:,.0f} "
                  f"docs/s, {size / 1e6 / result.seconds:.1f} MB/s)", flush=True)
        prefixes = [os.path.join(tmp, f"w{w}_text_document") for w in counts]
        identical = all(filecmp.cmp(prefixes[0] + ext, p + ext, shallow=False)
                        for p in prefixes[1:] for ext in (".bin", ".idx"))
    base = rates[counts[0]]
    print("speed-up over", counts[0], "worker(s): "
          + ", ".join(f"{w} -> {rates[w] / base:.2f}x" for w in counts))
    print("outputs identical across worker counts:", identical)


if __name__ == "__main__":
    main()
