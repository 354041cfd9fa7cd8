"""`python -m llama_mini.ablate`: the same command as `llama-mini ablate`.

Its code is llama_mini/study/ablate/ (the command: llama_mini/study/ablate/command.py); this module only makes
`python -m llama_mini.ablate` work.
"""

import sys

from llama_mini.study.ablate.command import main

if __name__ == "__main__":
    sys.exit(main())
