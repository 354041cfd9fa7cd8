"""`python -m llama_mini.plots`: the same command as `llama-mini plots`.

Its code is llama_mini/study/plots/ (the command: llama_mini/study/plots/command.py); this module only makes
`python -m llama_mini.plots` work.
"""

import sys

from llama_mini.study.plots.command import main

if __name__ == "__main__":
    sys.exit(main())
