"""The one family of exceptions that llama_mini raises for problems a person can fix.

Every message says what was wrong and how to fix it. The command-line scripts catch `LlamaMiniError`,
print its message as one line on stderr and exit with code 2, so a user mistake never shows a traceback.
"""


class LlamaMiniError(Exception):
    """Base class: a problem with the user's input, files or settings, not a bug in llama_mini."""


class ConfigError(LlamaMiniError, ValueError):
    """A model or training setting is invalid (names the field and the allowed values)."""


class DataError(LlamaMiniError):
    """A corpus, tokenizer or data shard is missing, empty or inconsistent."""


class CheckpointError(LlamaMiniError):
    """A checkpoint folder or weights file is missing, corrupted or does not match its config."""
