"""Evaluate an exported model with EleutherAI's lm-evaluation-harness (``lm-eval``).

    python tools/export_checkpoint.py --load runs/x/checkpoints --output hf/x
    python tools/lm_eval_bridge.py --model-dir hf/x --tasks hellaswag,arc_easy --limit 200
    python tools/lm_eval_bridge.py --load runs/x/checkpoints --tasks my_task \\
        --include-path my_tasks/ --output results.json      # exports to a temporary folder

The model is the exported Hugging Face directory (``transformers.AutoModelForCausalLM``; the NITP
projector is never part of it). Text is tokenized with the run's own tokenizer (copied there by
the export and named in its ``nitp_tokenizer.json``; older exports: ``tokenizer.model``) exactly
as in training: no BOS token, the EOD token as the prefix of a document. The bridge implements lm-eval's three request types
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``, greedy) with contexts
left-truncated to the model's training length (``--max-length``, default the config's
``max_position_embeddings``).

Needs ``pip install lm-eval==0.4.13``, the version CI tests it with (``scripts/test_lm_eval.sh``
compares every request type with the model run by transformers). lm-eval's built-in tasks
download their data sets from the Hugging Face Hub; offline, use a task of your own: a YAML file
under ``--include-path`` with ``dataset_path: json`` and ``dataset_kwargs: {data_files: {test:
/path/data.jsonl}}`` (see ``tests/test_research_tools.py`` for a complete example).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import megatron_nitp  # noqa: F401  (CPU import stubs must precede megatron-core)
from megatron_nitp.cli import ArgumentParser
from megatron_nitp.config.schema import TOKENIZER_TYPES

INSTALL_HINT = ("lm-eval is not installed: `pip install lm-eval==0.4.13`, then rerun. Its "
                "built-in tasks need the Hugging Face Hub; offline, pass a local task YAML "
                "with --include-path.")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError as err:
        raise SystemExit(f"error: {INSTALL_HINT} ({err})")
    return LM


def make_lm_class():
    """The lm-eval ``LM`` subclass (built on first use, so importing this file needs no
    lm-eval)."""
    import torch
    from lm_eval import utils
    from lm_eval.api.model import LM
    from tqdm import tqdm

    class NITPExportedLM(LM):
        """An exported megatron-nitp model behind lm-eval's LM interface."""

        def __init__(self, model_dir: str, batch_size: int = 8, max_length: int | None = None,
                     max_gen_toks: int = 64, device: str | None = None,
                     tokenizer_model: str | None = None, tokenizer_type: str | None = None,
                     bf16: bool = False):
            super().__init__()
            import transformers

            from megatron_nitp.export import exported_tokenizer

            try:
                self.tok = exported_tokenizer(model_dir, tokenizer_type, tokenizer_model)
            except (FileNotFoundError, ValueError) as err:
                raise SystemExit(f"error: {err} (export with tools/export_checkpoint.py, or "
                                 "pass --tokenizer-model)")
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.bfloat16 if bf16 else torch.float32
            ).to(self._device).eval()
            self.max_length = int(max_length or self.model.config.max_position_embeddings)
            self.batch_size = int(batch_size)
            self.max_gen_toks = int(max_gen_toks)
            self.vocab_size = self.tok.vocab_size

        # ---- helpers
        @property
        def eot_token_id(self) -> int:
            return self.tok.eod

        @property
        def bos_first(self) -> bool:
            """Whether the tokenizer starts every text with BOS (Llama2Tokenizer)."""
            return getattr(self.tok, "bos_first", False)

        @property
        def prefix_token_id(self) -> int:
            """What a text without context is scored after: BOS where the tokenizer starts
            every document with it, else EOD (what precedes a document in training)."""
            return self.tok.bos if self.bos_first else self.eot_token_id

        def tok_encode(self, text: str) -> list[int]:
            return self.tok.tokenize(text)

        def tok_encode_pieces(self, text: str) -> list[int]:
            """``text``'s tokens without the BOS a Llama2Tokenizer puts first."""
            return self.tok.tokenize(text, bos=False) if self.bos_first else self.tok.tokenize(text)

        @torch.no_grad()
        def _logprobs(self, batch: list[list[int]]) -> list[torch.Tensor]:
            """Log-softmax ``[len, V]`` of each (right-padded, causal) sequence."""
            width = max(len(s) for s in batch)
            tokens = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for i, seq in enumerate(batch):
                tokens[i, : len(seq)] = torch.tensor(seq)
            logits = self.model(input_ids=tokens.to(self._device)).logits.float()
            logits = logits[..., : self.vocab_size]
            out = torch.log_softmax(logits, dim=-1).cpu()
            return [out[i, : len(seq)] for i, seq in enumerate(batch)]

        def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str):
            """(context ids, continuation ids) -> (sum log p(continuation), greedy?)."""
            order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
            scored = {}
            for start in tqdm(range(0, len(order), self.batch_size), desc=desc,
                              disable=len(order) < 4 * self.batch_size):
                idx = order[start: start + self.batch_size]
                inputs, spans = [], []
                for i in idx:
                    context, continuation = pairs[i]
                    whole = (context + continuation)[-(self.max_length + 1):]
                    inputs.append(whole[:-1])
                    # targets: the continuation (its tail if it is longer than the window)
                    spans.append(continuation[-min(len(continuation), len(whole) - 1):])
                for i, seq, cont, lp in zip(idx, inputs, spans, self._logprobs(inputs)):
                    rows = lp[len(seq) - len(cont):]
                    target = torch.tensor(cont)
                    logprob = float(rows.gather(1, target[:, None]).sum())
                    greedy = bool((rows.argmax(-1) == target).all())
                    scored[i] = (logprob, greedy)
            return [scored[i] for i in range(len(pairs))]

        # ---- lm-eval interface
        def loglikelihood(self, requests):
            pairs = []
            for request in requests:
                context, continuation = request.args
                # Word-boundary spaces go with the continuation, as in lm-eval's HFLM.
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    continuation = context[-spaces:] + continuation
                    context = context[:-spaces]
                if context:
                    whole = self.tok_encode(context + continuation)
                    context_ids = self.tok_encode(context)
                    pairs.append((whole[: len(context_ids)], whole[len(context_ids):]))
                else:
                    pairs.append(([self.prefix_token_id], self.tok_encode_pieces(continuation)))
            results = self._score(pairs, "loglikelihood")
            for request, result in zip(requests, results):
                self.cache_hook.add_partial("loglikelihood", request.args, result)
            return results

        def loglikelihood_rolling(self, requests):
            out = []
            for request in requests:
                (text,) = request.args
                windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode_pieces(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                total = sum(lp for lp, _ in self._score(windows, "rolling"))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                out.append(total)
            return out

        @torch.no_grad()
        def generate_until(self, requests):
            out = []
            for request in tqdm(requests, desc="generate", disable=len(requests) < 16):
                context, kwargs = request.args
                kwargs = dict(kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                ids = self.tok_encode(context) or [self.eot_token_id]
                # The answer is the text that follows the context: decoded on its own, the
                # first generated piece would lose its word-boundary space (SentencePiece
                # strips the leading space of a text), and " earth" would come back "earth".
                prefix = self.tok.detokenize(ids)
                generated: list[int] = []
                text = ""
                for _ in range(max_new):
                    window = (ids + generated)[-self.max_length:]
                    nxt = int(self._logprobs([window])[0][-1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    generated.append(nxt)
                    text = self.tok.detokenize(ids + generated)[len(prefix):]
                    if any(stop in text for stop in until):
                        break
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", request.args, text)
                out.append(text)
            return out

    return NITPExportedLM


def run(model_dir: str, tasks: list[str], include_path: str | None = None,
        limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
        max_length: int | None = None, tokenizer_model: str | None = None, seed: int = 0,
        device: str | None = None, log_samples: bool = False,
        tokenizer_type: str | None = None, bf16: bool = False) -> dict:
    """Runs lm-eval's ``simple_evaluate`` on an exported model, in fp32 unless ``bf16``;
    returns its results dict."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = make_lm_class()(model_dir, batch_size=batch_size, max_length=max_length,
                         tokenizer_model=tokenizer_model, tokenizer_type=tokenizer_type,
                         device=device, bf16=bf16)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=log_samples,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=0)
    if results is None:
        raise SystemExit("error: lm-eval returned no results")
    return results


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def format_results(results: dict) -> str:
    lines = [f"{'task':<28} {'metric':<24} {'value':>10}", "-" * 64]
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            if (name in ("alias", "sample_len") or "stderr" in name
                    or not isinstance(value, (int, float)) or isinstance(value, bool)):
                continue
            lines.append(f"{task:<28} {name:<24} {value:>10.4f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="Hugging Face directory from tools/export_checkpoint.py")
    src.add_argument("--load", help="a checkpoint folder: exported to a temporary folder first")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="folder of custom task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="examples per task (or fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="context tokens (default: the model's max_position_embeddings)")
    p.add_argument("--tokenizer-model", default=None,
                   help="default: the export's (MODEL_DIR/nitp_tokenizer.json names it)")
    p.add_argument("--tokenizer-type", default=None,
                   choices=[t for t in TOKENIZER_TYPES if t != "GPT2BPETokenizer"],
                   help="with --tokenizer-model: its kind (default: the export's)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true",
                   help="compute in bf16 (default: fp32, whatever the run trained in)")
    p.add_argument("--output", default=None, help="write lm-eval's results as JSON")
    p.add_argument("--log-samples", action="store_true", help="keep per-example outputs")
    args = p.parse_args(argv)
    _require_lm_eval()
    tasks = [t for t in args.tasks.split(",") if t]
    print("> precision: bf16 (--bf16)" if args.bf16 else
          "> precision: fp32 (--bf16 computes in bf16)", flush=True)
    with tempfile.TemporaryDirectory(prefix="nitp-export-") as tmp:
        model_dir = args.model_dir
        if args.load:
            from megatron_nitp.export import EXPORT_ERRORS, export_checkpoint

            model_dir = os.path.join(tmp, "hf")
            try:
                export_checkpoint(args.load, model_dir)
            except EXPORT_ERRORS as err:
                raise SystemExit(f"error: {err}")
        results = run(model_dir, tasks, args.include_path, args.limit, args.num_fewshot,
                      args.batch_size, args.max_length, args.tokenizer_model, args.seed,
                      args.device, args.log_samples, args.tokenizer_type, args.bf16)
    print(format_results(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        keep = {k: results[k] for k in ("results", "configs", "versions", "n-shot", "samples")
                if k in results}
        with open(args.output, "w") as f:
            json.dump(_json_safe(keep), f, indent=1)
        print(f"> wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
