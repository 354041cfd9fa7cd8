"""llama_mini models in lm-evaluation-harness: the `LM` class the harness calls, registered as "llama_mini".

    from lm_eval import simple_evaluate
    lm = LlamaMiniLM("out/demo", batch_size=16)               # or model="llama_mini",
    results = simple_evaluate(lm, tasks=["hellaswag"])        #    model_args="pretrained=out/demo"

The harness owns tasks, prompts and metrics; a model answers three kinds of request (lm_eval.api.model.LM):

    loglikelihood(context, continuation)   ln p(continuation | context) summed over its tokens, and whether
                                           greedy decoding would have produced it
    loglikelihood_rolling(text)            ln p(text) from the prefix token alone, in disjoint windows of
                                           the context (lm_eval.utils.get_rolling_token_windows)
    generate_until(context, gen_kwargs)    a continuation, greedy unless do_sample, cut at the first stop
                                           string of `until` (or the eos token), at most max_gen_toks tokens

Tokens follow the harness's own Hugging Face backend (`lm_eval --model hf`, lm_eval.models.huggingface)
on the same folder, so that the two give the same numbers (tests/test_eval_harness.py): a text is encoded
with bos when the tokenizer adds one (unless it starts with the bos token's text), special tokens' text
is read as those tokens, a (context, continuation) pair is encoded whole and split at the context's length
(TemplateLM._encode_pair), an empty context is the prefix token (bos, else eos), and a pair longer than
the context keeps its last max_length + 1 tokens. (One consequence, the hf backend's too: a rolling
request's tokens start with bos, after the bos prefix, so ln p(bos | bos) is part of its sum.)

What differs is the work: requests are sorted by length (longest first) and batched, right-padded (causal
attention keeps real positions from reading the padding); one forward pass per batch computes the hidden
states, and the output layer and a float32 log-softmax run only at the continuation's positions, not at
every position of every row. Requests that differ only in their continuation (a multiple-choice
question's choices) run their shared context once, and each continuation from its KV cache. Rolling
windows of all requests are batched together. Generation uses
llama_mini's KV-cached decode loop over the batch (llama_mini.generation.iter_new_tokens), stopped as soon
as every row has reached a stop string, its eos or max_gen_toks.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from llama_mini.errors import ConfigError
from llama_mini.eval.loading import load_model_and_tokenizer
from llama_mini.generation import iter_new_tokens
from llama_mini.model.cache import SlotKVCache
from llama_mini.model.transformer import Transformer
from llama_mini.runtime import resolve_device, resolve_dtype
from llama_mini.tokenizer import Tokenizer
from llama_mini.tokenizer.chat import render_chat

__all__ = ["DEFAULT_MAX_GEN_TOKS", "LlamaMiniLM"]

DEFAULT_MAX_GEN_TOKS = 256  # as the hf backend: tokens a generate_until request gets unless it says
# What simple_evaluate passes every model class besides its model_args; the class has no use for them.
HARNESS_SETTINGS = {"max_batch_size"}


@register_model("llama_mini", "llama-mini")
class LlamaMiniLM(TemplateLM):
    """A llama_mini Transformer and Tokenizer answering the harness's requests (module docstring).

    pretrained: a checkpoint folder (anything `load_model` reads, or a run folder), or
        pass `model` and `tokenizer` objects instead. device, dtype: as llama_mini's --device / --dtype
        ("auto": CUDA if present, float32 on a CPU). batch_size: requests per forward pass. max_length:
        the context the harness truncates to (default: the model's max_seq_len).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | Tokenizer | None = None,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        model: Transformer | None = None,
        **harness_settings: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(harness_settings) - HARNESS_SETTINGS)
        if unknown:  # a misspelt model_args key must not be ignored quietly
            raise ConfigError(
                f"LlamaMiniLM has no setting {unknown[0]!r}: use pretrained, tokenizer, device, dtype, "
                f"batch_size, max_length or max_gen_toks"
            )
        if model is not None:
            if not isinstance(tokenizer, Tokenizer):
                raise ConfigError("LlamaMiniLM(model=...) needs tokenizer=, a llama_mini Tokenizer")
            self.model, self.tokenizer = model, tokenizer
        else:
            if pretrained is None:
                raise ConfigError("LlamaMiniLM needs pretrained=CHECKPOINT (or model= and tokenizer=)")
            resolved = resolve_device(device or "auto")
            self.model, self.tokenizer = load_model_and_tokenizer(
                pretrained, tokenizer, resolved, resolve_dtype(dtype or "auto", resolved)
            )
        self.model.eval()
        self._device = self.model.tok_embeddings.weight.device
        if str(batch_size).startswith("auto"):
            batch_size = 1  # no search for the largest batch: pass a number
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.max_length = int(max_length or self.model.args.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: bos, else eos (as the hf backend)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.model_path).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **_
    ) -> list[int]:
        """Token ids of `string`: with bos when the tokenizer adds one and add_special_tokens is not False
        (None: unless the string already starts with the bos token's text)."""
        if add_special_tokens is None:
            bos_text = self.tokenizer.bos_token
            add_special_tokens = not (bos_text and string.startswith(bos_text))
        ids = self.tokenizer.encode(
            string, bos=add_special_tokens and self.tokenizer.add_bos, parse_special=True
        )
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation's text in the checkpoint's chat template (llama_mini.tokenizer.chat)."""
        return render_chat(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------------------- log-likelihoods

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **_
    ) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (ln p(continuation | context), is it the greedy one).

        Each request is a row of tokens scored at its continuation's positions (`_Row`). Rows whose tokens
        before those positions are the same (the choices of a multiple-choice question, after its passage)
        are scored together: that prefix runs once, and each row's own tokens run after it, reading its
        keys and values from a KV cache (`_score_shared`), instead of every row running the passage again.
        The other rows (rolling windows, a lone request) run whole (`_score`), longest first, batch_size
        rows per forward pass; `_pack` keeps the shared passes no larger than that."""
        rows = [_Row.of(context, continuation, self.max_length) for _, context, continuation in requests]
        by_prefix: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for number, row in enumerate(rows):
            by_prefix[row.prefix].append(number)
        groups: list[list[int]] = []
        alone: list[int] = []
        for prefix, numbers in by_prefix.items():
            if prefix and len(numbers) > 1:
                groups.append(numbers)
            else:
                alone += numbers
        shared_batches = _pack(groups, self.batch_size, rows)
        alone += [batch[0] for batch in shared_batches if len(batch) == 1]  # batch size 1: nothing to share
        alone.sort(key=lambda n: (-len(rows[n].inputs), rows[n].inputs))
        batches = [(True, batch) for batch in shared_batches if len(batch) > 1]
        batches += [(False, alone[i : i + self.batch_size]) for i in range(0, len(alone), self.batch_size)]

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for shared, batch in batches:
            score = self._score_shared if shared else self._score
            for number, result in zip(batch, score([rows[n] for n in batch]), strict=True):
                results[number] = result
                if requests[number][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[number][0], result)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score(self, rows: list[_Row]) -> list[tuple[float, bool]]:
        """One forward pass over whole rows, right-padded (causal attention keeps each row's positions from
        reading the padding after them)."""
        hidden = self.model.hidden_states(_padded([row.inputs for row in rows], self._device))
        return self._log_likelihoods(hidden, rows, [len(row.inputs) - row.count for row in rows])

    @torch.no_grad()
    def _score_shared(self, rows: list[_Row]) -> list[tuple[float, bool]]:
        """Rows that share prefixes: each distinct prefix runs once (a KV-cached pass over them all,
        right-padded), then every row's own tokens run after its prefix, each row at its own position (a
        SlotKVCache holding a copy of its prefix's keys and values). The result equals `_score`'s up to
        rounding: the same attention over the same positions, computed in two passes.

        The second pass pads every row to the longest row's tokens, and no position may lie past the
        model's context (its RoPE table ends there): a row whose prefix ends too close to it starts that
        much earlier, running its prefix's last few tokens again (their keys and values are written over
        with the same ones)."""
        prefixes = list(dict.fromkeys(row.prefix for row in rows))  # each once, in order
        which = {prefix: number for number, prefix in enumerate(prefixes)}
        longest = max(map(len, prefixes))
        width = max(row.count for row in rows)
        starts = [min(len(row.prefix), self.model.args.max_seq_len - width) for row in rows]
        model = self.model
        try:
            with _eagerly():
                model.setup_cache(len(prefixes), max_seq_len=longest)
                model.hidden_states(_padded(prefixes, self._device))  # fills the caches
                sources = torch.tensor([which[row.prefix] for row in rows], device=self._device)
                tokens = _padded(
                    [row.inputs[start:] for row, start in zip(rows, starts, strict=True)], self._device
                )
                end = max(starts) + tokens.shape[1]
                for layer in model.layers:
                    layer.attention.cache = SlotKVCache.gathered(layer.attention.cache, sources, longest, end)
                hidden = model.hidden_states(tokens, torch.tensor(starts, device=self._device)[:, None])
        finally:
            model.clear_cache()
        return self._log_likelihoods(
            hidden, rows, [len(row.prefix) - start for row, start in zip(rows, starts, strict=True)]
        )

    def _log_likelihoods(
        self, hidden: torch.Tensor, rows: list[_Row], firsts: list[int]
    ) -> list[tuple[float, bool]]:
        """(ln p, greedy) of each row's targets, predicted at positions firsts[b] .. firsts[b] + count - 1
        of hidden's row b: the output layer and a float32 log-softmax at those positions only."""
        index = (
            torch.tensor([b for b, row in enumerate(rows) for _ in range(row.count)], device=self._device),
            torch.tensor(
                [p for row, first in zip(rows, firsts, strict=True) for p in range(first, first + row.count)],
                device=self._device,
            ),
        )
        log_probs = F.log_softmax(self.model.output(hidden[index]).float(), dim=-1)  # (N, V)
        targets = torch.tensor([t for row in rows for t in row.targets], device=self._device)
        chosen = log_probs.gather(1, targets[:, None]).squeeze(1)
        greedy = log_probs.argmax(dim=-1) == targets
        scores, first = [], 0
        for row in rows:
            span = slice(first, first + row.count)
            scores.append((float(chosen[span].sum()), bool(greedy[span].all())))
            first += row.count
        return scores

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """ln p(text) of each request, its windows scored with those of every other request in batches."""
        windows, owners = [], []
        for number, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (log_probability, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True
        ):
            totals[owner] += log_probability
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------- generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, in batches of requests with the same gen_kwargs, longest first."""
        groups: dict[str, list[int]] = defaultdict(list)
        for number, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(number)
        results: list[str | None] = [None] * len(requests)
        encoded = [self.tok_encode(request.args[0]) for request in requests]
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        for numbers in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[numbers[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tokenizer.eos_token)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_gen_toks
            if room < 1:
                raise ConfigError(
                    f"a task asks for {max_gen_toks} new tokens but the model's context is "
                    f"{self.max_length}: lower the task's max_gen_toks"
                )
            numbers = sorted(numbers, key=lambda n: (-len(encoded[n]), requests[n].args[0]))
            for first in range(0, len(numbers), self.batch_size):
                batch = numbers[first : first + self.batch_size]
                # an empty prompt (no text, no bos) starts from the prefix token, as loglikelihood does
                prompts = [encoded[n][-room:] or [self.prefix_token_id] for n in batch]
                texts = self._generate(prompts, until, max_gen_toks, kwargs)
                for n, text in zip(batch, texts, strict=True):
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _generate(
        self, prompts: list[list[int]], until: list[str], max_gen_toks: int, kwargs: dict[str, Any]
    ) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations of a batch, cut at the first stop string."""
        sampling: dict[str, Any] = {"temperature": 0.0, "eos_id": None}  # eos is one of our stop checks
        if kwargs.get("do_sample") and kwargs.get("temperature", 1.0) > 0:
            sampling = {
                "temperature": float(kwargs.get("temperature", 1.0)),
                "top_p": kwargs.get("top_p"),
                "top_k": kwargs.get("top_k"),
                "eos_id": None,
            }
        stop_ids = set(self.tokenizer.eos_ids)
        new_ids: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        # The loop stops (and frees its KV cache) as soon as every row is done, not at max_gen_toks.
        with contextlib.closing(
            _generator(iter_new_tokens(self.model, prompts, max_gen_toks, **sampling))
        ) as tokens:
            for row, token_id in tokens:
                if done[row]:
                    continue
                if token_id in stop_ids:
                    done[row] = True
                else:
                    new_ids[row].append(token_id)
                    done[row] = len(new_ids[row]) == max_gen_toks or any(
                        stop and stop in self.tokenizer.decode(new_ids[row]) for stop in until
                    )
                if all(done):
                    break
        return [
            postprocess_generated_text(self.tokenizer.decode(ids), until, think_end_token=None)
            for ids in new_ids
        ]


@dataclass(frozen=True)
class _Row:
    """One loglikelihood request as the model reads it: `inputs`, the last max_length + 1 tokens of context
    + continuation without the final one (only a target), scored at its last `count` positions, where
    they predict `targets`, the continuation's last `count` tokens. `prefix` is what comes before those
    positions, `own` the tokens at them."""

    inputs: list[int]
    count: int
    targets: list[int]

    @classmethod
    def of(cls, context: list[int], continuation: list[int], max_length: int) -> _Row:
        if not context or not continuation:
            raise ConfigError("a loglikelihood request needs a context and a continuation of 1 token or more")
        count = min(len(continuation), max_length)
        return cls((context + continuation)[-(max_length + 1) :][:-1], count, continuation[-count:])

    @property
    def prefix(self) -> tuple[int, ...]:
        return tuple(self.inputs[: -self.count])

    @property
    def own(self) -> list[int]:
        return self.inputs[-self.count :]


def _pack(groups: list[list[int]], batch_size: int, rows: list[_Row]) -> list[list[int]]:
    """Groups of rows that share a prefix, in batches for `_score_shared`, longest rows first. A batch holds
    at most batch_size prefixes, as `_score` holds batch_size rows, and as many rows as fit in the tokens of
    batch_size of its longest rows, counting each row at the batch's widest own part (how the second pass
    pads them): neither pass is larger than a `_score` pass of batch_size rows. A group that does not fit
    is split, each part running its prefix."""
    ordered = sorted(groups, key=lambda numbers: (-len(rows[numbers[0]].inputs), rows[numbers[0]].prefix))
    batches: list[list[int]] = []
    prefixes, width, longest = 0, 0, 0
    for group in ordered:
        new_group = True
        for number in group:
            row = rows[number]
            grown_width, grown_longest = max(width, row.count), max(longest, len(row.inputs))
            fits = (
                batches
                and prefixes + (1 if new_group else 0) <= batch_size
                and (len(batches[-1]) + 1) * grown_width <= batch_size * grown_longest
            )
            if fits:
                batches[-1].append(number)
                prefixes += 1 if new_group else 0
                width, longest = grown_width, grown_longest
            else:
                batches.append([number])
                prefixes, width, longest = 1, row.count, len(row.inputs)
            new_group = False
    return batches


def _padded(sequences, device: torch.device) -> torch.Tensor:
    """Token id lists as one right-padded (zeros) int64 tensor (len(sequences), longest)."""
    tokens = torch.zeros((len(sequences), max(map(len, sequences))), dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens.to(device)


def _eagerly() -> contextlib.AbstractContextManager:
    """A context in which compiled modules run eagerly (torch >= 2.6; a no-op before): the KV-cached passes
    of a model whose blocks training compiled (--eval-tasks) would otherwise recompile for every shape."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _generator(tokens: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """`tokens` as a generator, which contextlib.closing can close (an empty request is a plain iterator)."""
    yield from tokens
