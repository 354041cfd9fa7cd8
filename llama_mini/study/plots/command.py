"""`llama-mini plots` / `python -m llama_mini.plots`: one subcommand per family of figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_mini.console import ArgumentParser, run_command
from llama_mini.study.plots.activations import plot_activations
from llama_mini.study.plots.ffn_stats import plot_ffn_stats
from llama_mini.study.plots.glu import plot_glu
from llama_mini.study.plots.newton_schulz import plot_newton_schulz
from llama_mini.study.plots.style import FORMATS, PlotError
from llama_mini.study.plots.training import plot_training

__all__ = ["build_parser", "main"]


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlotError(f"--text-file {path}: no such file; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PlotError(
            f"--text-file {path}: cannot be read as UTF-8 text ({type(error).__name__})"
        ) from None


def _run(args: argparse.Namespace) -> list[Path]:
    if args.command == "activations":
        return plot_activations(args.out, args.format)
    if args.command == "glu":
        return plot_glu(args.out, args.format)
    if args.command == "training":
        return plot_training([*args.run_folders, *args.runs], args.out, args.format)
    if args.command == "newton-schulz":
        return plot_newton_schulz(args.checkpoint, args.out, args.format, args.text, args.tokenizer)
    text, text_name = args.text, None
    if args.text_file is not None:
        text, text_name = _read_text_file(args.text_file), Path(args.text_file).name
    return plot_ffn_stats(
        args.checkpoint, args.out, text, args.format, args.tokenizer, args.compare_init, text_name
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, metavar="DIR", help="folder to write the images into")
    common.add_argument("--format", choices=FORMATS, default="png", help="image format (default: png)")
    parser = ArgumentParser(
        prog=prog or "python -m llama_mini.plots",
        description="Plots for studying llama_mini: activations, GLUs, training runs, FFN gates, Muon.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser
    )
    commands.add_parser(
        "activations",
        parents=[common],
        help="sigmoid, tanh, ReLU, Leaky ReLU, GELU, Swish and their derivatives",
    )
    commands.add_parser(
        "glu", parents=[common], help="GLU, Bilinear, ReGLU, GEGLU, SwiGLU as f(gate a, value b)"
    )
    training = commands.add_parser(
        "training",
        help="loss by step, tokens and wall time, lr, tokens/s and gradient norm of one or more runs, "
        "overlaid and labelled by folder name",
    )
    training.add_argument(
        "run_folders", nargs="*", metavar="RUN", help="run folders (or their metrics.jsonl) to overlay"
    )
    training.add_argument(
        "--runs", nargs="+", default=[], metavar="RUN", help="more runs, as a flag (the same as RUN ...)"
    )
    training.add_argument(
        "--out", default=".", metavar="DIR", help="folder to write training.png into (default: .)"
    )
    training.add_argument("--format", choices=FORMATS, default="png", help="image format (default: png)")
    stats = commands.add_parser(
        "ffn-stats",
        parents=[common],
        help="histograms of each layer's gates on a text: what the gates learned",
    )
    stats.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="checkpoint folder (llama_mini, HF or Meta) or a run folder",
    )
    text = stats.add_mutually_exclusive_group()
    text.add_argument("--text", help="text to run the model on (default: a passage of Hamlet)")
    text.add_argument("--text-file", metavar="FILE", help="UTF-8 file with the text to run the model on")
    stats.add_argument(
        "--tokenizer", metavar="FILE", help="SentencePiece tokenizer.model (default: the checkpoint's)"
    )
    stats.add_argument(
        "--compare-init",
        action="store_true",
        help="overlay a freshly initialised model of the same shape (grey)",
    )
    orthogonal = commands.add_parser(
        "newton-schulz",
        parents=[common],
        help="singular values of a SwiGLU matrix's gradient before and after Muon's orthogonalization",
    )
    orthogonal.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="checkpoint folder or run folder (SwiGLU)"
    )
    orthogonal.add_argument(
        "--text", help="text whose loss gives the gradient (default: a passage of Hamlet)"
    )
    orthogonal.add_argument(
        "--tokenizer", metavar="FILE", help="SentencePiece tokenizer.model (default: the checkpoint's)"
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(build_parser(prog), lambda args: print(*_run(args), sep="\n"), argv)


if __name__ == "__main__":
    sys.exit(main())
