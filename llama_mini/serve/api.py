"""OpenAI's API shapes without HTTP: requests validated into scheduler sequences, events into responses.

    CompletionRequest, ChatCompletionRequest    the bodies of POST /v1/completions and /v1/chat/completions
    APIError                                    an error in OpenAI's shape: {"error": {message, type, param,
                                                code}} with its HTTP status
    Served                                      a loaded model and tokenizer: turns a request into
                                                SequenceRequests and builds responses and stream chunks
    ChoiceText                                  one choice's text as tokens arrive, cut at stop strings

Parameters are checked strictly (no "1" for 1, no unknown names): a parameter we do not implement is a 400
naming it, never silently ignored; the few we accept only at their neutral value (presence_penalty 0, ...)
are listed in NEUTRAL. Log-probabilities are the model's own distribution (log_softmax of the logits,
before temperature, top-k and top-p), as vLLM and llama.cpp's server report them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama_mini.errors import LlamaMiniError
from llama_mini.generation import SamplingConfig, row_seed
from llama_mini.serve.scheduler import SequenceRequest, TokenLogprobs
from llama_mini.tokenizer import Tokenizer, chat_stop_ids, encode_chat, is_sentencepiece_model

__all__ = [
    "NEUTRAL",
    "APIError",
    "ChatCompletionRequest",
    "ChoiceText",
    "CompletionRequest",
    "Served",
    "parse_request",
]

MAX_CHOICES = 16  # n at most
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS_COMPLETIONS = 5  # the legacy completions API's limit
MAX_TOP_LOGPROBS_CHAT = 20

# Parameters of OpenAI's API that llama-mini does not implement, accepted only at the value that means
# "off" (or null), so that clients which send the defaults explicitly still work.
NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "best_of": 1,
    "logit_bias": {},
    "suffix": "",
    "parallel_tool_calls": None,
    "tools": [],
    "tool_choice": "none",
    "response_format": {"type": "text"},
    "service_tier": "auto",
    "store": False,
}


class APIError(Exception):
    """An error for the client, in OpenAI's shape; status is the HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share."""

    model: str | None = None  # a label only: the server serves the one model it loaded
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # an extension, as vLLM and llama.cpp's server offer it
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
        if any(not stop for stop in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: Any  # a string, a list of strings, a list of token ids or a list of lists: see prompts()
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS_COMPLETIONS)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)


def parse_request(kind: type[_Sampling], body: Any) -> _Sampling:
    """The validated request, or APIError 400 naming the first parameter at fault."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    for name, neutral in NEUTRAL.items():
        value = body.pop(name, None)
        if value is not None and value != neutral:
            raise APIError(
                400,
                f"{name} is not supported by llama-mini serve (only {neutral!r} or null): remove it",
                param=name,
                code="unsupported_parameter",
            )
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown parameter {location!r}: llama-mini serve does not support it; remove it"
        else:
            value = first.get("input")
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            message = f"{location}: {first['msg']} (got {shown})"
        raise APIError(400, message, param=str(first["loc"][0]) if first["loc"] else None) from None


# ---------------------------------------------------------------------------------------------------------
# The served model: requests in, sequences out; events in, responses out
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one API request runs: the prompts' ids, and one SequenceRequest per choice (prompt-major:
    choice index = prompt index * n + j)."""

    prompts: list[list[int]]
    sequences: list[SequenceRequest]
    n: int
    stops: list[str]
    chat: bool
    prompt_texts: list[str] = field(default_factory=list)


class Served:
    """A model and its tokenizer behind the API: model_id names it; context and vocab_size bound requests."""

    def __init__(self, model_id: str, tokenizer: Tokenizer, context: int, vocab_size: int):
        self.model_id, self.tokenizer, self.context, self.vocab_size = (
            model_id,
            tokenizer,
            context,
            vocab_size,
        )
        self.chat_stop_ids = chat_stop_ids(tokenizer)
        self.eos_ids = tuple(tokenizer.eos_ids)
        self._sentencepiece = is_sentencepiece_model(tokenizer.model_path)

    def models(self) -> dict[str, Any]:
        """GET /v1/models. Besides OpenAI's fields, "context_length" and "chat_template" (whether the
        tokenizer has a template of its own) tell the chat page which mode suits the model."""
        model = {
            "id": self.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "llama-mini",
            "context_length": self.context,
            "chat_template": self.tokenizer.chat_template is not None,
        }
        return {"object": "list", "data": [model]}

    # ------------------------------------------------------------------------------- planning

    def plan_completion(self, request: CompletionRequest) -> Plan:
        prompts, texts = self._prompts(request.prompt)
        stops = request.stop_strings()
        sequences = []
        for index, prompt in enumerate(prompts):
            what = f"prompt {index}" if len(prompts) > 1 else "prompt"
            self._check_length(prompt, request.max_tokens or 0, what)
            # max_tokens null: as far as the context goes (left out, it is OpenAI's default of 16)
            max_tokens = self.context - len(prompt) if request.max_tokens is None else request.max_tokens
            for choice in range(request.n):
                sequences.append(
                    SequenceRequest(
                        prompt=tuple(prompt),
                        max_tokens=max_tokens,
                        sampling=self._sampling(request, self.eos_ids, index * request.n + choice),
                        top_logprobs=request.logprobs,
                        prompt_logprobs=request.echo and request.logprobs is not None,
                    )
                )
        return Plan(prompts, sequences, request.n, stops, chat=False, prompt_texts=texts)

    def plan_chat(self, request: ChatCompletionRequest) -> Plan:
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if request.max_tokens is not None and request.max_completion_tokens is not None:
            raise APIError(400, "pass max_completion_tokens or max_tokens, not both", param="max_tokens")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        try:
            prompt = encode_chat(self.tokenizer, messages, add_generation_prompt=True).ids
        except LlamaMiniError as error:
            raise APIError(400, str(error), param="messages") from None
        max_tokens = request.max_completion_tokens or request.max_tokens
        self._check_length(prompt, max_tokens or 1, "the conversation")
        if max_tokens is None:
            max_tokens = self.context - len(prompt)  # as far as the context goes
        top = (request.top_logprobs or 0) if request.logprobs else None
        sequences = [
            SequenceRequest(tuple(prompt), max_tokens, self._sampling(request, self.chat_stop_ids, j), top)
            for j in range(request.n)
        ]
        return Plan([prompt], sequences, request.n, request.stop_strings(), chat=True)

    def _sampling(self, request: _Sampling, stop_ids: Sequence[int], choice: int) -> SamplingConfig:
        """The SamplingConfig of choice number `choice`, seeded with row_seed(seed, choice): the seed
        generate.py gives its output number `choice`, so a seeded request draws what `generate.py --seed`
        draws, and n > 1 draws different samples."""
        seed = None if request.seed is None else row_seed(request.seed, choice)
        return SamplingConfig(
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=None if request.top_p >= 1 else request.top_p,
            eos_id=tuple(stop_ids),
            seed=seed,
        )

    def _prompts(self, prompt: Any) -> tuple[list[list[int]], list[str]]:
        """A completion's prompt(s) as token ids: text is encoded with BOS first (as generate.py does), ids
        are used as they are."""

        def is_ids(value: Any) -> bool:
            return isinstance(value, list) and bool(value) and all(_is_int(token) for token in value)

        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
            texts = list(prompt)
        elif is_ids(prompt):
            return [self._checked_ids(prompt)], [self.tokenizer.decode(prompt)]
        elif isinstance(prompt, list) and prompt and all(is_ids(item) for item in prompt):
            return [self._checked_ids(ids) for ids in prompt], [self.tokenizer.decode(ids) for ids in prompt]
        else:
            raise APIError(
                400,
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of them "
                "(non-empty)",
                param="prompt",
            )
        ids = [self.tokenizer.encode(text, bos=True) for text in texts]
        if any(not prompt_ids for prompt_ids in ids):
            raise APIError(
                400, "the prompt is empty and this tokenizer has no BOS to start from", param="prompt"
            )
        return ids, texts

    def _checked_ids(self, ids: list[int]) -> list[int]:
        bad = [token for token in ids if not 0 <= token < self.vocab_size]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary 0..{self.vocab_size - 1}", param="prompt"
            )
        return [int(token) for token in ids]

    def _check_length(self, prompt: list[int], max_tokens: int, what: str) -> None:
        if len(prompt) >= self.context:
            raise APIError(
                400,
                f"{what} has {len(prompt)} tokens but the model's context is {self.context} tokens, which "
                "must also hold at least one new token: shorten it",
                param="messages" if what == "the conversation" else "prompt",
                code="context_length_exceeded",
            )
        if len(prompt) + max_tokens > self.context:
            raise APIError(
                400,
                f"{what} has {len(prompt)} tokens and max_tokens is {max_tokens}: {len(prompt) + max_tokens} "
                f"tokens do not fit the model's context of {self.context}; lower max_tokens to at most "
                f"{self.context - len(prompt)}",
                param="max_tokens",
                code="context_length_exceeded",
            )

    # ------------------------------------------------------------------------------- text of tokens

    def token_text(self, token_id: int) -> str:
        """The text a token stands for on its own, for log-probability listings: sentencepiece's '▁' as a
        space and its byte pieces as the byte (or '<0xHH>' for a byte of a longer character); a
        byte-level BPE's token decoded (its bytes carry their spaces); special tokens as their text."""
        if self._sentencepiece:
            piece = self.tokenizer.id_to_piece(token_id)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                value = int(piece[3:5], 16)
                return chr(value) if value < 0x80 else piece
            return piece.replace("\u2581", " ")
        text = self.tokenizer.decode([token_id])
        return text if text else self.tokenizer.id_to_piece(token_id)

    def choice_text(self, plan: Plan, prompt: list[int]) -> ChoiceText:
        # A chat reply starts without the whitespace the template writes after the assistant header, as
        # generate.py --chat prints it.
        return ChoiceText(self.tokenizer, prompt, plan.stops, lstrip=plan.chat)

    # ------------------------------------------------------------------------------- responses

    def completion_logprobs(
        self, token_ids: list[int], scores: list[TokenLogprobs | None], offset: int
    ) -> dict[str, Any]:
        """The completions API's logprobs object for tokens and their scores, text offsets from `offset`."""
        tokens = [self.token_text(token_id) for token_id in token_ids]
        offsets, position = [], offset
        for text in tokens:
            offsets.append(position)
            position += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": [
                None if s is None else {self.token_text(i): lp for i, lp in s.top} for s in scores
            ],
            "text_offset": offsets,
        }

    def chat_logprobs(self, token_ids: list[int], scores: list[TokenLogprobs]) -> dict[str, Any]:
        """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for token_id, score in zip(token_ids, scores, strict=True):
            content.append(
                {**entry(token_id, score.logprob), "top_logprobs": [entry(i, lp) for i, lp in score.top]}
            )
        return {"content": content}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ChoiceText:
    """One choice's text, built from its tokens as they arrive (the tokenizer's StreamDecoder, positioned
    after the prompt, so the pieces join to the continuation's text), and cut before the first stop string.

    `push(token_id)` and `finish()` return the text that may be shown now: text that could still turn into
    a stop string is held back until it cannot. `stopped` turns True when a stop string appears; `text` is
    the choice's text so far, without it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stops: list[str], lstrip: bool = False):
        self.decoder = tokenizer.stream_decoder()
        for token_id in prompt:
            self.decoder.push(token_id)  # positions the decoder; the prompt's text is not part of the choice
        self.stops, self.lstrip = stops, lstrip
        self.text = ""
        self.sent = 0  # characters of text handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        return self._advance(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        return self._advance(self.decoder.flush(), final=True)

    def _advance(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        if self.lstrip and not self.text:
            piece = piece.lstrip()
        self.text += piece
        # A stop string begins at `sent` or later: whatever could begin one was held back.
        found = [index for stop in self.stops if (index := self.text.find(stop, self.sent)) >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True
            end = len(self.text)
        else:
            end = len(self.text) - (0 if final else self._held())
        shown, self.sent = self.text[self.sent : end], max(self.sent, end)
        return shown

    def _held(self) -> int:
        """Characters at the end of text that begin some stop string (the longest such end)."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
