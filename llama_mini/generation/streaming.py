"""Streaming text: the pieces of a continuation as its tokens arrive.

    stream(model, tokenizer, prompt, ...)              one prompt; yields text pieces as they come
    decode_continuation(tokenizer, prompt_ids, ids)    the text that new ids add after a prompt

A token is not always a whole character (a character outside the vocabulary is spelled by its UTF-8 bytes,
one token each), and sentencepiece drops the space that opens a text, so the text of new tokens is not the
decoding of each token alone: both functions decode the new tokens after the prompt's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llama_mini.generation.decode import GenerationStats, iter_new_tokens, resolve_settings
from llama_mini.generation.sampling import SamplingConfig
from llama_mini.generation.steps import DecodeOptions
from llama_mini.model.transformer import Transformer

if TYPE_CHECKING:  # only for annotations: generation works with any object that has the Tokenizer methods
    from llama_mini.tokenizer import Tokenizer

__all__ = ["decode_continuation", "stream"]


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    options: DecodeOptions | None = None,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> Iterator[str]:
    """Continue one prompt and yield its text piece by piece as tokens are generated.

    prompt: text (encoded with bos first) or token ids (used as they are). The eos id(s) default to the
    tokenizer's. The other arguments are those of `iter_new_tokens` for a batch of one.

    Pieces come from the tokenizer's StreamDecoder, so a character spelled by several byte tokens appears
    whole, once its last byte arrives. The decoder is first fed the prompt, so the first new piece keeps its
    leading space (decoding new ids on their own would drop it, as at the start of a text): the pieces
    join to `decode_continuation(tokenizer, prompt_ids, new_ids)`, the text that follows the prompt.
    """
    sampling, options = resolve_settings(sampling, options, settings)
    if sampling.eos_id is None:
        sampling = sampling.replace(eos_id=getattr(tokenizer, "eos_ids", None) or tokenizer.eos_id)
    prompt_ids = tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
    tokens = iter_new_tokens(model, [prompt_ids], max_new_tokens, sampling, options=options, stats=stats)
    return _stream_text(tokenizer, prompt_ids, tokens)


def _stream_text(
    tokenizer: Tokenizer, prompt_ids: list[int], tokens: Iterator[tuple[int, int]]
) -> Iterator[str]:
    decoder = tokenizer.stream_decoder()
    for token_id in prompt_ids:
        decoder.push(token_id)  # the prompt's text is the caller's; this only positions the decoder
    for _, token_id in tokens:
        piece = decoder.push(token_id)
        if piece:
            yield piece
    piece = decoder.flush()
    if piece:
        yield piece


def decode_continuation(tokenizer: Tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text that new_ids add after prompt_ids: decode(prompt + new) minus decode(prompt).

    Unlike decode(new_ids), this keeps the space that sentencepiece drops from a text's first piece.
    """
    prompt_text = tokenizer.decode(list(prompt_ids))
    full_text = tokenizer.decode(list(prompt_ids) + list(new_ids))
    if full_text.startswith(prompt_text):
        return full_text[len(prompt_text) :]
    return tokenizer.decode(list(new_ids))  # the prompt ended inside a character: no clean boundary
