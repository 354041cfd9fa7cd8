"""`python -m llama_mini COMMAND ...`: the same as the `llama-mini` command (llama_mini/cli.py)."""

import sys

from llama_mini.cli import main

sys.exit(main())
