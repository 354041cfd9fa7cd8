"""`python -m llama_mini.inspect`: the same command as `llama-mini inspect`.

Its code is llama_mini/study/inspector.py; this module only makes `python -m llama_mini.inspect` work.
"""

import sys

from llama_mini.study.inspector import main

if __name__ == "__main__":
    sys.exit(main())
