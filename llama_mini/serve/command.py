"""Serve a checkpoint over HTTP: `llama-mini serve CHECKPOINT`, an OpenAI-compatible server and a chat page.

    llama-mini serve out/best                                  # http://127.0.0.1:8000/ and /v1/...
    llama-mini serve out/chat --port 8080 --max-batch-size 16
    llama-mini serve out/big --draft out/small --draft-tokens 4          # speculative decoding
    LLAMA_MINI_API_KEY=secret llama-mini serve out/best --host 0.0.0.0    # reachable from other machines

CHECKPOINT is anything `load_model` reads (a llama_mini, Hugging Face or Meta folder, or a
training run folder, whose best/ is used), with its tokenizer inside or given by --tokenizer. The server
binds 127.0.0.1 (this machine only) unless --host says otherwise; with --api-key (or the environment
variable LLAMA_MINI_API_KEY) every /v1 request must send `Authorization: Bearer KEY`. SIGTERM or Ctrl-C
lets running streams finish for up to SHUTDOWN_GRACE_SECONDS, cancels the rest, and exits with 0.

--draft CHECKPOINT adds a smaller model with the same tokenizer that proposes --draft-tokens tokens for the
model to check in one forward pass, whenever one request runs alone (serve/scheduler.py says why only
then); the API and its answers are the same, greedy text included. The draft is checked as `generate
--draft` checks it (the same vocabulary and tokenizer: one line and exit 2 otherwise, before the server
starts), and, as there, --quantize converts the model and not the draft.

Needs the `serve` extra: pip install 'llama_mini[serve]' (FastAPI and uvicorn).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_mini.checkpoint import describe_resolution, find_tokenizer, load_model, resolve_checkpoint
from llama_mini.console import ArgumentParser, run_command
from llama_mini.errors import CheckpointError, ConfigError
from llama_mini.generation import next_token_logits
from llama_mini.generation.command import load_draft
from llama_mini.generation.speculative import DEFAULT_DRAFT_TOKENS
from llama_mini.ops import aot_step
from llama_mini.ops.quantize import QuantizeSettings, check_quantize, quantize
from llama_mini.runtime import RuntimeSettings, resolve_device, resolve_dtype
from llama_mini.settings import add_flags, setting
from llama_mini.tokenizer import Tokenizer

__all__ = [
    "API_KEY_VARIABLE",
    "ServeConfig",
    "build_app",
    "build_parser",
    "compiled_decode_step",
    "main",
    "run",
]

API_KEY_VARIABLE = "LLAMA_MINI_API_KEY"
SHUTDOWN_GRACE_SECONDS = 10

log = logging.getLogger("llama_mini.serve")


@dataclass
class ServeConfig:
    """The server's settings (`llama-mini serve`'s flags are made from these)."""

    host: str = setting("127.0.0.1", "address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 is every")
    port: int = setting(8000, "TCP port (0: any free port, printed at start)")
    max_batch_size: int = setting(8, "requests decoded together, each in its own KV-cache slot")
    max_queue: int = setting(64, "requests that may wait for a slot; beyond that, 429 with Retry-After")
    prefill_chunk: int = setting(
        128,
        "prompt tokens fed per scheduler step, across waiting prompts, so long prompts don't stall streams",
    )
    max_body_bytes: int = setting(1 << 20, "largest request body accepted (413 beyond)")
    api_key: str | None = setting(
        None,
        f"require 'Authorization: Bearer KEY' on /v1 requests (none: ${API_KEY_VARIABLE} if set, which "
        "other users cannot read in the process list)",
    )
    compile: bool | None = setting(
        None,
        "compile the batched decode step: on a CPU ahead of time for batches of 1, 2, 4, ... rows (built "
        "once, 10-15 s each, kept in the compile cache), elsewhere with torch.compile; none = the compiled "
        "steps if the compile cache holds them, else eager ones while they are built in the background "
        "for the next start",
    )
    threads: int | None = setting(None, "CPU threads for the model's arithmetic (none: torch's default)")
    draft: str | None = setting(
        None,
        "a smaller checkpoint with the same tokenizer that proposes tokens for the model to check, several "
        "per forward pass, while one request runs alone (same answers; its rounds run eagerly)",
    )
    draft_tokens: int = setting(DEFAULT_DRAFT_TOKENS, "with --draft: tokens the draft proposes per round")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "prefill_chunk", "max_body_bytes", "draft_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="Serve a checkpoint: an OpenAI-compatible API (/v1/completions, /v1/chat/completions) "
        "with continuous batching, and a chat page at /.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder or training run folder")
    parser.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer.model or tokenizer.json (default: the checkpoint's)"
    )
    add_flags(parser, ServeConfig)
    add_flags(parser, RuntimeSettings)
    add_flags(parser, QuantizeSettings)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(build_parser(prog), run, argv)


def run(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    config = ServeConfig(**{name: value for name, value in vars(args).items() if name in fields})
    if config.api_key is None and os.environ.get(API_KEY_VARIABLE):
        config = dataclasses.replace(config, api_key=os.environ[API_KEY_VARIABLE])
    runtime = RuntimeSettings(
        **{name: getattr(args, name) for name in ("device", "dtype") if hasattr(args, name)}
    )
    uvicorn = _import_server()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    quantization = QuantizeSettings(
        **{name: getattr(args, name) for name in ("quantize", "group_size") if hasattr(args, name)}
    )
    app, model_id = build_app(args.checkpoint, config, runtime, args.tokenizer, quantization)
    listener = socket.create_server((config.host, config.port))  # bound here: a port error is ours to report
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {model_id} at http://{shown}:{port}/ (chat page) and http://{shown}:{port}/v1",
        file=sys.stderr,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
    )
    # uvicorn turns SIGTERM into a graceful shutdown, then raises the signal again for the handler that
    # was there before it: a no-op one makes that shutdown the end of a clean run (exit code 0).
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    server.run(sockets=[listener])
    print("server stopped", file=sys.stderr)
    return 0


def _import_server():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError(
            "llama-mini serve needs FastAPI and uvicorn: pip install 'llama_mini[serve]'"
        ) from None
    return uvicorn


def build_app(
    checkpoint: str | os.PathLike,
    config: ServeConfig | None = None,
    runtime: RuntimeSettings | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    quantization: QuantizeSettings | None = None,
):
    """Load `checkpoint` and its tokenizer (its linear layers quantized as `quantization` says), and the
    draft of `config.draft` if any, and return (the FastAPI app serving them, the model's id)."""
    from llama_mini.serve.api import Served
    from llama_mini.serve.app import create_app
    from llama_mini.serve.scheduler import Scheduler

    config = config or ServeConfig()
    runtime = runtime or RuntimeSettings()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(runtime.device)
    dtype = resolve_dtype(runtime.dtype, device)
    quantization = quantization or QuantizeSettings()
    check_quantize(quantization.quantize, quantization.group_size, device)
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist: pass a checkpoint folder or a training run folder"
        )
    note = describe_resolution(path)
    if note:
        print(note, file=sys.stderr)
    model_id = path.resolve().name
    folder = resolve_checkpoint(path)
    tokenizer = _load_tokenizer(folder, tokenizer_path)
    model = load_model(folder, device=device, dtype=dtype)
    quantize(model, quantization.quantize, quantization.group_size)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only {model.args.vocab_size}: "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
    speculation = None
    if config.draft is not None:  # refused here, in one line, unless it shares the model's tokenizer
        draft_flags = argparse.Namespace(draft=config.draft, draft_tokens=config.draft_tokens)
        speculation = load_draft(draft_flags, model, tokenizer, device, dtype)
    step, compiled_in = None, None
    if config.compile is not False and device.type == "cpu" and aot_step.aot_compile_available():
        compiled_in = str(aot_step.default_cache_folder())
        if config.compile:
            print(f"compiling the decode steps (or loading them from {compiled_in})", file=sys.stderr)
    elif config.compile:
        step = compiled_decode_step()
    scheduler = Scheduler(
        model,
        config.max_batch_size,
        config.max_queue,
        config.prefill_chunk,
        decode_step=step,
        compiled_in=compiled_in,
        saved_only=config.compile is None,
        draft=speculation.draft if speculation else None,
        draft_tokens=config.draft_tokens,
    )
    served = Served(model_id, tokenizer, model.args.max_seq_len, model.args.vocab_size)
    return create_app(served, scheduler, config.api_key, config.max_body_bytes), model_id


def compiled_decode_step():
    """The scheduler's decode step, next_token_logits, through torch.compile with dynamic shapes (one graph
    for every batch size and cache length, as the batch grows and shrinks): `--compile` off a CPU, or on
    one where ahead-of-time compilation is not available."""
    return torch.compile(next_token_logits, dynamic=True)


def _load_tokenizer(folder: Path, tokenizer_path: str | os.PathLike | None) -> Tokenizer:
    """--tokenizer, else the checkpoint's tokenizer.model or tokenizer.json (as generate.py finds it)."""
    if tokenizer_path is not None and not Path(tokenizer_path).exists():
        raise CheckpointError(
            f"--tokenizer {tokenizer_path} does not exist: pass the model's tokenizer.model or .json"
        )
    found = find_tokenizer(tokenizer_path if tokenizer_path is not None else folder)
    if found is None:
        raise CheckpointError(
            f"no tokenizer in {tokenizer_path or folder}: pass --tokenizer with the tokenizer.model or "
            "tokenizer.json the model was trained with"
        )
    return Tokenizer(found)
