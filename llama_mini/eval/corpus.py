"""Bits per byte of a model on any corpus: every token of every document scored once.

    score = bits_per_byte(model, tokenizer, documents, context=1024, stride=512)
    score.bits_per_byte, score.nats_per_token, score.perplexity, score.tokens, score.bytes, score.documents

Each document is tokenized as training lays it out, [bos] ids [eos] (llama_mini.data.prepare), and every
token after bos is predicted once: the document's ids and its end. A document whose L tokens hold more
targets (L - 1) than `context` is scored in windows. Window k ends at target e_k = min(context + k*stride,
L - 1), reads the `context` tokens before it (fewer only in the first window) and scores the targets after
the previous window's end:

    ids        b  t1 t2 t3 t4 t5 t6 t7 e          (L = 9, context = 4, stride = 2)
    window 0   b  t1 t2 t3 -> scores t1 t2 t3 t4  (the first: every position)
    window 1   t2 t3 t4 t5 -> scores       t5 t6  (stride new targets, each with 3 or 4 tokens before it)
    window 2   t4 t5 t6 t7 -> scores             e

So each token but those of the first window sees at least context - stride tokens of its document before
it; stride = context scores disjoint windows (cheapest), stride = 1 gives every token the whole context
(one forward per token). The sums are

    nats           = sum over scored tokens of -ln p(token | the tokens before it in its window)
    nats_per_token = nats / tokens           perplexity = exp(nats_per_token)
    bits_per_byte  = nats / ln 2 / bytes     bytes: the UTF-8 bytes of the documents' text

Bits per byte compares models with different tokenizers (lm-evaluation-harness reports it the same way); the
eos of each document is scored, as in training, since knowing where a text ends is part of its cost.

Training's logged val_bpb is another estimate of the same quantity: the mean loss over random windows of
the validation split's token stream, times the split's tokens per byte. On the same window the two have the
same loss per token; the stream also counts each document's bos (a target after the previous document's
eos), so its tokens per byte has one more token per document than the targets scored here
(tests/test_eval_command.py shows both).

Windows are batched: sorted by length, right-padded (causal attention keeps the padding from being read by
real positions) and run through the model's hidden states; the output layer and a float32 log-softmax run
only at the scored positions, a few thousand rows at a time, so memory stays bounded whatever the
vocabulary. Sums are kept in float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llama_mini.console import progress_bar
from llama_mini.data.split import check_val_fraction, is_small, split_documents, validation_score
from llama_mini.errors import ConfigError, DataError
from llama_mini.model.transformer import Transformer
from llama_mini.tokenizer import Tokenizer

__all__ = ["CorpusScore", "Window", "bits_per_byte", "document_windows", "split_of"]

# Windows gathered before sorting them by length into batches: enough to group similar lengths, few enough
# that a corpus streams through in bounded memory.
WINDOWS_PER_ROUND = 256
# Scored positions turned into logits at a time: at most this many floats of logits (256 MiB in float32).
LOGIT_FLOATS = 1 << 26


@dataclass(frozen=True)
class CorpusScore:
    """What `bits_per_byte` measured (see the module docstring for the formulas)."""

    documents: int
    tokens: int  # targets scored: each document's ids and its eos
    bytes: int  # UTF-8 bytes of the documents' text
    nats: float  # summed negative log-likelihood of the scored tokens

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes

    def as_dict(self) -> dict[str, float | int]:
        """The numbers `llama-mini eval --output` writes."""
        return {
            "bits_per_byte": self.bits_per_byte,
            "nats_per_token": self.nats_per_token,
            "perplexity": self.perplexity,
            **{key: value for key, value in asdict(self).items() if key != "nats"},
            "nats": self.nats,
        }


@dataclass(frozen=True)
class Window:
    """One forward pass of a document: `inputs` ids, of which the last `scored` positions are scored
    against `targets` (the ids that follow them)."""

    inputs: list[int]
    targets: list[int]  # len(targets) == scored: the next id after each of the last `scored` inputs

    @property
    def scored(self) -> int:
        return len(self.targets)


def document_windows(ids: list[int], context: int, stride: int) -> Iterator[Window]:
    """The windows that score every id after the first once (module docstring): ids (L,) -> windows."""
    last = len(ids) - 1  # index of the last target
    done = 0  # targets 1 .. done are scored
    while done < last:
        end = min(done + (stride if done else context), last)  # this window's last target
        start = max(0, end - context)
        yield Window(ids[start:end], ids[done + 1 : end + 1])
        done = end


def check_windows(context: int, stride: int, max_seq_len: int) -> None:
    """ConfigError unless 1 <= stride <= context <= max_seq_len."""
    if not 1 <= context <= max_seq_len:
        raise ConfigError(
            f"--context must be between 1 and the model's context ({max_seq_len}), got {context}: "
            f"leave it out to use the model's"
        )
    if not 1 <= stride <= context:
        raise ConfigError(
            f"--stride must be between 1 and the context ({context}), got {stride}: leave it out for half "
            f"the context"
        )


@torch.no_grad()
def bits_per_byte(
    model: Transformer,
    tokenizer: Tokenizer,
    documents: Iterable[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    total_bytes: int | None = None,
) -> CorpusScore:
    """Score every token of every document (module docstring) and return the sums.

    model: a Transformer without a KV cache (as loaded or trained); it is put in eval mode and its
        training flag restored. context: tokens a window reads (default: the model's max_seq_len);
        stride: new targets per window after the first (default: context // 2, at least 1).
    documents: any iterable of texts, read as it goes (a corpus streams through); blank ones are skipped.
    device: where the windows go (default: the model's). progress: a progress bar over the bytes read
        (total_bytes: the corpus's size, if known).
    Raises DataError when no document holds text, ConfigError for a context or stride out of range.
    """
    context = model.args.max_seq_len if context is None else context
    stride = max(1, context // 2) if stride is None else stride
    check_windows(context, stride, model.args.max_seq_len)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else model.tok_embeddings.weight.device
    bar = None
    if progress:
        bar = progress_bar(total_bytes, "scoring")  # plain lines when stderr is not a terminal

    training = model.training
    model.eval()
    counts = {"documents": 0, "tokens": 0, "bytes": 0}
    nats = 0.0
    pending: list[Window] = []
    try:
        for text in documents:
            if not text or text.isspace():
                continue
            size = len(text.encode("utf-8"))
            counts["documents"] += 1
            counts["bytes"] += size
            ids = tokenizer.encode(text, bos=True, eos=True)
            counts["tokens"] += len(ids) - 1
            pending.extend(document_windows(ids, context, stride))
            if len(pending) >= WINDOWS_PER_ROUND:
                nats += _score_windows(model, pending, batch_size, device)
                pending = []
            if bar is not None:
                bar.update(size)
        nats += _score_windows(model, pending, batch_size, device)
    finally:
        model.train(training)
        if bar is not None:
            bar.close()
    if counts["tokens"] == 0:
        raise DataError("the corpus holds no text to score: pass --data a corpus with some text in it")
    return CorpusScore(nats=nats, **counts)


def _score_windows(model: Transformer, windows: list[Window], batch_size: int, device: torch.device) -> float:
    """Summed negative log-likelihood of every window's scored targets, in batches of similar length."""
    total = 0.0
    windows = sorted(windows, key=lambda window: len(window.inputs), reverse=True)
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        total += _score_batch(model, batch, device)
    return total


def _score_batch(model: Transformer, batch: list[Window], device: torch.device) -> float:
    longest = max(len(window.inputs) for window in batch)
    tokens = torch.zeros((len(batch), longest), dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, window in enumerate(batch):
        length = len(window.inputs)
        tokens[row, :length] = torch.tensor(window.inputs)
        rows.extend([row] * window.scored)
        positions.extend(range(length - window.scored, length))
        targets.extend(window.targets)
    hidden = model.hidden_states(tokens.to(device))  # (B, T, dim)
    scored = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]  # (N, dim)
    targets = torch.tensor(targets, device=device)
    return negative_log_likelihood(model, scored, targets)


def negative_log_likelihood(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """sum_i -ln softmax(output(hidden_i))[targets_i]: hidden (N, dim), targets (N,) -> a float.

    The logits are made a chunk of rows at a time and the log-softmax taken in float32."""
    rows = max(1, LOGIT_FLOATS // model.args.vocab_size)
    total = 0.0
    for first in range(0, len(targets), rows):
        logits = model.output(hidden[first : first + rows]).float()
        total += F.cross_entropy(logits, targets[first : first + rows], reduction="sum").double().item()
    return total


def split_of(documents: Iterable[str], split: str, val_fraction: float, seed: int) -> Iterator[str]:
    """The documents of one split ("train" or "val") of a corpus, as training splits it with these
    val_fraction and seed (train.py --val-fraction, --split-seed; llama_mini.data.split), streamed.

    A small corpus is held (at most SMALL_CORPUS_BYTES) and split by `split_documents`, the exact rule,
    which also cuts a single document in two; past that size a document validates when its score is below
    val_fraction, decided as it streams past. (The larger corpus's corner cases, in which no document or
    every document scores below val_fraction, are not followed: they need the whole corpus first.)
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split must be train or val, got {split!r}")
    check_val_fraction(val_fraction)
    texts = (text for text in documents if text and not text.isspace())
    held: list[str] = []
    size = 0
    for text in texts:
        held.append(text)
        size += len(text.encode("utf-8"))
        if not is_small(size, len(held)):
            break
    else:
        if held:
            train, val = split_documents(held, val_fraction, seed)
            yield from val if split == "val" else train
        return
    for text in itertools.chain(held, texts):
        if (validation_score(text.encode("utf-8"), seed) < val_fraction) == (split == "val"):
            yield text
