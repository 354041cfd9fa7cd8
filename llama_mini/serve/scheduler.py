"""Continuous batching: many independent sequences decoded together, joining and leaving between steps.

The scheduler owns the model, its KV caches and the batch, and knows nothing of HTTP. A caller submits a
`SequenceRequest` (token ids and how to continue them) with a callback; the scheduler's thread calls it
with `PromptScored`, `NewToken` and finally `Finished` events as the sequence advances. Each iteration of
its loop (`step`), in the spirit of Orca (Yu et al. 2022), schedules per decode step, not per request:

    1. drop the sequences whose caller cancelled them (a client that went away): their slots free now;
    2. admit the oldest waiting sequences into free slots and feed them their prompts, `prefill_chunk`
       tokens in all at most, so that several short prompts start in one step and a long one is fed in
       chunks over several steps, never stalling the running streams for long; when a whole prompt is
       in, its first token is chosen and it joins the running batch;
    3. one decode step for every running sequence together: one forward pass of B rows, each at its own
       position (a SlotKVCache), then each row chooses its next token with its own sampling settings.

KV slots. The running sequences occupy rows 0 .. B-1 of one SlotKVCache per layer, in the order of
`self._running`; a prompt is prefilled alone in a one-row KVCache and then copied into the next free row;
when a sequence leaves, the last row moves into its place, so a decode step reads a slice of the cache.
Compiled (`compiled_in`, `serve --compile` on a CPU), the caches are StaticSlotKVCaches and a step of n
rows runs the compiled step of the smallest batch size that holds them (`CompiledDecode`).

Speculative decoding (`draft`, `serve --draft`). A sequence running alone is decoded in rounds of
llama_mini.generation.speculative: the draft proposes `draft_tokens` tokens and the model checks them in one
forward pass of its slot, emitting 1 to K + 1 tokens, each a NewToken event as usual. Only alone, because
a round is a forward pass of one row over K + 1 positions: the speed-up comes from reading the model's
weights once for several tokens, which a batch of B rows already does for B tokens, and rows that accept
different numbers of tokens would leave the batch at different positions with a draft cache per slot. So
the server is a speculative one under light load (one client: the latency that matters) and a batching one
under heavy load, the split vLLM makes with `speculative_disable_by_batch_size` (vllm-project/vllm#4592).
The draft keeps a one-row KV cache for the last sequence it drafted for; a sequence that runs alone again
(say after a neighbour finished) feeds the draft only the text it has not seen yet, in its first round.
Greedy requests give the tokens they give without a draft; sampled ones the same distribution (the
rejection rule keeps the model's), but a seeded sample never speculates, so that it draws the same tokens
whatever else is running, as without a draft. A sequence goes on without the draft past the draft's
context. The rounds run eagerly, also under `compiled_in` (whose steps have one position per row).

Sampling reuses llama_mini.generation's pure functions: temperature 0 is the argmax, otherwise
`sample_next` with the request's temperature, top-k and top-p and a generator of its own seeded with the
request's seed, so a seeded request draws the same tokens whatever else is in the batch (up to the float
rounding of batched matrix products, which does not change a draw short of an exact tie).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llama_mini.errors import LlamaMiniError
from llama_mini.generation import SamplingConfig, next_token_logits, sample_next
from llama_mini.generation.background import CoreForBuilds, start_build
from llama_mini.generation.speculative import DEFAULT_DRAFT_TOKENS, speculative_round
from llama_mini.model.cache import KVCache, SlotKVCache, StaticSlotKVCache
from llama_mini.model.transformer import Transformer
from llama_mini.ops import aot_step

__all__ = [
    "CompiledDecode",
    "Finished",
    "NewToken",
    "PromptScored",
    "QueueFull",
    "Scheduler",
    "Sequence",
    "SequenceRequest",
    "TokenLogprobs",
]

log = logging.getLogger("llama_mini.serve")


class QueueFull(LlamaMiniError):
    """Every slot is busy and the waiting queue is full: try again later."""


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to continue.

    prompt: token ids (non-empty), fed as they are.
    max_tokens: new tokens at most (0: only score the prompt). len(prompt) + max_tokens must fit the context.
    sampling: temperature, top_k, top_p, seed (an int; None draws one), and eos_id: the ids that end the
        sequence (not returned).
    top_logprobs: None for no log-probabilities; k >= 0 for each new token's log-probability and the k
        most likely tokens' at its position.
    prompt_logprobs: also score the prompt's tokens (each given the tokens before it), with top_logprobs
        alternatives each (PromptScored).
    """

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig(temperature=0.0)
    top_logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model (log_softmax of the raw logits, before temperature and
    filtering) and the `top` most likely tokens at its position, as (id, log-probability), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptScored:
    """The prompt's log-probabilities: None for the first token (nothing precedes it), then one per token."""

    logprobs: tuple[TokenLogprobs | None, ...]


@dataclass(frozen=True)
class NewToken:
    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Finished:
    """The sequence is over: reason "stop" (an eos id), "length" (max_tokens), "cancelled", or "error"
    (with a message)."""

    reason: str
    message: str = ""


Event = PromptScored | NewToken | Finished


@dataclass(eq=False)
class Sequence:
    """A submitted request and where it stands; `cancel()` is safe from any thread."""

    request: SequenceRequest
    emit: Callable[[Event], None]
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _wake: Callable[[], None] = lambda: None
    prefilled: int = 0  # prompt tokens already in the cache
    length: int = 0  # positions in the cache once running
    generated: int = 0  # new tokens emitted
    next_token: int = -1  # the token to feed at position `length`
    token_ids: list[int] = field(default_factory=list)  # the new tokens emitted (the text after the prompt)
    generator: torch.Generator | None = None
    prompt_scores: list[TokenLogprobs | None] = field(default_factory=list)

    def cancel(self) -> None:
        """Stop this sequence: its slot is freed at the scheduler's next step."""
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Scheduler:
    """Runs `model` over many sequences at once (see the module docstring). `start()` runs the loop in a
    thread of its own; `step()` runs one iteration (what the thread does, and what tests call directly).

    max_batch_size: sequences decoded together (KV slots); max_queue: sequences waiting for a slot before
    `submit` raises QueueFull; prefill_chunk: prompt tokens fed per iteration at most. decode_step:
    step(model, tokens (B, 1), positions (B, 1)) -> next-token logits (B, V), by default
    next_token_logits (torch.compile of it also works); compiled_in: a folder (or "" for none kept) to
    decode with steps compiled ahead of time instead (`CompiledDecode`, built or loaded here); with
    saved_only, only if that folder holds them all, else eager steps while the missing ones are built in the
    background for the next start (`CompiledDecode.saved`). draft: a
    model of the same vocabulary that proposes `draft_tokens` tokens per round for a sequence running
    alone (module docstring); its rounds run eagerly.
    """

    def __init__(
        self,
        model: Transformer,
        max_batch_size: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 128,
        decode_step: Callable[[Transformer, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        compiled_in: str | None = None,
        saved_only: bool = False,
        draft: Transformer | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ):
        self.model = model.eval()
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.decode_step = decode_step or next_token_logits
        args, weight = model.args, model.tok_embeddings.weight
        shape = dict(
            n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, dtype=weight.dtype, device=weight.device
        )
        self.device = weight.device
        context = args.max_seq_len
        slot_class = SlotKVCache if compiled_in is None else StaticSlotKVCache
        self._slots = [slot_class(max_batch_size, context, **shape) for _ in model.layers]
        self._prefill_cache = [KVCache(1, context, **shape) for _ in model.layers]
        self._compiled = None
        self._building: CoreForBuilds | None = None  # builds of the default's compiled steps, if running
        if compiled_in is not None:
            self._attach(self._slots)
            try:
                if saved_only:
                    self._compiled, self._building = CompiledDecode.saved(model, max_batch_size, compiled_in)
                else:
                    self._compiled = CompiledDecode(model, max_batch_size, compiled_in or None)
            finally:
                model.clear_cache()
            if self._compiled is None:  # not all saved yet: eager steps, over slots of the eager kind
                self._slots = [SlotKVCache(max_batch_size, context, **shape) for _ in model.layers]
            else:
                self.decode_step = self._compiled
        self._waiting: deque[Sequence] = deque()
        self._prefilling: Sequence | None = None
        self._running: list[Sequence] = []  # row i of the slot caches is self._running[i]
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (forward passes of the batch, or rounds), for tests and logs
        self.draft, self.draft_tokens = draft, draft_tokens
        self._draft_cache: list[KVCache] = []
        self._drafted_for: Sequence | None = None  # whose text the draft's cache holds, ...
        self._draft_fed = 0  # ... in its first _draft_fed positions
        self.rounds = self.drafted = self.accepted = 0  # speculative rounds, tokens drafted and accepted
        if draft is not None:
            draft.eval()
            draft_args, draft_weight = draft.args, draft.tok_embeddings.weight
            self._draft_cache = [
                KVCache(
                    1,
                    draft_args.max_seq_len,
                    n_kv_heads=draft_args.n_kv_heads,
                    head_dim=draft_args.head_dim,
                    dtype=draft_weight.dtype,
                    device=draft_weight.device,
                )
                for _ in draft.layers
            ]

    # ------------------------------------------------------------------------------- callers

    def submit(self, request: SequenceRequest, emit: Callable[[Event], None]) -> Sequence:
        """Queue a sequence; `emit` is called from the scheduler's thread with its events. Raises QueueFull
        when max_queue sequences are already waiting."""
        return self.submit_many([request], [emit])[0]

    def submit_many(
        self, requests: list[SequenceRequest], emits: list[Callable[[Event], None]]
    ) -> list[Sequence]:
        """Queue several sequences (a request's n choices) together: all, or none and QueueFull."""
        with self._condition:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} sequences are waiting for one of {self.max_batch_size} slots "
                    f"(at most {self.max_queue} may wait): retry shortly"
                )
            sequences = [
                Sequence(request, emit, _wake=self.wake)
                for request, emit in zip(requests, emits, strict=True)
            ]
            self._waiting.extend(sequences)
            self._condition.notify()
        return sequences

    def wake(self) -> None:
        with self._condition:
            self._condition.notify()

    @property
    def active(self) -> int:
        """Sequences holding a KV slot (prefilling or running)."""
        return len(self._running) + (self._prefilling is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llama-mini-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cancel every sequence and end the thread (each caller gets Finished("cancelled"))."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._cancel_all()
        if self._compiled is not None:
            self._compiled.close()

    # ------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._has_work():
                    self._condition.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - a failed step ends its sequences, not the server
                log.exception("a scheduler step failed")
                self._cancel_all(Finished("error", f"{type(error).__name__}: {error}"))

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def _cancel_all(self, event: Finished | None = None) -> None:
        with self._condition:
            sequences = [*self._waiting, *([self._prefilling] if self._prefilling else []), *self._running]
            self._waiting.clear()
            self._prefilling, self._running = None, []
        for sequence in sequences:
            sequence.emit(event or Finished("cancelled"))

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop cancelled sequences, feed waiting prompts (prefill_chunk tokens in all, at
        most), one decode step for the batch."""
        self._drop_cancelled()
        if self._building is not None:
            self._building()
        try:
            budget = self.prefill_chunk  # several short prompts may start in one step, a long one in many
            while budget > 0:
                with self._condition:
                    if (
                        self._prefilling is None
                        and self._waiting
                        and len(self._running) < self.max_batch_size
                    ):
                        self._prefilling = self._waiting.popleft()
                if self._prefilling is None:
                    break
                budget -= self._prefill_chunk(self._prefilling, budget)
            if self._running and not self._speculate():
                self._decode()
        finally:
            self.model.clear_cache()  # the caches are the scheduler's: the model is left as it was given
            if self.draft is not None:
                self.draft.clear_cache()

    def _drop_cancelled(self) -> None:
        with self._condition:
            dropped = [sequence for sequence in self._waiting if sequence.cancelled]
            for sequence in dropped:
                self._waiting.remove(sequence)
            if self._prefilling is not None and self._prefilling.cancelled:
                dropped.append(self._prefilling)
                self._prefilling = None
        leaving = [row for row, sequence in enumerate(self._running) if sequence.cancelled]
        dropped += [self._running[row] for row in leaving]
        self._free_rows(leaving)
        for sequence in dropped:
            sequence.emit(Finished("cancelled"))

    def _attach(self, caches: list[KVCache]) -> None:
        for layer, cache in zip(self.model.layers, caches, strict=True):
            layer.attention.cache = cache

    def _prefill_chunk(self, sequence: Sequence, size: int) -> int:
        """Feed the next `size` tokens of the prompt (at most) into the one-row prefill cache; after the last
        chunk, score its next token and move the sequence into a slot of the batch. Returns the tokens fed."""
        request = sequence.request
        start = sequence.prefilled
        chunk = request.prompt[start : start + size]
        tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, T)
        self._attach(self._prefill_cache)
        last = start + len(chunk) == len(request.prompt)
        if request.prompt_logprobs:
            logits = self.model(tokens, start)[0].float()  # (T, V): every position's next-token scores
            self._score_prompt(sequence, logits)
            logits = logits[-1:]
        elif last:
            logits = next_token_logits(self.model, tokens, start).float()  # (1, V)
        else:
            self.model.hidden_states(tokens, start)  # fills the cache; no scores needed yet
        sequence.prefilled += len(chunk)
        if not last:
            return len(chunk)
        self._prefilling = None
        if request.prompt_logprobs:
            sequence.emit(PromptScored(tuple(sequence.prompt_scores)))
        if request.max_tokens == 0:
            sequence.emit(Finished("length"))
            return len(chunk)
        row = len(self._running)
        for slot, prefill in zip(self._slots, self._prefill_cache, strict=True):
            slot.copy_row_from(row, prefill, len(request.prompt))
        sequence.length = len(request.prompt)
        sampling = request.sampling
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
            sequence.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._running.append(sequence)
        if not self._choose([sequence], logits):
            self._free_rows([row])
        return len(chunk)

    def _score_prompt(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt's tokens from the chunk's logits (T, V): position t scores t+1."""
        request, start = sequence.request, sequence.prefilled
        if start == 0:
            sequence.prompt_scores = [None]
        logprobs = logits.log_softmax(dim=-1)
        following = request.prompt[start + 1 : start + 1 + logprobs.shape[0]]
        for position, token_id in enumerate(following):
            sequence.prompt_scores.append(_token_logprobs(logprobs[position], token_id, request.top_logprobs))

    def _decode(self) -> None:
        """One forward pass for every running sequence, each at its own position, then each chooses."""
        self._attach(self._slots)
        tokens = torch.tensor([[s.next_token] for s in self._running], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.length] for s in self._running], dtype=torch.long, device=self.device)
        logits = self.decode_step(self.model, tokens, positions).float()  # (B, V)
        self.steps += 1
        for sequence in self._running:
            sequence.length += 1
        running = list(self._running)
        finished = [row for row, keep in enumerate(self._choose(running, logits, many=True)) if not keep]
        self._free_rows(finished)

    def _speculate(self) -> bool:
        """A round of speculative decoding when one sequence runs alone (module docstring): the draft
        proposes up to draft_tokens tokens, the model checks them in one pass of row 0, and the tokens it
        keeps are emitted. False, with nothing done, when this step is the batch's (_decode)."""
        if self.draft is None or len(self._running) != 1 or self._prefilling is not None:
            return False
        if self._waiting and self.max_batch_size > 1:
            return False  # a slot is free for it: its prompt goes in next step, then the batch decodes
        sequence = self._running[0]
        request, sampling = sequence.request, sequence.request.sampling
        if sampling.temperature > 0 and sampling.seed is not None:
            return False  # a seeded sample draws as it would without a draft, whatever else runs
        known = sequence.length + 1  # the text so far: the prompt and the new tokens, the last not yet fed
        # Up to K + 1 tokens a round: no more than the request may still take, and every position fed to
        # either model inside its context (the model's: known + k - 1 at most; the draft's: known + k - 2).
        k = min(
            self.draft_tokens,
            request.max_tokens - sequence.generated - 1,
            self.model.args.max_seq_len - known,
            self.draft.args.max_seq_len - known + 1,
        )
        if k < 1:
            return False
        if self._drafted_for is not sequence:
            self._drafted_for, self._draft_fed = sequence, 0  # the draft's cache holds another text
        text = torch.tensor(
            [*request.prompt, *sequence.token_ids, *[0] * (k + 1)], dtype=torch.long, device=self.device
        )
        self._attach(self._slots)
        for layer, cache in zip(self.draft.layers, self._draft_cache, strict=True):
            layer.attention.cache = cache
        result = speculative_round(
            self.model,
            self.draft,
            text,
            known,
            self._draft_fed,
            k,
            sampling,
            sequence.generator,
            model_start=lambda position: torch.tensor([[position]], device=self.device),  # row 0's
        )
        self._draft_fed = result.draft_fed
        self.steps += 1
        self.rounds += 1
        self.drafted += k
        self.accepted += result.accepted
        for offset, token_id in enumerate(result.new_tokens):
            # The model's cache holds the positions before this token's, as after a decode step.
            sequence.length = known + offset
            if not self._emit(sequence, token_id, result.scores[offset]):
                self._free_rows([0])
                break
        return True

    def _choose(self, sequences: list[Sequence], logits: torch.Tensor, many: bool = False):
        """Choose each sequence's next token from its row of logits (B, V) and emit it; True for each
        sequence that goes on (a list when `many`, else one bool)."""
        greedy_ids = logits.argmax(dim=-1).tolist()  # one read for every greedy row
        keep = []
        for row, sequence in enumerate(sequences):
            sampling = sequence.request.sampling
            if sampling.temperature == 0:
                token_id = greedy_ids[row]
            else:
                token_id = int(
                    sample_next(
                        logits[row : row + 1], sampling.temperature, sampling.top_k, sampling.top_p,
                        [sequence.generator],
                    )[0]
                )  # fmt: skip
            keep.append(self._emit(sequence, token_id, logits[row]))
        return keep if many else keep[0]

    def _emit(self, sequence: Sequence, token_id: int, logits: torch.Tensor) -> bool:
        """Emit `token_id`, chosen from the model's logits (V,) at position sequence.length, and whatever
        ends the sequence; True when it goes on."""
        request = sequence.request
        if token_id in request.sampling.stop_ids:
            sequence.emit(Finished("stop"))
            return False
        scores = None
        if request.top_logprobs is not None:
            scores = _token_logprobs(logits.float().log_softmax(dim=-1), token_id, request.top_logprobs)
        sequence.generated += 1
        sequence.next_token = token_id
        sequence.token_ids.append(token_id)
        sequence.emit(NewToken(token_id, scores))
        full = sequence.length + 1 > self.model.args.max_seq_len  # no position left to feed it at
        if sequence.generated >= request.max_tokens or full:
            sequence.emit(Finished("length"))
            return False
        return True

    def _free_rows(self, rows: list[int]) -> None:
        """Remove the running sequences at `rows`; the last rows move into the gaps (rows stay 0 .. B-1)."""
        for row in sorted(rows, reverse=True):  # from the end: a later row to remove is gone already
            last = len(self._running) - 1
            if row != last:
                moved = self._running[last]
                for slot in self._slots:
                    slot.move_row(last, row, moved.length)
                self._running[row] = moved
            self._running.pop()


class CompiledDecode:
    """The batched decode step, next_token_logits, compiled ahead of time (llama_mini.ops.aot_step) for
    batches of 1, 2, 4, ... and max_batch_size rows, each built once (10-15 s on two cores) or loaded from
    `folder`. A step of n running rows runs the smallest that holds them; the extra rows are free slots,
    fed token 0 at position 0, which a slot's prefill overwrites before it is ever read.

    Built while the model holds the scheduler's StaticSlotKVCaches, and bound to them (and the weights) by
    reference once, for the scheduler's lifetime: `close()` lets them go.
    """

    def __init__(self, model: Transformer, max_batch_size: int, folder: str | None):
        self.sizes = self.batch_sizes(max_batch_size)
        self._stack = contextlib.ExitStack()
        self._runs = {}
        for size in self.sizes:
            step = aot_step.compiled_step(next_token_logits, model, self.example_inputs(size), folder)
            self._runs[size] = self._stack.enter_context(step.bound_to(model))

    @staticmethod
    def batch_sizes(max_batch_size: int) -> list[int]:
        return sorted({min(2**k, max_batch_size) for k in range(max_batch_size.bit_length() + 1)})

    @staticmethod
    def example_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros((size, 1), dtype=torch.long), torch.zeros((size, 1), dtype=torch.long)

    @classmethod
    def saved(
        cls, model: Transformer, max_batch_size: int, folder: str
    ) -> tuple[CompiledDecode | None, CoreForBuilds | None]:
        """`serve`'s default: the steps for every batch size if `folder` holds them all (loaded, under a
        second), else None, with the missing ones being built in a background process, one after another,
        for the next start (llama_mini.generation.background; the model holds its static slot caches), and
        the CoreForBuilds the scheduler's thread calls before each step meanwhile."""
        missing = [
            size
            for size in cls.batch_sizes(max_batch_size)
            if aot_step.saved_step(next_token_logits, model, cls.example_inputs(size), folder) is None
        ]
        if not missing:
            return cls(model, max_batch_size, folder), None
        started = [
            start_build(next_token_logits, model, cls.example_inputs(size), folder) for size in missing
        ]
        if any(started):
            log.warning(
                "decoding with eager steps: the compiled steps for %s rows are being built in the background "
                "(in %s), for the next start",
                ", ".join(map(str, missing)),
                folder,
            )
        return None, CoreForBuilds(started)

    def __call__(self, model: Transformer, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        size = next(size for size in self.sizes if size >= rows)
        if size > rows:
            padding = torch.zeros((size - rows, 1), dtype=torch.long, device=tokens.device)
            tokens, positions = torch.cat([tokens, padding]), torch.cat([positions, padding])
        return self._runs[size](tokens.contiguous(), positions.contiguous())[0][:rows]

    def close(self) -> None:
        self._stack.close()


def _token_logprobs(logprobs: torch.Tensor, token_id: int, top: int | None) -> TokenLogprobs:
    """TokenLogprobs of `token_id` from one position's log-probabilities (V,), with `top` alternatives."""
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(float(logprobs[token_id]), alternatives)
