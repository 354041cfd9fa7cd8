"""Speculative decoding: a small draft model proposes tokens, the model checks them all in one forward pass.

    Speculation(draft, draft_tokens)                 what `generate`/`stream` run with a draft (the command's)
    speculative_generate(model, draft, prompts, ...) the new tokens of each prompt, collected in lists
    iter_speculative(model, draft, prompts, ...)     the loop; yields (row, token_id) as tokens are accepted
    speculative_stream(model, draft, tokenizer, ...) one prompt's text, piece by piece
    speculative_round(model, draft, tokens, ...)     one round on caches the caller holds (llama-mini serve's)
    check_draft(model, draft)                        a draft must share the model's vocabulary
    SpeculativeStats                                 GenerationStats plus the tokens drafted and accepted

The method (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al.
2023, "Accelerating Large Language Model Decoding with Speculative Sampling"). Decoding a large model is
bound by reading its weights once per token; a forward pass over K + 1 positions costs little more than over
one. So each round:

    1. the draft model, small and cheap, proposes K tokens x_1 .. x_K one at a time, each drawn from its
       distribution q_i (after the same temperature, top-k, top-p and repetition penalty as the model's);
    2. the model scores the K + 1 positions after the text in one forward pass: p_1 .. p_{K+1};
    3. x_i is accepted, in order, with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a
       token is drawn from the residual norm(max(0, p_i - q_i)) and the round ends; if all K are accepted, a
       (K+1)-th token is drawn from p_{K+1}.

Every token so emitted is distributed exactly as if drawn from the model's p alone (Leviathan et al.,
Appendix A.1: P(x) = min(p, q)(x) + (1 - sum min(p, q)) * norm(max(0, p - q))(x) = p(x)), so the draft
changes the speed, never the distribution; a round emits between 1 and K + 1 tokens for one forward pass of
the model and K of the draft. Greedy decoding (temperature 0) is the limit where p and q are one-hot: x_i
is accepted while it is the model's argmax, and the first disagreement is replaced by the model's argmax,
so the tokens are those of greedy decoding without a draft (up to the float rounding of scoring K + 1
positions in one pass instead of one by one, which changes an argmax only at an exact near-tie).

KV caches. Each model keeps a plain `KVCache` (eager steps, positions as ints) and the loop remembers how
many positions of each are valid. Rolling a cache back after a rejection is only lowering that count: the
rejected positions' keys and values stay in the buffer until the next forward pass overwrites them, and
`KVCache.update` returns keys 0 .. start_pos + T - 1 only, so nothing beyond the valid prefix is ever read.

Scope: one sequence at a time (a batch of prompts runs its rows one after the other), with eager steps
(a compiled step has fixed shapes, T = 1, and the check feeds K + 1 positions). The row's samples are
drawn from one generator seeded like row r of `iter_new_tokens` (row_seed(seed, r)), so a seed makes a run
repeatable, but the text differs from decoding without a draft with the same seed: the same distribution,
other draws. Speed-ups and acceptance rates: docs/BENCHMARKS.md, "Speculative decoding"
(bench/speculative.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llama_mini.errors import ConfigError
from llama_mini.generation.decode import (
    GenerationStats,
    _row_seeds,
    check_request,
    resolve_settings,
)
from llama_mini.generation.sampling import (
    GenerationError,
    SamplingConfig,
    apply_repetition_penalty,
    apply_temperature,
    top_k_filter,
    top_p_filter,
)
from llama_mini.generation.steps import DecodeOptions, ensure_cache
from llama_mini.generation.streaming import _stream_text
from llama_mini.model.transformer import Transformer
from llama_mini.runtime import clock

if TYPE_CHECKING:
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_DRAFT_TOKENS",
    "Round",
    "Speculation",
    "SpeculativeStats",
    "check_draft",
    "iter_speculative",
    "speculative_generate",
    "speculative_round",
    "speculative_stream",
    "target_probabilities",
]

DEFAULT_DRAFT_TOKENS = 4  # K: tokens the draft proposes per round (docs/BENCHMARKS.md for other values)


@dataclass
class SpeculativeStats(GenerationStats):
    """GenerationStats of a speculative run, plus what the draft did.

    rounds: forward passes of the model after the prefill (one per round); drafted: tokens the draft
    proposed; accepted: those the model kept. decode_tokens counts the positions the model scored (K + 1 per
    round, the draft's not included), so decode_tokens_per_second is the model's throughput, not the text's:
    new_tokens / decode_seconds is that.
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """The share of drafted tokens the model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per forward pass of the model (1 without a draft, at most K + 1)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    def summary(self) -> str:
        """GenerationStats' line, then the draft's acceptance."""
        speed = self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
        return (
            f"prefill: {self.prefill_tokens} tokens in {self.prefill_seconds:.3f} s; decode: "
            f"{self.new_tokens} new tokens in {self.decode_seconds:.3f} s ({speed:.1f} tokens/s); draft: "
            f"{self.accepted} of {self.drafted} tokens accepted ({100 * self.acceptance_rate:.1f}%), "
            f"{self.tokens_per_round:.2f} tokens per forward pass of the model"
        )


def check_draft(model: Transformer, draft: Transformer) -> None:
    """ConfigError unless `draft` can propose tokens for `model`: the same vocabulary size (whether the two
    share one tokenizer is the caller's to check, who holds the tokenizers: generation/command.py)."""
    if draft.args.vocab_size != model.args.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary has {draft.args.vocab_size} tokens but the model's "
            f"{model.args.vocab_size}: pass a draft trained with the model's tokenizer"
        )


def _check_draft_tokens(draft_tokens: int) -> None:
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise GenerationError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")


# ---------------------------------------------------------------------------------------------------------
# Requests: the same shapes as decode.generate / iter_new_tokens and streaming.stream
# ---------------------------------------------------------------------------------------------------------


def speculative_generate(
    model: Transformer,
    draft: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    options: DecodeOptions | None = None,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> list[list[int]]:
    """`decode.generate` with `draft` proposing `draft_tokens` tokens per round (module docstring)."""
    new_ids: list[list[int]] = [[] for _ in prompts]
    tokens = iter_speculative(
        model,
        draft,
        prompts,
        max_new_tokens,
        sampling,
        draft_tokens=draft_tokens,
        options=options,
        stats=stats,
        **settings,
    )
    for row, token_id in tokens:
        new_ids[row].append(token_id)
    return new_ids


def iter_speculative(
    model: Transformer,
    draft: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    options: DecodeOptions | None = None,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> Iterator[tuple[int, int]]:
    """`decode.iter_new_tokens` with a draft model: yields (row, token_id) as tokens are accepted.

    The rows run one after the other, each from its own generator (seeded as in iter_new_tokens). The
    tokens follow the model's distribution exactly (greedy: its argmax); `draft` decides only how many come
    per forward pass of the model. options is accepted for the same signature and not used: the steps run
    eagerly (module docstring). stats: a GenerationStats, or a SpeculativeStats to count the draft's tokens.
    Invalid arguments raise GenerationError (ConfigError for a draft of another vocabulary) here, before the
    first token.
    """
    sampling, _ = resolve_settings(sampling, options, settings)
    prompts = [[int(token_id) for token_id in prompt] for prompt in prompts]
    check_draft(model, draft)
    _check_draft_tokens(draft_tokens)
    check_request(model, prompts, max_new_tokens)
    check_request(draft, prompts, max_new_tokens)  # the draft's context must hold the text too
    use_seeds = sampling.temperature > 0 or sampling.seed is not None
    seeds = _row_seeds(sampling.seed, len(prompts)) if use_seeds else None
    if not prompts or max_new_tokens == 0:
        return iter(())
    stats = stats if stats is not None else SpeculativeStats()
    return _rows(model, draft, prompts, max_new_tokens, sampling, draft_tokens, seeds, stats)


def speculative_stream(
    model: Transformer,
    draft: Transformer,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    options: DecodeOptions | None = None,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> Iterator[str]:
    """`streaming.stream` with a draft model: one prompt's text, piece by piece."""
    sampling, options = resolve_settings(sampling, options, settings)
    if sampling.eos_id is None:
        sampling = sampling.replace(eos_id=getattr(tokenizer, "eos_ids", None) or tokenizer.eos_id)
    prompt_ids = tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
    tokens = iter_speculative(
        model,
        draft,
        [prompt_ids],
        max_new_tokens,
        sampling,
        draft_tokens=draft_tokens,
        options=options,
        stats=stats,
    )
    return _stream_text(tokenizer, prompt_ids, tokens)


@dataclass(frozen=True)
class Speculation:
    """A draft model and its tokens per round, with `generate` and `stream` of decode.generate's and
    streaming.stream's signatures: what the generate command calls instead of those when given --draft."""

    draft: Transformer
    draft_tokens: int = DEFAULT_DRAFT_TOKENS

    def generate(self, model: Transformer, prompts, max_new_tokens: int, sampling=None, **keywords):
        return speculative_generate(
            model, self.draft, prompts, max_new_tokens, sampling, draft_tokens=self.draft_tokens, **keywords
        )

    def stream(self, model: Transformer, tokenizer, prompt, max_new_tokens: int, sampling=None, **keywords):
        return speculative_stream(
            model,
            self.draft,
            tokenizer,
            prompt,
            max_new_tokens,
            sampling,
            draft_tokens=self.draft_tokens,
            **keywords,
        )


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def _rows(
    model: Transformer,
    draft: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig,
    draft_tokens: int,
    seeds: list[int] | None,
    stats: GenerationStats,
) -> Iterator[tuple[int, int]]:
    """Each row in turn, both models in eval mode with a KV cache for one row (removed afterwards if a
    model had none, as decode.iter_new_tokens does)."""
    device = model.tok_embeddings.weight.device
    length = max(len(prompt) for prompt in prompts) + max_new_tokens
    was_training = model.training, draft.training
    model.eval()
    draft.eval()
    made = ensure_cache(model, 1, length), ensure_cache(draft, 1, length)
    try:
        for row, prompt in enumerate(prompts):
            generator = None
            if seeds is not None:
                generator = torch.Generator(device=device).manual_seed(seeds[row])
            for token_id in _speculate(
                model, draft, prompt, max_new_tokens, sampling, draft_tokens, generator, stats
            ):
                yield row, token_id
    finally:
        for network, training, made_cache in zip((model, draft), was_training, made, strict=True):
            network.train(training)
            if made_cache:
                network.clear_cache()


@torch.inference_mode()
def _speculate(
    model: Transformer,
    draft: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    draft_tokens: int,
    generator: torch.Generator | None,
    stats: GenerationStats,
) -> Iterator[int]:
    """One row: prefill both caches, then rounds of draft, check and accept (the module docstring).

    tokens (n + max_new_tokens,) holds the text; `known` of its positions are final. The model's cache holds
    the first known - 1 of them and the draft's its first `draft_fed`, always fewer than `known`: the last
    known token is fed with the next round's tokens (speculative_round).
    """
    device = model.tok_embeddings.weight.device
    draft_device = draft.tok_embeddings.weight.device
    counting = isinstance(stats, SpeculativeStats)
    tokens = torch.zeros(len(prompt) + max_new_tokens, dtype=torch.long, device=device)
    tokens[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    known = len(prompt)
    start = clock(device)
    model_fed = draft_fed = known - 1  # the prompt but its last token, whose scores the first round reads
    if model_fed > 0:
        model.hidden_states(tokens[None, :model_fed], 0)
        draft.hidden_states(tokens[None, :draft_fed].to(draft_device), 0)
    now = clock(device)
    stats.prefill_tokens += known
    stats.prefill_seconds += now - start
    start = now
    produced = 0
    while produced < max_new_tokens:
        # A round emits up to K + 1 tokens: draft no more than the row may still produce, less one.
        k = min(draft_tokens, max_new_tokens - produced - 1)
        result = speculative_round(model, draft, tokens, known, draft_fed, k, sampling, generator)
        stats.decode_steps += 1
        stats.decode_tokens += k + 1
        if counting:
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += result.accepted
        known += len(result.new_tokens)
        draft_fed = result.draft_fed
        stats.decode_seconds += clock(device) - start
        for token_id in result.new_tokens:
            if token_id in sampling.stop_ids:
                return
            produced += 1
            stats.new_tokens += 1
            yield token_id  # with the clock stopped: the caller's time is not ours
        start = clock(device)


@dataclass(frozen=True)
class Round:
    """What one round of speculative_round gave: `accepted` of the drafted tokens kept, then the new tokens
    (those and the model's own next one, accepted + 1 ids), the model's logits at each new token's position
    (accepted + 1, V: the scores it was chosen from, for log-probabilities), and how many positions of the
    draft's cache hold the text (draft_fed)."""

    accepted: int
    new_tokens: list[int]
    scores: torch.Tensor
    draft_fed: int


@torch.inference_mode()
def speculative_round(
    model: Transformer,
    draft: Transformer,
    tokens: torch.Tensor,
    known: int,
    draft_fed: int,
    k: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    model_start: Callable[[int], int | torch.Tensor] = int,
) -> Round:
    """One round (module docstring): the draft proposes k tokens, the model checks them in one pass.

    tokens (>= known + k + 1,) on the model's device holds the text; its first `known` positions are final,
    and the round writes the new tokens after them. The model's cache holds positions 0 .. known - 2 (the
    last known token is fed with the drafted ones); the draft's holds 0 .. draft_fed - 1, any number below
    known (0 for a draft that has seen nothing of this text: its first step feeds the rest). model_start
    turns a position into the start_pos the model's cache takes: the int itself for a KVCache, a (1, 1)
    tensor for a row of a SlotKVCache (a server's batch of one, llama_mini.serve.scheduler).
    """
    device, draft_device = tokens.device, draft.tok_embeddings.weight.device
    model_fed = known - 1
    draft_scores = []  # the draft's logits for positions known .. known + k - 1, each (V,)
    for i in range(k):
        fed = tokens[draft_fed : known + i].to(draft_device)
        logits = _scores(draft, fed, draft_fed, 1)[0].to(device)
        draft_fed = known + i
        draft_scores.append(logits)
        previous = _contexts(tokens, known + i, 1, sampling)
        tokens[known + i] = _choose(logits[None], previous, sampling, generator, known + i)[0]
    # The model scores positions known .. known + k, each after the text before it, in one pass.
    model_scores = _scores(model, tokens[model_fed : known + k], model_start(model_fed), k + 1)  # (k + 1, V)
    previous = _contexts(tokens, known, k + 1, sampling)
    accepted, last = _verify(
        model_scores, draft_scores, tokens[known : known + k], previous, sampling, generator, known
    )
    tokens[known + accepted] = last
    new_tokens = tokens[known : known + accepted + 1].tolist()
    # The rejected draft's positions are rolled back: written over next round.
    return Round(accepted, new_tokens, model_scores[: accepted + 1], min(draft_fed, known + accepted))


def _scores(
    model: Transformer, tokens: torch.Tensor, start_pos: int | torch.Tensor, count: int
) -> torch.Tensor:
    """Feed tokens (T,) at start_pos.. into the model's cache; the logits of its last `count` positions,
    (count, V): the next-token scores after each. As decode.next_token_logits, the output layer runs on
    those positions only, and on a CPU as weight @ h^T (the faster MKL kernel for few rows)."""
    h = model.hidden_states(tokens[None], start_pos)[0, -count:]  # (count, dim)
    if h.device.type == "cpu":
        return (model.output.weight @ h.T).T
    return model.output(h)


def _contexts(tokens: torch.Tensor, first: int, count: int, sampling: SamplingConfig) -> torch.Tensor | None:
    """None without a repetition penalty; with one, what it reads for positions first .. first + count - 1:
    row i holds the text before position first + i, padded to one width with the text's first token (a token
    it holds already, and the penalty counts each id once). (count, first + count - 1)."""
    if _penalty(sampling) is None:
        return None
    width = first + count - 1
    rows = tokens[:width].expand(count, width).clone()
    past_end = (
        torch.arange(width, device=tokens.device)[None, :]
        >= first + torch.arange(count, device=tokens.device)[:, None]
    )
    return rows.masked_fill_(past_end, int(tokens[0]))


def _penalty(sampling: SamplingConfig) -> float | None:
    return None if sampling.repetition_penalty in (None, 1.0) else sampling.repetition_penalty


def target_probabilities(
    logits: torch.Tensor, previous: torch.Tensor | None, sampling: SamplingConfig
) -> torch.Tensor:
    """The distribution a token is drawn from, for temperature > 0: logits (T, V) with the text before
    each row's position (T, L) -> probabilities (T, V) in float32, after the repetition penalty,
    temperature, top-k and top-p, in the order and precision of decode.sample_rows and
    sampling.sample_next. The model's p and the draft's q are both this of their logits."""
    logits = logits.float()
    penalty = _penalty(sampling)
    if penalty is not None:
        logits = apply_repetition_penalty(logits, previous, penalty)
    logits = apply_temperature(logits, sampling.temperature)
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None:
        logits = top_p_filter(logits, sampling.top_p)
    return logits.softmax(dim=-1)


def _greedy(logits: torch.Tensor, previous: torch.Tensor | None, sampling: SamplingConfig) -> torch.Tensor:
    """The greedy choices of logits (T, V): the argmax, after the repetition penalty if one is set (in
    float32, as decode.sample_rows; without one on the logits as they are, as decode.greedy_ids)."""
    penalty = _penalty(sampling)
    if penalty is not None:
        logits = apply_repetition_penalty(logits.float(), previous, penalty)
    return logits.argmax(dim=-1)


def _check_finite(logits: torch.Tensor, position: int) -> None:
    if not torch.isfinite(logits).all():
        raise GenerationError(
            f"the logits at position {position} are not finite (NaN or inf): the model's or the draft's "
            "weights are broken, or they overflow in this dtype; try --dtype fp32, or an earlier checkpoint"
        )


def _choose(
    logits: torch.Tensor,
    previous: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    position: int,
) -> torch.Tensor:
    """The draft's proposals for logits (T, V): greedy or drawn from its transformed distribution, (T,)."""
    _check_finite(logits, position)
    if sampling.temperature == 0:
        return _greedy(logits, previous, sampling)
    probs = target_probabilities(logits, previous, sampling)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _verify(
    model_scores: torch.Tensor,
    draft_scores: list[torch.Tensor],
    drafted: torch.Tensor,
    previous: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    position: int,
) -> tuple[int, int]:
    """How many of the k drafted tokens the model accepts, and the token that follows them.

    model_scores (k + 1, V): the model's logits for the k drafted positions and the one after; draft_scores:
    the draft's k logits (V,); drafted (k,): its proposals; previous (k + 1, L): each position's text.
    """
    k = len(draft_scores)
    _check_finite(model_scores, position)
    if sampling.temperature == 0:
        wanted = _greedy(model_scores, previous, sampling).tolist()  # (k + 1,)
        proposed = drafted.tolist()
        accepted = next((i for i in range(k) if proposed[i] != wanted[i]), k)
        return accepted, wanted[accepted]
    p = target_probabilities(model_scores, previous, sampling)  # (k + 1, V)
    if k:
        q = target_probabilities(
            torch.stack(draft_scores), None if previous is None else previous[:k], sampling
        )  # (k, V)
        rows = torch.arange(k, device=p.device)
        p_drafted, q_drafted = p[rows, drafted], q[rows, drafted]  # (k,): q > 0, the draft drew them
        # Accept x_i with probability min(1, p(x_i) / q(x_i)): u < p / q for u uniform in [0, 1).
        uniform = torch.rand(k, generator=generator, device=p.device)
        rejected = (uniform * q_drafted >= p_drafted).tolist()
        accepted = next((i for i in range(k) if rejected[i]), k)
        if accepted < k:
            residual = (p[accepted] - q[accepted]).clamp(min=0)
            # p(x) < q(x) makes p - q positive somewhere; a sum of 0 is only float rounding of p == q.
            if not residual.sum() > 0:
                residual = p[accepted]
            return accepted, int(torch.multinomial(residual, 1, generator=generator))
    else:
        accepted = 0
    return accepted, int(torch.multinomial(p[accepted], 1, generator=generator))
