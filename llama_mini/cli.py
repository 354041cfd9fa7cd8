"""`llama-mini`: one command with a subcommand per job (installed by `pip install .`).

    llama-mini train ...       train a model (train.py)
    llama-mini generate ...    generate text (generate.py)
    llama-mini serve ...       an OpenAI-compatible server and a chat page
    llama-mini convert ...     convert checkpoints: Meta / Hugging Face folders, GGUF
    llama-mini inspect ...     parameters, costs and shapes of a preset or checkpoint
    llama-mini plots ...       the study's pictures
    llama-mini ablate ...      the feed-forward ablation
    llama-mini torchrun ...    torchrun (many processes), exiting as one process does

`llama-mini COMMAND --help` lists each one's flags. Every subcommand follows one error convention
(llama_mini/console.py): a mistake is one line on stderr and exit code 2. A subcommand's module is imported
only when it runs, so `llama-mini inspect` does not load the training stack.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

# subcommand -> (module with main(argv, prog), one line of help)
COMMANDS = {
    "train": ("llama_mini.train.command", "train a model on a corpus (the default: Shakespeare)"),
    "generate": ("llama_mini.generation.command", "generate text with a checkpoint"),
    "eval": ("llama_mini.eval.command", "bits per byte on any corpus, or lm-evaluation-harness benchmarks"),
    "serve": ("llama_mini.serve.command", "serve a checkpoint: OpenAI-compatible API and a chat page"),
    "convert": ("llama_mini.convert", "convert a checkpoint (Meta, Hugging Face, llama_mini) or export GGUF"),
    "inspect": (
        "llama_mini.study.inspector",
        "parameters, FLOPs, memory and shapes of a preset or checkpoint",
    ),
    "plots": ("llama_mini.study.plots.command", "activations, GLU surfaces, training curves, FFN statistics"),
    "ablate": (
        "llama_mini.study.ablate.command",
        "train every feed-forward variant and compare with Shazeer (2020)",
    ),
    "torchrun": ("llama_mini.launch", "torchrun's flags and launcher, with a single process's exits"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: llama-mini COMMAND [flags]   (llama-mini COMMAND --help for its flags)\n\n" + "\n".join(
        lines
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except KeyboardInterrupt:  # Ctrl-C while torch is still loading: nothing has started yet
        return 130
    return module.main(rest, prog=f"llama-mini {name}")


if __name__ == "__main__":
    sys.exit(main())
