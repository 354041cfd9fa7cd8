"""The command line's policy for prompts that do not fit the model's context (generation/command.py).

The library refuses such a request (decode.check_request: a GenerationError naming the numbers); a person
at the command line would rather get what fits, with a warning, or be told which flag to pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_mini.generation.sampling import GenerationError

__all__ = ["fit_to_context"]


def fit_to_context(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    context: int,
    truncate: bool = False,
    bos_id: int | None = None,
) -> tuple[list[list[int]], int, list[str]]:
    """The command line's policy for prompts and max_new_tokens that do not fit a context of `context`.

    1. max_new_tokens > context - 1 is cut to context - 1 (a prompt takes at least one position).
    2. A prompt with len + max_new_tokens > context:
       with truncate, keeps its last tokens, as many as leave room for max_new_tokens (bos_id, if the
       prompt starts with it, stays first: the model saw it at position 0 in training);
       without truncate, a prompt that leaves no room for even one new token raises GenerationError.
    3. max_new_tokens is cut to what the longest prompt leaves; a warning says so if 1 or 3 cut it.
    Returns (prompts, max_new_tokens, warnings): one line per change, for the caller to show. Prompts are
    numbered from 1 in the messages, as a user counts --prompt flags.
    """
    notes = []
    requested = max_new_tokens
    max_new_tokens = min(max_new_tokens, context - 1)
    fitted = []
    for number, prompt in enumerate(prompts, start=1):
        prompt = list(prompt)
        if len(prompt) + max_new_tokens > context:
            if truncate:
                room = context - max_new_tokens  # >= 1 after step 1
                keep_bos = bos_id is not None and prompt[0] == bos_id and room > 1
                tail = prompt[len(prompt) - (room - keep_bos) :]
                notes.append(
                    f"prompt {number} has {len(prompt)} tokens: kept its last {len(tail)}"
                    f"{' after BOS' if keep_bos else ''} to leave room for {max_new_tokens} new tokens "
                    f"in the context of {context}"
                )
                prompt = [bos_id, *tail] if keep_bos else tail
            elif len(prompt) >= context:
                raise GenerationError(
                    f"prompt {number} has {len(prompt)} tokens (with BOS) but the model's context is "
                    f"{context} positions, which must hold the prompt and at least one new token: shorten "
                    f"it or pass --truncate to keep its last tokens"
                )
        fitted.append(prompt)
    longest = max((len(prompt) for prompt in fitted), default=0)
    max_new_tokens = min(max_new_tokens, context - longest)
    if max_new_tokens < requested:
        notes.append(
            f"--max-new-tokens {requested} does not fit the model's context of {context} after a prompt of "
            f"{longest} tokens: capped to {max_new_tokens}"
        )
    return fitted, max_new_tokens, notes
