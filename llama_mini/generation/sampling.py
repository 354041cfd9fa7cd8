"""Sampling: the settings of a generation request, and pure functions over next-token logits (B, V).

    SamplingConfig                                   temperature, top-k, top-p, repetition penalty, eos, ...
    apply_repetition_penalty, apply_temperature,     logits (B, V) -> logits (B, V)
    top_k_filter, top_p_filter
    sample_next                                      logits (B, V) -> token ids (B,)
    row_seed                                         the seed of one row of a batch

Nothing here touches a model; llama_mini/generation/decode.py runs the model and calls these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llama_mini.errors import LlamaMiniError
from llama_mini.settings import setting

__all__ = [
    "GenerationError",
    "SamplingConfig",
    "apply_repetition_penalty",
    "apply_temperature",
    "row_seed",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]


class GenerationError(LlamaMiniError, ValueError):
    """A generation request is invalid: an empty or too-long prompt, a token id outside the vocabulary,
    or a sampling setting out of range."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen, and when a row stops. `generate`, `iter_new_tokens` and `stream` take
    one (`sampling=`) or its fields as keywords; generate.py's flags are made from these declarations, with
    these defaults. How the decode step runs (compiled or not) is a separate setting: generation/steps.py's
    `DecodeOptions`.

    The defaults are the project's one choice for open-ended sampling, used by the library, generate.py, the
    trainer's samples and the generation_config.json of saved checkpoints: temperature 0.8 with nucleus
    sampling at p = 0.9 (Holtzman et al. 2019) keeps the text lively without the incoherent tail that plain
    sampling at temperature 1 draws from a small model's flat distribution; top-k and the repetition penalty
    are off. Pass temperature=0 for greedy decoding.
    """

    temperature: float = setting(0.8, "0 = greedy; below 1 sharpens the distribution, above 1 flattens it")
    top_k: int | None = setting(None, "sample from the K most likely tokens (none = off)")
    top_p: float | None = setting(
        0.9, "sample from the most likely tokens whose probabilities sum to P (none or 1 = off)"
    )
    repetition_penalty: float | None = setting(
        None, "CTRL's penalty on tokens already in the text, 1.1-1.3 typical (none or 1 = off)"
    )
    eos_id: int | tuple[int, ...] | None = setting(
        None, "end-of-sequence id(s): a row stops when it samples one (none or negative = never)", flag=False
    )
    seed: int | tuple[int, ...] | None = setting(
        None,
        "an int seeds row i with row_seed(seed, i); a list gives each row's seed; none = random",
        flag=False,
    )

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        top_k = self.top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise GenerationError(f"top_k must be an integer >= 1, or None to turn it off; got {top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], or None to turn it off; got {self.top_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise GenerationError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}"
            )
        # A list of seeds or eos ids is stored as a tuple, so the frozen config stays hashable.
        if isinstance(self.seed, Sequence) and not isinstance(self.seed, str):
            object.__setattr__(self, "seed", tuple(self.seed))
        if isinstance(self.eos_id, Sequence) and not isinstance(self.eos_id, str):
            object.__setattr__(self, "eos_id", tuple(self.eos_id))

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a row (sentencepiece's "no such piece", -1, never does)."""
        ids = self.eos_id if isinstance(self.eos_id, tuple) else (self.eos_id,)
        return frozenset(int(i) for i in ids if i is not None and i >= 0)

    def replace(self, **changes) -> SamplingConfig:
        """A copy with `changes`; an unknown name is a TypeError, as for any function's keywords."""
        return dataclasses.replace(self, **changes)


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make tokens already in the context less likely (CTRL, Keskar et al. 2019): (B, V) -> (B, V).

    For every id in row b of `previous_ids` (B, T): logit / penalty if the logit is positive, logit * penalty
    if negative, so penalty > 1 always lowers it (dividing a negative logit would raise it). Each id counts
    once however often it occurred. penalty = 1 changes nothing. The same rule as transformers'
    `RepetitionPenaltyLogitsProcessor`.
    """
    scores = logits.gather(-1, previous_ids)  # (B, T): the logits of the ids seen so far
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, previous_ids, scores)  # a repeated id writes the same value twice


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, (B, V) -> (B, V), for temperature > 0.

    softmax(logits / t) sharpens the distribution for t < 1 (t -> 0 tends to argmax) and flattens it for
    t > 1. Temperature 0 is not a division: `sample_next` takes the argmax instead.
    """
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row and set the rest to -inf: (B, V) -> (B, V).

    Ties: every logit equal to the k-th largest is kept, so a row may keep more than k tokens. Cutting
    ties to exactly k would keep whichever tied tokens `torch.topk` happens to list first, an order it does
    not specify and which may differ between devices; keeping them all is the same everywhere (and is what
    transformers' `TopKLogitsWarper` does). k >= V keeps everything.
    """
    if k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the most likely tokens whose mass reaches p, (B, V).

    Sort each row's probabilities in descending order and keep the shortest prefix whose sum is >= p:
    a token is kept when the mass strictly ahead of it is still < p, so the token that crosses p is kept,
    and so is the most likely token, always. The rest are set to -inf. As in `top_k_filter`, every token
    tied with the least likely kept one is kept too, so the result does not depend on the sort's order
    among equal logits. p >= 1 keeps everything.
    """
    if p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_ahead = probs.cumsum(dim=-1) - probs  # (B, V): mass of the tokens before each one in the order
    kept = (mass_ahead < p).sum(dim=-1, keepdim=True)  # (B, 1), >= 1 since the first token's mass_ahead is 0
    smallest_kept = sorted_logits.gather(-1, kept - 1)  # (B, 1)
    return logits.masked_fill(logits < smallest_kept, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Choose the next token of each row: logits (B, V) -> token ids (B,) int64.

    temperature 0 is greedy: the argmax (the lowest id among equal maxima, as `torch.argmax` returns),
    and top_k, top_p and generator are ignored. Otherwise: divide by temperature, filter by top_k, then by
    top_p (the order transformers uses), and draw from the softmax. `generator` is None (torch's global
    generator), one generator for the whole batch, or one per row: row b then draws from generator[b]
    alone, so its draw does not depend on the other rows.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V); filtered tokens have probability 0
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(generator) != probs.shape[0]:
        raise GenerationError(
            f"got {len(generator)} generators for {probs.shape[0]} rows: pass one generator per row"
        )
    draws = [torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generator, strict=True)]
    return torch.cat(draws)


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row`'s generator when a batch is sampled with `seed`: a hash of (seed, row).

    numpy's SeedSequence mixes the pair, so nearby seeds and rows give unrelated streams (seed + row would
    make seed 1 row 0 the same as seed 0 row 1).
    """
    return int(np.random.SeedSequence([seed, row]).generate_state(1, dtype=np.uint64)[0]) >> 1
