"""Serving: `llama-mini serve`, an OpenAI-compatible HTTP server with continuous batching and a chat page.

    api.py         OpenAI's request and response shapes, validation and errors (no HTTP)
    scheduler.py   continuous batching: the batch, KV-cache slots, cancellation (no HTTP)
    app.py         the FastAPI app: routes, streaming, authentication, limits, request log
    static/        the chat page (index.html, chat.css, chat.js): no build step, nothing fetched
    command.py     the command line

The scheduler needs only torch; api.py needs pydantic and app.py FastAPI: the `serve` extra
(pip install 'llama_mini[serve]'), so this package imports them only where they are used.
"""

from llama_mini.serve.scheduler import (
    Finished,
    NewToken,
    PromptScored,
    QueueFull,
    Scheduler,
    Sequence,
    SequenceRequest,
    TokenLogprobs,
)

__all__ = [
    "Finished",
    "NewToken",
    "PromptScored",
    "QueueFull",
    "Scheduler",
    "Sequence",
    "SequenceRequest",
    "TokenLogprobs",
]
