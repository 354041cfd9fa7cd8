"""llama_mini: a compact LLaMA-style language model in PyTorch, for training, generation and study."""

from llama_mini.errors import CheckpointError, ConfigError, DataError, LlamaMiniError
from llama_mini.ffn import FEED_FORWARDS, FeedForward
from llama_mini.model import ModelArgs, Transformer, count_parameters, cross_entropy, training_flops_per_token
from llama_mini.presets import PRESETS, get_preset

__version__ = "0.1.0"

__all__ = [
    "FEED_FORWARDS",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FeedForward",
    "LlamaMiniError",
    "ModelArgs",
    "Transformer",
    "count_parameters",
    "cross_entropy",
    "get_preset",
    "training_flops_per_token",
]
