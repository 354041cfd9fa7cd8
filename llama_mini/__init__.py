"""llama_mini: a compact LLaMA-style language model in PyTorch, for training, generation and study."""

from llama_mini.errors import CheckpointError, ConfigError, DataError, LlamaMiniError
from llama_mini.model.args import ModelArgs
from llama_mini.model.ffn import FEED_FORWARDS, FeedForward
from llama_mini.model.presets import PRESETS, get_preset
from llama_mini.model.sizes import count_parameters, training_flops_per_token
from llama_mini.model.transformer import Transformer
from llama_mini.ops.loss import cross_entropy

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
    "load_model",
    "save_pretrained",
    "training_flops_per_token",
]


def __getattr__(name: str):
    """`llama_mini.load_model` and `llama_mini.save_pretrained`, imported on first use: the checkpoint code
    (and the tokenizer libraries it needs) is not loaded by `import llama_mini` alone."""
    if name in ("load_model", "save_pretrained"):
        from llama_mini import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'llama_mini' has no attribute {name!r}")
