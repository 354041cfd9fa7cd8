"""Chat templates: a conversation as the text and token ids a chat model is fine-tuned on and prompted with.

A chat model reads a conversation as one text in its own format, written by a Jinja template stored with its
tokenizer (tokenizer_config.json's "chat_template"). Llama 3's renders [user "Hi", assistant "Hello!"] as

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant
    <|end_header_id|>\\n\\nHello!<|eot_id|>                                          (one line, cut here)

`render_chat` renders as transformers' `apply_chat_template(..., tokenize=False)` does: Jinja's
ImmutableSandboxedEnvironment (a template from the Hub is untrusted code) with trim_blocks and
lstrip_blocks, the loopcontrols extension, the `{% generation %}` tag (it renders its body), a `tojson`
filter that keeps non-ASCII text, the globals `raise_exception` and `strftime_now`, and the variables
messages, add_generation_prompt and the tokenizer's named special tokens (bos_token, eos_token, ...).
A tokenizer without a template, like ours, gets DEFAULT_CHAT_TEMPLATE.

`encode_chat` returns the token ids and a loss mask for fine-tuning: True on each assistant turn's tokens
(its content and the end-of-turn token that closes it, so that the model learns to stop), False on what
the model is only shown. The turns are found by rendering prefixes of the conversation: messages[:i] with
the generation prompt ends where assistant message i begins, and messages[:i + 1] ends after its turn.
That prefix with the generation prompt is also exactly the text a chat model is prompted with, so the
tokens trained on and the tokens generated from agree. `chat_stop_ids` gives the ids that end a reply.

`check_messages` is the shape check alone (roles, content strings), for readers of chat corpora that
want to name the file and line of a bad record before any tokenizer runs; `chat_template_for` is the
template a tokenizer renders with, which prepared chat data record and fine-tuned checkpoints keep.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from llama_mini.errors import DataError
from llama_mini.tokenizer.core import _alternation

if TYPE_CHECKING:
    from llama_mini.tokenizer.core import Tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ROLES",
    "ChatEncoding",
    "common_prefix",
    "chat_stop_ids",
    "chat_template_for",
    "check_messages",
    "encode_chat",
    "render_chat",
]

ROLES = ("system", "user", "assistant", "tool")

# For tokenizers without a chat template. Plain words rather than new control tokens, which a small
# vocabulary does not have; each assistant turn ends with eos, which generation already stops at:
#
#     <s>system: Answer briefly.
#     user: Who wrote Hamlet?
#     assistant: Shakespeare.</s>user: When?
#     assistant:                                           <- the generation prompt, no trailing space
#
# The space after "assistant:" belongs to the reply, so the reply's first token ("▁Shakespeare") is whole
# in the prompt/reply split: neither sentencepiece nor byte-level BPE joins a word to the space before it.
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- message['role'] ~ ':' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- ' ' ~ message['content'] ~ eos_token -}}"
    "{%- else -%}"
    "{{- ' ' ~ message['content'] ~ '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant:' -}}{%- endif -%}"
)

_PROBE_REPLY = "llama_mini end-of-turn probe"  # an assistant message whose end reveals the end-of-turn token


class ChatEncoding(NamedTuple):
    """A conversation's token ids and, for each, whether the loss is computed there (an assistant token);
    `text` is the rendered conversation the ids encode."""

    ids: list[int]
    mask: list[bool]
    text: str


def chat_template_for(tokenizer: Tokenizer) -> str:
    """The template `tokenizer` renders chats with: its own, or DEFAULT_CHAT_TEMPLATE when it has none."""
    return tokenizer.chat_template if tokenizer.chat_template is not None else DEFAULT_CHAT_TEMPLATE


def check_messages(
    messages: Sequence[Mapping[str, Any]], special_tokens: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """`messages` as plain dicts (without None values, as transformers passes them), or a one-line
    DataError naming the message at fault: an empty chat, a message that is not a dict, a role not in
    ROLES, content that is not a string, or content holding the text of one of `special_tokens`."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(
            f"a chat is a list of {{'role', 'content'}} messages, not a {type(messages).__name__}: "
            f"pass [{{'role': 'user', 'content': '...'}}, ...]"
        )
    if not messages:
        raise DataError("a chat needs at least one message: pass [{'role': 'user', 'content': '...'}, ...]")
    special = _alternation(special_tokens)
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(
                f"chat message {index} is a {type(message).__name__}, not a dict: "
                f"pass {{'role': ..., 'content': ...}}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"chat message {index} has role {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                f"chat message {index}'s content is a {type(content).__name__}, not a string: pass its text"
            )
        found = special.search(content) if special is not None else None
        if found:
            raise DataError(
                f"chat message {index}'s content contains the special token {found.group()!r}, which would "
                f"be read as a control token: remove it from the text"
            )
        checked.append({key: value for key, value in message.items() if value is not None})
    return checked


def _tojson(
    value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which a prompt must not have.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in transformers' environment (see the module docstring), cached by its text."""
    # jinja2 is imported here: only chat needs it.
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for transformers' masks; we find the
        assistant text by rendering prefixes instead, so the tag renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

        def _body(self, caller) -> str:
            return caller()

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError

    try:
        compiled = _compile(chat_template_for(tokenizer))
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tokenizer.special_token_names
        )
    except TemplateError as error:
        first_line = (str(error.message or error).strip().splitlines() or ["no message"])[0]
        raise DataError(
            f"the chat template of {tokenizer.model_path} failed ({type(error).__name__}: {first_line}): "
            f"check the messages' roles and order, or fix the template"
        ) from None


def render_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
) -> str:
    """The text of `messages` in the tokenizer's chat format (transformers' apply_chat_template's text).

    add_generation_prompt: end with the header of an assistant turn, to prompt a reply.
    Raises DataError for an empty chat, an unknown role, content that is not a string or holds a special
    token's text, and for a template that fails (its raise_exception included).
    """
    return _render(tokenizer, check_messages(messages, list(tokenizer.special_tokens)), add_generation_prompt)


def _end_of_turn(tokenizer: Tokenizer) -> str | None:
    """The special token the template writes after an assistant's content (<|eot_id|>, <|im_end|>, </s>),
    found by rendering a probe reply; None if no special token follows it."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = _render(tokenizer, probe, add_generation_prompt=False)
    except DataError:  # a template that needs another shape of conversation
        return None
    position = text.rfind(_PROBE_REPLY)
    after = text[position + len(_PROBE_REPLY) :].lstrip() if position >= 0 else ""
    for special in sorted(tokenizer.special_tokens, key=len, reverse=True):
        if after.startswith(special):
            return special
    return None


def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids at which to stop generating a reply: the template's end-of-turn token, then the eos_ids."""
    end_of_turn = _end_of_turn(tokenizer)
    first = [tokenizer.special_tokens[end_of_turn]] if end_of_turn is not None else []
    return tuple(dict.fromkeys(first + list(tokenizer.eos_ids)))


def _rendered_length(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool, text: str, index: int
) -> int:
    """The length of messages' rendering, which must begin `text` (the rendering of the whole chat)."""
    prefix = _render(tokenizer, messages, add_generation_prompt)
    if not text.startswith(prefix):
        raise DataError(
            f"the chat template renders the chat up to message {index} differently from the start of the "
            f"whole chat, so its assistant tokens cannot be found: use a template whose text grows message "
            f"by message"
        )
    return len(prefix)


def common_prefix(first: list[int], second: list[int]) -> int:
    """How many leading ids two token lists share."""
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
) -> ChatEncoding:
    """The token ids of the rendered chat and a mask that is True exactly on the assistant tokens.

    ids are `tokenizer.encode(render_chat(...), parse_special=True)`, what transformers'
    apply_chat_template(tokenize=True) returns, and text is that rendering. For each assistant message,
    the mask covers the tokens from where its content begins (the end of the rendering of the messages
    before it plus the generation prompt) through the end-of-turn token the template writes after it; a
    token that straddles either boundary is counted in. With add_generation_prompt (to prompt a reply) the
    ids end with the assistant header. Raises DataError as `render_chat`, and for a template whose
    prefixes are not prefixes of the whole rendering.
    """
    messages = check_messages(messages, list(tokenizer.special_tokens))
    text = _render(tokenizer, messages, add_generation_prompt)
    ids = tokenizer.encode(text, parse_special=True)
    mask = [False] * len(ids)
    end_of_turn = _end_of_turn(tokenizer)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _rendered_length(tokenizer, messages[:index], True, text, index)
        end = _rendered_length(tokenizer, messages[: index + 1], False, text, index)
        # The turn's text may go on after its end-of-turn token (ChatML's "\n"): that belongs to no one.
        found = text.find(end_of_turn, start, end) if end_of_turn is not None else -1
        end = found + len(end_of_turn) if found >= 0 else end
        # Token positions of the two character positions: how far the prefix's ids agree with the whole's.
        first = common_prefix(tokenizer.encode(text[:start], parse_special=True), ids)
        through_end = tokenizer.encode(text[:end], parse_special=True)
        last = common_prefix(through_end, ids)
        if last < len(through_end):
            last += 1  # the token that straddles the end of the turn
        mask[first:last] = [True] * (last - first)
    return ChatEncoding(ids, mask, text)
