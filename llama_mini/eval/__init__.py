"""Evaluation: how good a checkpoint is.

    corpus.py    bits per byte of any corpus, every token scored once in sliding windows (`bits_per_byte`)
    harness.py   lm-evaluation-harness's model class for llama_mini ("llama_mini"; needs the [eval] extra)
    command.py   `llama-mini eval CHECKPOINT --data SOURCE | --tasks NAMES`

harness.py imports lm_eval, an optional extra, so it is not imported here.
"""

from llama_mini.eval.corpus import CorpusScore, bits_per_byte, document_windows

__all__ = ["INSTALL_EVAL", "CorpusScore", "bits_per_byte", "document_windows"]

# What fixes a missing lm-eval, for every message that needs it (llama-mini eval --tasks, train --eval-tasks).
INSTALL_EVAL = "pip install 'llama_mini[eval]' (or pip install lm-eval)"
