"""Generate text with a trained model: `llama-mini generate --checkpoint DIR --prompt "Once upon a time"`.

    llama-mini generate --checkpoint out/best                          # unconditional: from BOS alone
    llama-mini generate --checkpoint out/best --prompt "ROMEO:" --prompt "JULIET:" --num-samples 3
    llama-mini generate --checkpoint out/best --prompt-file start.txt --temperature 0   # greedy
    echo "Once upon a time" | llama-mini generate --checkpoint out/best --seed 1 --verbose
    llama-mini generate --checkpoint out/best --interactive            # a prompt loop; Ctrl-D ends it
    llama-mini generate --checkpoint out/chat --chat --system "Be brief."   # a conversation; Ctrl-D ends it
    llama-mini generate --checkpoint out/big --draft out/small --draft-tokens 4   # speculative decoding

--checkpoint takes anything `load_model` reads (a llama_mini or Hugging Face Llama folder,
Meta's original format, or a training run folder, whose best/ is used) with its tokenizer inside (a
SentencePiece tokenizer.model or a tokenizer.json), or given by --tokenizer.

Prompts: each --prompt is one prompt, each --prompt-file one prompt (the whole file, one trailing newline
dropped, so a prompt may span lines); with neither, standard input is one prompt when it is not a
terminal; with no prompt at all, generation starts from BOS alone. Each output is printed as its prompt
followed by the continuation, outputs separated by a line of dashes. At a terminal the text streams as it
is generated (--stream / --no-stream to choose); otherwise all prompts x samples run as one ragged batch.
The same --seed gives the same text either way: output number r always samples with row_seed(seed, r).

--chat holds a conversation: each line of stdin is a user message; the whole conversation so far (after
--system, if given) is rendered with the checkpoint's chat template, the one it was fine-tuned on
(llama_mini.tokenizer.chat; DEFAULT_CHAT_TEMPLATE for a checkpoint without one), ending in the template's
generation prompt, and the reply is generated until the template's end-of-turn token (chat_stop_ids:
<|eot_id|>, <|im_end|>, or eos for the default template). The reply is printed and joins the
conversation. When the conversation outgrows the context, its oldest exchanges are dropped (the system
message stays), with a note on stderr.

--draft CHECKPOINT decodes speculatively (generation/speculative.py): the draft, a smaller model with the
same tokenizer, proposes --draft-tokens tokens that the model checks in one forward pass. Greedy output is
the same as without a draft; sampled output has the same distribution (other draws for the same --seed).

A thin command line over llama_mini.generation (generate.py is the same command): the sampling flags are
made from SamplingConfig's declarations, with its defaults, and the runtime flags from DecodeOptions'; what
to do with prompts too long for the context is prompts.py's fit_to_context; mistakes are one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import typing
from pathlib import Path

from llama_mini.checkpoint import describe_resolution, find_tokenizer, load_model, resolve_checkpoint
from llama_mini.console import ArgumentParser, run_command
from llama_mini.errors import CheckpointError, ConfigError, LlamaMiniError
from llama_mini.generation.decode import GenerationStats, generate
from llama_mini.generation.prompts import fit_to_context
from llama_mini.generation.sampling import GenerationError, SamplingConfig, row_seed
from llama_mini.generation.speculative import DEFAULT_DRAFT_TOKENS, Speculation, SpeculativeStats, check_draft
from llama_mini.generation.steps import CACHE_LENGTH_MULTIPLE, DecodeOptions
from llama_mini.generation.streaming import decode_continuation, stream
from llama_mini.model.sizes import count_parameters
from llama_mini.ops.aot_step import default_cache_folder
from llama_mini.ops.quantize import QuantizeSettings, check_quantize, quantize
from llama_mini.runtime import RuntimeSettings, resolve_device, resolve_dtype
from llama_mini.settings import add_flags
from llama_mini.tokenizer import Tokenizer
from llama_mini.tokenizer.chat import chat_stop_ids, encode_chat

__all__ = ["build_parser", "main", "run"]

DEFAULT_MAX_NEW_TOKENS = 256  # when --max-new-tokens is not given; silently less where it does not fit
SEPARATOR = "-" * 40  # printed between outputs


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
SEED = checked(int, "an integer in [0, 2**63)", lambda value: 0 <= value < 2**63)


# The sampling flags' defaults and help texts are SamplingConfig's, the runtime flags' DecodeOptions',
# except one default of the command's own: a compile cache in the user's cache folder (the library keeps
# none), so that a decode step compiled once serves every later run.
COMMAND_OPTIONS = DecodeOptions(compile_cache=str(default_cache_folder()))
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "repetition_penalty")
RUNTIME_FLAGS = ("compile", "compile_cache", "cuda_graphs")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        allow_abbrev=False,  # a flag's prefix is a mistake, not a shorthand: --temp is refused
        description="Generate text with a llama_mini (or any Llama) checkpoint.",
        epilog="Prompts come from --prompt, --prompt-file, or stdin; with none, from BOS alone.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="checkpoint folder (llama_mini, Hugging Face or Meta) or a training run folder (its best/)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="tokenizer.model or tokenizer.json to use (default: the checkpoint's)",
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
        "--chat",
        action="store_true",
        help="hold a conversation: each line of stdin is a user message, answered in the checkpoint's chat "
        "template until its end-of-turn token",
    )
    prompts.add_argument(
        "--system", metavar="TEXT", help="with --chat: a system message that opens the conversation"
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
    add_flags(sampling, SamplingConfig, only=SAMPLING_FLAGS)
    sampling.add_argument(
        "--seed",
        type=SEED,
        metavar="S",
        help="seed for repeatable samples: output number r draws with row_seed(S, r) (default: a random one)",
    )
    sampling.add_argument(
        "--num-samples", type=POSITIVE_INT, default=1, metavar="N", help="outputs per prompt (default: 1)"
    )
    speculative = parser.add_argument_group("speculative decoding")
    speculative.add_argument(
        "--draft",
        metavar="DIR",
        help="a smaller checkpoint with the same tokenizer that proposes tokens for the model to check, "
        "several per forward pass of the model (same output distribution; steps run eagerly)",
    )
    speculative.add_argument(
        "--draft-tokens",
        type=POSITIVE_INT,
        default=DEFAULT_DRAFT_TOKENS,
        metavar="K",
        help=f"with --draft: tokens the draft proposes per round (default: {DEFAULT_DRAFT_TOKENS})",
    )
    runtime = parser.add_argument_group("runtime")
    add_flags(runtime, RuntimeSettings)
    add_flags(runtime, DecodeOptions, only=RUNTIME_FLAGS, defaults=COMMAND_OPTIONS)
    add_flags(runtime, QuantizeSettings)
    runtime.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="print text as it is generated (default: when stdout is a terminal)",
    )
    runtime.add_argument(
        "--verbose", action="store_true", help="print load time and prefill / decode tokens/s to stderr"
    )
    return parser


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """The command's SamplingConfig: SamplingConfig's defaults with the sampling flags given
    (GenerationError if out of range)."""
    return SamplingConfig(**{name: getattr(args, name) for name in SAMPLING_FLAGS if hasattr(args, name)})


def decode_options(args: argparse.Namespace) -> DecodeOptions:
    """The command's DecodeOptions: COMMAND_OPTIONS with the runtime flags given (ConfigError if
    --compile-cache is a file)."""
    options = COMMAND_OPTIONS.replace(
        **{name: getattr(args, name) for name in RUNTIME_FLAGS if hasattr(args, name)}
    )
    cache = options.compile_cache
    if cache is not None and Path(cache).exists() and not Path(cache).is_dir():
        raise ConfigError(
            f"--compile-cache {cache} is a file: pass a folder, or none to keep no compiled steps"
        )
    return options


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(build_parser(prog), run, argv)


def run(args: argparse.Namespace) -> int:
    runtime = RuntimeSettings(
        **{name: getattr(args, name) for name in ("device", "dtype") if hasattr(args, name)}
    )
    device = resolve_device(runtime.device)
    dtype = resolve_dtype(runtime.dtype, device)
    sampling = sampling_config(args)  # checks the sampling and runtime flags before anything is loaded
    options = decode_options(args)
    check_chat_flags(args)
    quantization = QuantizeSettings(
        **{name: getattr(args, name) for name in ("quantize", "group_size") if hasattr(args, name)}
    )
    check_quantize(quantization.quantize, quantization.group_size, device)
    if Path(args.checkpoint).is_dir():  # a training run folder: use its best/ and say so
        note = describe_resolution(args.checkpoint)
        if note:
            print(note, file=sys.stderr)
        args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
    start = time.perf_counter()
    model = load_model(args.checkpoint, device=device, dtype=dtype)
    quantize(model, quantization.quantize, quantization.group_size)
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
    speculation = load_draft(args, model, tokenizer, device, dtype)
    streaming = sys.stdout.isatty() if args.stream is None else args.stream
    texts = [] if args.interactive or args.chat else read_prompts(args)
    # One KV cache for every call, as large as the largest batch: streaming runs one output at a time,
    # otherwise a call runs all its prompts x samples together. (Reusing it also lets a compiled decode
    # step keep its buffers from call to call in the interactive loop.) It starts short and is replaced
    # by a longer one when a request needs more positions (see generation.steps.ensure_cache).
    rows = 1 if streaming else max(len(texts), 1) * args.num_samples
    model.setup_cache(rows, max_seq_len=CACHE_LENGTH_MULTIPLE, static=bool(options.compile))
    if args.chat:
        ChatSession(model, tokenizer, args, sampling, options, streaming, speculation).converse()
        return 0
    session = Session(model, tokenizer, args, sampling, options, streaming, speculation)
    if args.interactive:
        session.interactive()
    else:
        session.run(texts)
    return 0


class Session:
    """Turns prompt texts into printed outputs, numbering outputs across calls so each has its own seed."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        args: argparse.Namespace,
        sampling: SamplingConfig,
        options: DecodeOptions,
        streaming: bool,
        speculation: Speculation | None = None,
    ):
        self.model, self.tokenizer, self.args, self.streaming = model, tokenizer, args, streaming
        self.options = options
        # With --draft, speculative decoding's generate and stream, of the same signatures.
        self.generate = speculation.generate if speculation else generate
        self.stream = speculation.stream if speculation else stream
        self.new_stats = SpeculativeStats if speculation else GenerationStats
        self.outputs = 0  # outputs printed so far: output number r samples with row_seed(seed, r)
        self.sampling = sampling.replace(eos_id=tokenizer.eos_ids)  # every end id stops a row

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
            self.print_streamed(rows, seeds, max_new_tokens, echo)
        else:
            self.print_batched(rows, seeds, max_new_tokens, echo)

    def print_streamed(
        self, rows: list[tuple[str, list[int]]], seeds: list[int] | None, max_new_tokens: int, echo: bool
    ) -> None:
        """One output after the other, each printed as its tokens arrive."""
        out = sys.stdout
        for r, (text, prompt) in enumerate(rows):
            if r > 0:
                out.write(SEPARATOR + "\n")
            if echo:
                out.write(text)
                out.flush()
            stats = self.new_stats()
            sampling = self.sampling.replace(seed=None if seeds is None else [seeds[r]])
            pieces = self.stream(
                self.model,
                self.tokenizer,
                prompt,
                max_new_tokens,
                sampling,
                options=self.options,
                stats=stats,
            )
            for piece in pieces:
                out.write(piece)
                out.flush()
            out.write("\n")
            out.flush()
            self.report(stats)

    def print_batched(
        self, rows: list[tuple[str, list[int]]], seeds: list[int] | None, max_new_tokens: int, echo: bool
    ) -> None:
        """All outputs as one ragged batch, printed when it is done."""
        stats = self.new_stats()
        prompts = [prompt for _, prompt in rows]
        sampling = self.sampling.replace(seed=seeds)
        new_ids = self.generate(
            self.model, prompts, max_new_tokens, sampling, options=self.options, stats=stats
        )
        for r, ((text, prompt), ids) in enumerate(zip(rows, new_ids, strict=True)):
            if r > 0:
                sys.stdout.write(SEPARATOR + "\n")
            continuation = decode_continuation(self.tokenizer, prompt, ids)
            sys.stdout.write((text if echo else "") + continuation + "\n")
        sys.stdout.flush()
        self.report(stats)

    def interactive(self) -> None:
        """One prompt per line of stdin, answered as it comes; EOF ends. At a terminal the prompt is on the
        screen already, as typed; from a pipe or file it is not, so each reply follows its prompt and the
        replies are separated as in a batch (SEPARATOR), and the output reads on its own."""
        piped, answered = not sys.stdin.isatty(), 0
        while True:
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                print(file=sys.stderr)
                return
            if piped and answered:
                sys.stdout.write(SEPARATOR + "\n")
            try:
                self.run([line.removesuffix("\n")], echo=piped)
                answered += 1
            except LlamaMiniError as error:  # a bad prompt ends that prompt, not the session
                print(f"error: {error}", file=sys.stderr)

    def report(self, stats: GenerationStats) -> None:
        if self.args.verbose:
            print(stats.summary(), file=sys.stderr)


def load_draft(args: argparse.Namespace, model, tokenizer: Tokenizer, device, dtype) -> Speculation | None:
    """The --draft checkpoint as a Speculation, or None without one. CheckpointError (one line, exit 2)
    unless it shares the model's tokenizer: the same vocabulary size, and its own tokenizer, if it has one,
    the same (the same file, or the same piece for every id and the same special ids)."""
    if args.draft is None:
        return None
    if Path(args.draft).is_dir():
        args.draft = str(resolve_checkpoint(args.draft))
    draft = load_model(args.draft, device=device, dtype=dtype)
    try:
        check_draft(model, draft)
    except ConfigError as error:
        raise CheckpointError(f"--draft {args.draft}: {error}") from None
    found = find_tokenizer(Path(args.draft))
    if found is not None and not same_tokenizer(tokenizer, Tokenizer(found)):
        raise CheckpointError(
            f"--draft {args.draft} has another tokenizer than the model's ({found}): pass a draft "
            "trained with the model's tokenizer"
        )
    if getattr(args, "compile", None):
        print("note: --draft decodes with eager steps; --compile is not used", file=sys.stderr)
    return Speculation(draft, args.draft_tokens)


def same_tokenizer(first: Tokenizer, second: Tokenizer) -> bool:
    """Whether two tokenizers give every id the same piece and have the same special ids (one may be a
    tokenizer.model and the other its tokenizer.json)."""
    if first.sha256 == second.sha256:
        return True
    ids = ("vocab_size", "bos_id", "eos_id", "pad_id")
    if any(getattr(first, name) != getattr(second, name) for name in ids):
        return False
    return all(first.id_to_piece(i) == second.id_to_piece(i) for i in range(first.vocab_size))


def check_chat_flags(args: argparse.Namespace) -> None:
    """The flags that --chat cannot take, and --system without --chat: ConfigErrors, before any loading."""
    if args.system is not None and not args.chat:
        raise ConfigError("--system opens a conversation: pass it with --chat")
    if not args.chat:
        return
    if args.prompt or args.prompt_file:
        raise ConfigError(
            "--chat reads the user's messages from stdin, one per line: drop --prompt and --prompt-file "
            "(pipe the messages in instead)"
        )
    if args.num_samples != 1:
        raise ConfigError("--chat continues the conversation from one reply: drop --num-samples")


class ChatSession:
    """A conversation on stdin and stdout (generate.py --chat; see the module docstring).

    Each reply is sampled with the seed of output number r (row_seed(seed, r), r counting replies from 0),
    as the other modes number their outputs, and stops at any of chat_stop_ids: the template's end-of-turn
    token first. The reply is printed without the whitespace that opens it, and joins the conversation
    stripped of the whitespace around it, which every template writes itself (the default template's " "
    after "assistant:", Llama 3's "\n\n"): so the next prompt renders the reply as the template would.
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        args: argparse.Namespace,
        sampling: SamplingConfig,
        options: DecodeOptions,
        streaming: bool,
        speculation: Speculation | None = None,
    ):
        self.model, self.tokenizer, self.args, self.streaming = model, tokenizer, args, streaming
        self.options = options
        # With --draft, speculative decoding's generate and stream, of the same signatures.
        self.generate = speculation.generate if speculation else generate
        self.stream = speculation.stream if speculation else stream
        self.new_stats = SpeculativeStats if speculation else GenerationStats
        self.sampling = sampling.replace(eos_id=chat_stop_ids(tokenizer))
        self.system = [{"role": "system", "content": args.system}] if args.system is not None else []
        self.turns: list[dict[str, str]] = []  # the conversation after the system message
        self.replies = 0

    def converse(self) -> None:
        """Answer each line of stdin in turn until the end of input."""
        if self.tokenizer.chat_template is None:
            print(
                "note: the checkpoint's tokenizer has no chat template: using llama_mini's default "
                "(llama_mini.tokenizer.DEFAULT_CHAT_TEMPLATE)",
                file=sys.stderr,
            )
        while True:
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                print(file=sys.stderr)
                return
            self.turns.append({"role": "user", "content": line.removesuffix("\n")})
            try:
                reply = self.reply()
            except LlamaMiniError as error:  # a message that cannot be answered ends that turn only
                self.turns.pop()
                print(f"error: {error}", file=sys.stderr)
                continue
            self.turns.append({"role": "assistant", "content": reply})

    def reply(self) -> str:
        """Generate, print and return the reply to the conversation so far."""
        prompt, max_new_tokens = self.prompt()
        seed = None if self.args.seed is None else [row_seed(self.args.seed, self.replies)]
        self.replies += 1
        sampling = self.sampling.replace(seed=seed)
        stats = self.new_stats()
        if self.streaming:
            shown = ""
            pieces = self.stream(
                self.model,
                self.tokenizer,
                prompt,
                max_new_tokens,
                sampling,
                options=self.options,
                stats=stats,
            )
            for piece in pieces:
                piece = piece if shown else piece.lstrip()  # the template's space before the reply
                shown += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
            text = shown
        else:
            new_ids = self.generate(
                self.model, [prompt], max_new_tokens, sampling, options=self.options, stats=stats
            )[0]
            text = decode_continuation(self.tokenizer, prompt, new_ids).lstrip()
            sys.stdout.write(text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats.new_tokens >= max_new_tokens:
            print(f"note: the reply was cut at {max_new_tokens} tokens (--max-new-tokens)", file=sys.stderr)
        if self.args.verbose:
            print(stats.summary(), file=sys.stderr)
        return text.strip()

    def prompt(self) -> tuple[list[int], int]:
        """The conversation's ids ending in the generation prompt, and the new tokens they leave room for.

        The reply gets --max-new-tokens (default: DEFAULT_MAX_NEW_TOKENS, at most half the context). While
        the prompt leaves less than that, the oldest exchange (a user message and the replies after it) is
        dropped; when only the last message is left and the prompt still leaves no room, GenerationError.
        """
        context = self.model.args.max_seq_len
        wanted = self.args.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, context // 2)
        dropped = 0
        while True:
            ids = encode_chat(self.tokenizer, self.system + self.turns, add_generation_prompt=True).ids
            if len(ids) + wanted <= context or len(self.turns) == 1:
                break
            next_user = next(
                (i for i, turn in enumerate(self.turns) if i > 0 and turn["role"] == "user"),
                len(self.turns) - 1,
            )
            dropped += next_user
            del self.turns[:next_user]
        if dropped:
            print(
                f"note: dropped the oldest {dropped} messages of the conversation to fit the context of "
                f"{context} tokens",
                file=sys.stderr,
            )
        if len(ids) >= context:
            raise GenerationError(
                f"the conversation's last message needs {len(ids)} tokens but the model's context is "
                f"{context}, which must also hold the reply: send a shorter message"
            )
        return ids, min(wanted, context - len(ids))


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
    """The --tokenizer file or folder, else the checkpoint's tokenizer: its SentencePiece tokenizer.model,
    or its tokenizer.json (Llama 3, SmolLM); CheckpointError when there is none."""
    folder = Path(checkpoint)
    if not folder.exists():
        raise CheckpointError(
            f"checkpoint {folder} does not exist: pass --checkpoint a folder written by save_pretrained "
            f"(or a Hugging Face or Meta Llama folder)"
        )
    if not folder.is_dir():  # said first: no --tokenizer would make a file a checkpoint
        raise CheckpointError(
            f"checkpoint {folder} is a file, not a checkpoint: pass --checkpoint the folder that holds "
            f"config.json and model.safetensors (or a training run folder)"
        )
    if tokenizer_path is not None and not Path(tokenizer_path).exists():
        raise CheckpointError(
            f"--tokenizer {tokenizer_path} does not exist: pass the tokenizer.model or tokenizer.json "
            f"the model was trained with (or leave it out to use the checkpoint's)"
        )
    path = find_tokenizer(tokenizer_path) if tokenizer_path is not None else find_tokenizer(folder)
    if path is None:
        what = (
            f"--tokenizer {tokenizer_path} is not a .model or .json file or a folder with a tokenizer"
            if tokenizer_path is not None
            else f"checkpoint {folder} has no tokenizer.model"
        )
        raise CheckpointError(
            f"{what}: pass --tokenizer with the tokenizer.model or tokenizer.json the model was trained with"
        )
    return Tokenizer(path)
