"""Evaluate a trained checkpoint, frozen: representation geometry, a linear probe, cloze.

    python tools/evaluate_representations.py --load runs/x/checkpoints [--json out.json]
        [--evaluations geometry,probe,cloze]

One table (and with ``--json`` one JSON file) with the evaluations asked for by
``--evaluations`` (comma-separated, any of geometry, probe, cloze; default: geometry). The
JSON has a key for each evaluation that ran (and "evaluations", their list).

(a) geometry on held-out text: effective rank and mean pairwise cosine of the final hidden
    states (after the final norm), the held-out cross-entropy, the same geometry of layer k's
    output states (k = the checkpoint's NITP target layer, also for an NTP checkpoint:
    "layer_k") and the model's own NITP loss (its training objective, masked mean over the
    windows: "nitp_loss"; null for an NTP checkpoint, which has no projector). The text is
    joined with EOD and read in windows of seq_length + 1 tokens: all of them if they fit in
    ``--max-tokens``, else ``--max-tokens // seq_length`` windows with evenly spaced starts
    from the text's beginning to its end ("windows", "window_starts", "window_span",
    "stream_tokens"). ``--text FILE`` (plain text, documents separated by blank lines, or JSON
    lines with "text"); default: the chapters of the built-in corpus that the training split
    never uses (``--split`` as in training, default 969,30,1: the last 37 of 1,189 KJV
    chapters, 1 Peter 2 - Revelation 22).
(b) probe (only when asked for): mean-pooled final hidden states, multinomial logistic
    regression (L-BFGS, L2) and nearest centroid, on a split fixed by ``--seed``. Default
    task: single KJV verses (>= 6 words) classified into the Bible's 7 traditional divisions
    (law, history, wisdom, major prophets, minor prophets, gospels and acts, epistles and
    revelation), 150 train and 100 test verses per class. These verses are mostly from the
    pretraining text: the probe measures what the frozen features separate linearly, not
    generalization to unseen text. ``--probe-file FILE.jsonl`` ({"text": ..., "label": ...}
    per line) replaces it.
(c) last-word cloze (only when asked for): for each item, is the argmax next-token
    prediction after the context the first token of the item's final word. ``--cloze-file
    FILE`` (one item per line); default: the lines of ``--text`` when given, else every verse
    (>= 4 words) of the held-out chapters with the chapter's preceding verses as context
    (left-truncated to the sequence length).

Works with NTP and NITP checkpoints of dense models (the projector is used only for the NITP
loss).
"""

import argparse
import json
import os
import time

import megatron_nitp  # noqa: F401
from megatron_nitp.cli import ArgumentParser
from megatron_nitp.config.schema import TOKENIZER_TYPES

EVALUATIONS = ("geometry", "probe", "cloze")


def parse_evaluations(value: str) -> list[str]:
    """``geometry,cloze`` -> ["geometry", "cloze"] (in the order of EVALUATIONS); an unknown
    or empty selection is refused with the valid names."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in EVALUATIONS]
    if unknown or not names:
        raise SystemExit(f"error: unknown evaluation(s) {', '.join(unknown) or repr(value)} "
                         f"in --evaluations; valid: {', '.join(EVALUATIONS)}")
    return [n for n in EVALUATIONS if n in names]


def _load_model(checkpoint: str, bf16: bool = False):
    from megatron_nitp.export import load_checkpoint_model

    return load_checkpoint_model(checkpoint, bf16=bf16)


def precision_note(trained_bf16: bool, trained_fp16: bool, bf16: bool) -> str:
    """What the evaluation computes in, and what the run trained in: fp32 unless ``--bf16``."""
    trained = "bf16" if trained_bf16 else "fp16" if trained_fp16 else "fp32"
    return (f"{'bf16' if bf16 else 'fp32'} (trained in {trained}"
            + ("; --bf16 evaluates in bf16)" if not bf16 else ")"))


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _read_probe_file(path: str):
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(str(record["text"]))
                labels.append(str(record["label"]))
            except (ValueError, KeyError, TypeError) as err:
                raise SystemExit(f"error: {path}:{n}: expected {{\"text\": ..., \"label\": ...}} "
                                 f"({err})")
    return texts, labels


def format_table(result: dict) -> str:
    rows = [
        ("checkpoint", f"{result['checkpoint']} (iteration {result['iteration']}, "
                       f"{'NITP' if result['nitp'] else 'NTP'})"),
        ("precision", result["precision"]),
    ]
    if "geometry" in result:
        g = result["geometry"]
        rows += [
            ("(a) held-out text", f"{g['source']}: {g['tokens']} tokens in {g['windows']} "
                                  f"windows over tokens {g['window_span'][0]}-"
                                  f"{g['window_span'][1]} of {g['stream_tokens']}"),
            ("    effective rank", f"{g['effective_rank']:.3f}  (of at most {g['hidden_size']})"),
            ("    mean pairwise cosine", f"{g['cosine_similarity']:.4f}"),
            ("    lm loss / perplexity", f"{g['lm_loss']:.4f} / {g['perplexity']:.2f}"),
        ]
        if "layer_k" in g:
            k = g["layer_k"]
            rows += [
                (f"    layer {k['layer']} effective rank", f"{k['effective_rank']:.3f}"),
                (f"    layer {k['layer']} pairwise cosine", f"{k['cosine_similarity']:.4f}"),
                ("    NITP loss", "n/a (no projector)" if g["nitp_loss"] is None
                 else f"{g['nitp_loss']:.4f}"),
            ]
    if "probe" in result:
        p = result["probe"]
        rows += [
            ("(b) probe", f"{p['task']}: {len(p['classes'])} classes, {p['train_items']} train / "
                          f"{p['test_items']} test"),
            ("    logistic regression acc.", f"{p['logreg_accuracy']:.4f}  (train "
                                              f"{p['logreg_train_accuracy']:.4f})"),
            ("    nearest centroid acc.", f"{p['centroid_accuracy']:.4f}"),
            ("    majority class", f"{p['majority_accuracy']:.4f}"),
        ]
    if "cloze" in result:
        c = result["cloze"]
        rows += [
            ("(c) last-word cloze", f"{c['source']}: {c['items']} items"),
            ("    first-token accuracy", f"{c['accuracy']:.4f}"),
            ("    target NLL", f"{c['target_nll']:.4f}"),
        ]
    width = max(len(r[0]) for r in rows)
    line = "-" * (width + 2 + max(len(r[1]) for r in rows))
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


def evaluate(args) -> dict:
    import torch

    from megatron_nitp import evaluation as ev
    from megatron_nitp.data.tokenizer import build_tokenizer, iter_documents
    from megatron_nitp.training.checkpoint import (CheckpointError, find_checkpoint, read_meta,
                                                   saved_model, saved_nitp, trained_precision)

    evaluations = parse_evaluations(args.evaluations)
    try:
        meta = read_meta(find_checkpoint(args.load))
        model, margs = _load_model(args.load, bf16=args.bf16)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    tokenizer_type = args.tokenizer_type or margs.data.tokenizer_type
    tokenizer_model = args.tokenizer_model or margs.data.tokenizer_model
    if tokenizer_type != "NullTokenizer" and (not tokenizer_model
                                              or not os.path.exists(tokenizer_model)):
        if (args.tokenizer_model is None and tokenizer_type == "SentencePieceTokenizer"
                and (args.text is None or args.cloze_file is None)):
            from megatron_nitp.data.corpus import prepare_default_corpus

            tokenizer_model = prepare_default_corpus()[1]
        else:
            raise SystemExit(f"error: tokenizer model not found: {tokenizer_model} "
                             "(pass --tokenizer-model)")
    try:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, margs.derived.vocab_size)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    seq_length = args.seq_length or margs.model.seq_length
    target_layer = margs.nitp_config.target_layer
    lm = ev.FrozenLM(model, tokenizer, seq_length, target_layer=target_layer)
    torch.manual_seed(args.seed)

    nitp, shape = saved_nitp(meta), saved_model(meta)
    result = {
        "checkpoint": args.load,
        "iteration": meta["iteration"],
        "nitp": bool(nitp["enabled"]),
        "nitp_target_layer": nitp.get("target_layer"),
        "model": {k: shape.get(k) for k in ("num_layers", "hidden_size",
                                            "num_attention_heads")},
        "seq_length": seq_length,
        "precision": precision_note(*trained_precision(meta), args.bf16),
        "seed": args.seed,
        "evaluations": evaluations,
    }

    if "geometry" in evaluations:
        if args.text:
            documents = list(iter_documents([args.text]))
            source = args.text
        else:
            documents, chapters = ev.held_out_chapters(args.split)
            source = (f"KJV chapters {chapters.start}-{chapters.stop - 1} (held out by split "
                      f"{args.split}; {len(documents)} chapters)")
        geometry = ev.held_out_geometry(lm, documents, args.batch_size, args.max_tokens,
                                        seed=args.seed)
        geometry["source"] = source
        geometry["documents"] = len(documents)
        result["geometry"] = geometry

    if "probe" in evaluations:
        if args.probe_file:
            texts, labels = _read_probe_file(args.probe_file)
            data = ev.split_labelled(texts, labels, args.probe_test_fraction, args.seed)
            task = args.probe_file
        else:
            data = ev.probe_dataset_kjv(args.probe_train_per_class, args.probe_test_per_class,
                                        args.seed)
            task = "KJV verse -> division"
        probe = ev.probe(lm, *data, l2=args.probe_l2)
        probe["task"] = task
        result["probe"] = probe

    if "cloze" in evaluations:
        if args.cloze_file or args.text:
            path = args.cloze_file or args.text
            items, cloze_source = _read_lines(path), path
        else:
            items = ev.cloze_items_kjv(args.split)
            cloze_source = "held-out KJV verses in chapter context"
        if args.cloze_max_items:
            items = items[: args.cloze_max_items]
        cloze = ev.cloze(lm, items, args.batch_size)
        cloze["source"] = cloze_source
        result["cloze"] = cloze
    return result


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--load", required=True, help="checkpoint folder (a run's checkpoints/)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--evaluations", default="geometry", metavar="NAMES",
                   help=f"comma-separated, of {','.join(EVALUATIONS)} (default: geometry; the "
                        "KJV probe and the cloze run only when named)")
    p.add_argument("--text", default=None, help="held-out text for (a) (and (c) by default)")
    p.add_argument("--split", default="969,30,1",
                   help="the training --split, to find the held-out chapters (969,30,1)")
    p.add_argument("--max-tokens", type=int, default=65536,
                   help="at most this many held-out tokens for (a), in windows spread over the "
                        "text")
    p.add_argument("--probe-file", default=None, help="JSON lines with text and label")
    p.add_argument("--probe-test-fraction", type=float, default=0.3)
    p.add_argument("--probe-train-per-class", type=int, default=150)
    p.add_argument("--probe-test-per-class", type=int, default=100)
    p.add_argument("--probe-l2", type=float, default=1e-3)
    p.add_argument("--cloze-file", default=None, help="one cloze item per line")
    p.add_argument("--cloze-max-items", type=int, default=0, help="0: all")
    p.add_argument("--seed", type=int, default=0, help="probe split, cosine pairs")
    p.add_argument("--bf16", action="store_true",
                   help="compute in bf16 (default: fp32, whatever the run trained in)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=None,
                   help="context length (default: the checkpoint's training length)")
    p.add_argument("--tokenizer-model", default=None,
                   help="default: the one recorded in the checkpoint")
    p.add_argument("--tokenizer-type", default=None,
                   choices=[t for t in TOKENIZER_TYPES if t != "GPT2BPETokenizer"],
                   help="default: the one recorded in the checkpoint")
    args = p.parse_args(argv)
    parse_evaluations(args.evaluations)  # refused before the checkpoint is loaded
    start = time.perf_counter()
    result = evaluate(args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"> wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
