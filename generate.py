"""Generate text with a trained model: `python generate.py --checkpoint DIR --prompt "Once upon a time"`.

    python generate.py --checkpoint out/best                          # unconditional: from BOS alone
    python generate.py --checkpoint out/best --prompt "ROMEO:" --prompt "JULIET:" --num-samples 3
    python generate.py --checkpoint out/best --prompt-file start.txt --temperature 0   # greedy
    echo "Once upon a time" | python generate.py --checkpoint out/best --seed 1 --verbose
    python generate.py --checkpoint out/best --interactive            # a prompt loop; Ctrl-D ends it

--checkpoint takes anything `Transformer.from_pretrained` reads (a llama_mini or Hugging Face Llama folder,
or Meta's original format) with its SentencePiece tokenizer.model inside, or given by --tokenizer.

Prompts: each --prompt is one prompt, each --prompt-file one prompt (the whole file, one trailing newline
dropped, so a prompt may span lines); with neither, standard input is one prompt when it is not a
terminal; with no prompt at all, generation starts from BOS alone. Each output is printed as its prompt
followed by the continuation, outputs separated by a line of dashes. At a terminal the text streams as it
is generated (--stream / --no-stream to choose); otherwise all prompts x samples run as one ragged batch.
The same --seed gives the same text either way: output number r always samples with row_seed(seed, r).

A thin command line over llama_mini.generation; usage mistakes are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import typing
from pathlib import Path

import torch

from llama_mini.checkpoint import find_tokenizer, load_pretrained
from llama_mini.cli import ArgumentParser, report_errors
from llama_mini.errors import CheckpointError, ConfigError, LlamaMiniError
from llama_mini.generation import (
    CACHE_LENGTH_MULTIPLE,
    GenerationStats,
    decode_continuation,
    fit_to_context,
    generate,
    row_seed,
    stream,
)
from llama_mini.model import count_parameters
from llama_mini.tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 256  # when --max-new-tokens is not given; silently less where it does not fit
SEPARATOR = "-" * 40  # printed between outputs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checked(kind: type, requirement: str, test: typing.Callable[[typing.Any], bool]) -> typing.Callable:
    """An argparse type: `kind(text)` if it passes `test`, else "must be <requirement>, got <text>"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


NON_NEGATIVE_INT = checked(int, "an integer >= 0", lambda value: value >= 0)
POSITIVE_INT = checked(int, "an integer >= 1", lambda value: value >= 1)
NON_NEGATIVE_FLOAT = checked(float, "a number >= 0", lambda value: value >= 0)
POSITIVE_FLOAT = checked(float, "a number > 0", lambda value: value > 0)
PROBABILITY = checked(float, "in (0, 1]", lambda value: 0 < value <= 1)
SEED = checked(int, "an integer in [0, 2**63)", lambda value: 0 <= value < 2**63)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Generate text with a llama_mini (or any Llama) checkpoint.",
        epilog="Prompts come from --prompt, --prompt-file, or stdin; with none, from BOS alone.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="checkpoint folder (llama_mini, Hugging Face or Meta)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="SentencePiece .model to use (default: the checkpoint's tokenizer.model)",
    )
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for several"
    )
    prompts.add_argument(
        "--prompt-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a file whose whole text is one prompt; repeat for several",
    )
    prompts.add_argument(
        "--interactive", action="store_true", help="read prompts from stdin, one per line, until end of input"
    )
    prompts.add_argument(
        "--truncate",
        action="store_true",
        help="keep the last tokens of a prompt too long for the context, with a warning (default: an error)",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--max-new-tokens",
        type=NON_NEGATIVE_INT,
        metavar="N",
        help=f"tokens to generate per output (default: {DEFAULT_MAX_NEW_TOKENS}, or what fits the context)",
    )
    sampling.add_argument(
        "--temperature", type=NON_NEGATIVE_FLOAT, default=0.8, metavar="T", help="0 = greedy (default: 0.8)"
    )
    sampling.add_argument(
        "--top-k", type=POSITIVE_INT, metavar="K", help="sample from the K most likely tokens (default: off)"
    )
    sampling.add_argument(
        "--top-p",
        type=PROBABILITY,
        default=0.9,
        metavar="P",
        help="sample from the most likely tokens whose probabilities sum to P; 1 = off (default: 0.9)",
    )
    sampling.add_argument(
        "--repetition-penalty",
        type=POSITIVE_FLOAT,
        default=1.0,
        metavar="X",
        help="CTRL's penalty on tokens already in the text, 1.1-1.3 typical (default: 1.0 = off)",
    )
    sampling.add_argument(
        "--seed", type=SEED, metavar="S", help="seed for repeatable samples (default: a random one)"
    )
    sampling.add_argument(
        "--num-samples", type=POSITIVE_INT, default=1, metavar="N", help="outputs per prompt (default: 1)"
    )
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)",
    )
    runtime.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights' dtype; auto = bf16 on a GPU that supports it, else fp32 (default: auto)",
    )
    runtime.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the decode step with static shapes; the first output waits for the compiler "
        "(default: off)",
    )
    runtime.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --compile on CUDA, replay each decode step as one CUDA graph (default: on)",
    )
    runtime.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="print text as it is generated (default: when stdout is a terminal)",
    )
    runtime.add_argument(
        "--verbose", action="store_true", help="print load time and prefill / decode tokens/s to stderr"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already printed on one line
        return exit.code if isinstance(exit.code, int) else 2
    try:
        return report_errors(lambda: run(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
    start = time.perf_counter()
    model = load_pretrained(args.checkpoint, device=device, dtype=dtype)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only {model.args.vocab_size}: "
            f"pass the tokenizer the model was trained with (--tokenizer)"
        )
    if args.verbose:
        parameters = count_parameters(model)["total"]
        print(
            f"loaded {args.checkpoint}: {parameters:,} parameters, context {model.args.max_seq_len}, "
            f"{device} {str(dtype).removeprefix('torch.')}, in {time.perf_counter() - start:.2f} s",
            file=sys.stderr,
        )
    streaming = sys.stdout.isatty() if args.stream is None else args.stream
    texts = [] if args.interactive else read_prompts(args)
    # One KV cache for every call, as large as the largest batch: streaming runs one output at a time,
    # otherwise a call runs all its prompts x samples together. (Reusing it also lets a compiled decode
    # step keep its buffers from call to call in the interactive loop.) It starts short and is replaced
    # by a longer one when a request needs more positions (see generation._ensure_cache).
    rows = 1 if streaming else max(len(texts), 1) * args.num_samples
    model.setup_cache(rows, max_seq_len=CACHE_LENGTH_MULTIPLE)
    session = Session(model, tokenizer, args, streaming)
    if args.interactive:
        session.interactive()
    else:
        session.run(texts)
    return 0


class Session:
    """Turns prompt texts into printed outputs, numbering outputs across calls so each has its own seed."""

    def __init__(self, model, tokenizer: Tokenizer, args: argparse.Namespace, streaming: bool):
        self.model, self.tokenizer, self.args, self.streaming = model, tokenizer, args, streaming
        self.outputs = 0  # outputs printed so far: output number r samples with row_seed(seed, r)
        self.sampling = dict(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            eos_id=tokenizer.eos_id,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
        )

    def run(self, texts: list[str], echo: bool = True) -> None:
        """Generate num_samples outputs for each text and print them (each after its prompt if echo)."""
        context = self.model.args.max_seq_len
        prompts = [self.tokenizer.encode(text, bos=True) for text in texts]
        max_new_tokens = self.args.max_new_tokens
        if max_new_tokens is None:  # the default: whatever fits, quietly
            longest = max(len(prompt) for prompt in prompts)
            room = context - longest if longest < context else context // 2  # half for a prompt to truncate
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
        prompts, max_new_tokens, notes = fit_to_context(
            prompts, max_new_tokens, context, truncate=self.args.truncate, bos_id=self.tokenizer.bos_id
        )
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)

        samples = self.args.num_samples
        rows = [(text, prompt) for text, prompt in zip(texts, prompts, strict=True) for _ in range(samples)]
        first = self.outputs
        self.outputs += len(rows)
        # Each output keeps a batch-independent generator (seed, r), so streaming one output at a time and
        # one batch of all of them print the same text.
        seeds = None
        if self.args.seed is not None:
            seeds = [row_seed(self.args.seed, first + r) for r in range(len(rows))]

        if self.streaming:
            for r, (text, prompt) in enumerate(rows):
                out = sys.stdout
                if r > 0:
                    out.write(SEPARATOR + "\n")
                if echo:
                    out.write(text)
                    out.flush()
                stats = GenerationStats()
                seed = None if seeds is None else [seeds[r]]
                for piece in stream(
                    self.model,
                    self.tokenizer,
                    prompt,
                    max_new_tokens,
                    seed=seed,
                    stats=stats,
                    **self.sampling,
                ):
                    out.write(piece)
                    out.flush()
                out.write("\n")
                out.flush()
                self.report(stats)
            return

        stats = GenerationStats()
        new_ids = generate(
            self.model,
            [prompt for _, prompt in rows],
            max_new_tokens,
            seed=seeds,
            stats=stats,
            **self.sampling,
        )
        for r, ((text, prompt), ids) in enumerate(zip(rows, new_ids, strict=True)):
            if r > 0:
                sys.stdout.write(SEPARATOR + "\n")
            continuation = decode_continuation(self.tokenizer, prompt, ids)
            sys.stdout.write((text if echo else "") + continuation + "\n")
        sys.stdout.flush()
        self.report(stats)

    def interactive(self) -> None:
        """One prompt per line of stdin, answered as it comes (the prompt is not echoed back); EOF ends."""
        while True:
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                print(file=sys.stderr)
                return
            try:
                self.run([line.removesuffix("\n")], echo=False)
            except LlamaMiniError as error:  # a bad prompt ends that prompt, not the session
                print(f"error: {error}", file=sys.stderr)

    def report(self, stats: GenerationStats) -> None:
        if self.args.verbose:
            print(stats.summary(), file=sys.stderr)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt texts, then --prompt-file texts; else stdin (when not a terminal); else [""] (BOS alone)."""
    texts = list(args.prompt)
    for name in args.prompt_file:
        try:
            texts.append(Path(name).read_text(encoding="utf-8").removesuffix("\n"))
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise ConfigError(
                f"cannot read --prompt-file {name} ({reason}): pass a UTF-8 text file"
            ) from None
    if not texts and not sys.stdin.isatty():
        texts.append(sys.stdin.read().removesuffix("\n"))
    return texts or [""]


def load_tokenizer(checkpoint: str, tokenizer_path: str | None) -> Tokenizer:
    """The --tokenizer file, else the checkpoint's tokenizer.model; CheckpointError when there is none."""
    folder = Path(checkpoint)
    if not folder.exists():
        raise CheckpointError(
            f"checkpoint {folder} does not exist: pass --checkpoint a folder written by save_pretrained "
            f"(or a Hugging Face or Meta Llama folder)"
        )
    path = find_tokenizer(tokenizer_path) if tokenizer_path is not None else find_tokenizer(folder)
    if path is None:
        what = (
            f"--tokenizer {tokenizer_path} is not a .model file or a folder with a tokenizer.model"
            if tokenizer_path is not None
            else f"checkpoint {folder} has no tokenizer.model"
        )
        raise CheckpointError(f"{what}: pass --tokenizer with the tokenizer.model the model was trained with")
    return Tokenizer(path)


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unknown or unavailable device is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a CUDA GPU that supports it (half the bytes to read per token), else fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


if __name__ == "__main__":
    sys.exit(main())
