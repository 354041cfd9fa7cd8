"""Training: settings (config.py), the optimizer (optim.py), the run folder (run_folder.py), the data a run
reads (data_feed.py) and the loop (trainer.py). `train.py` is the command line over it."""

from llama_mini.train.config import TrainConfig
from llama_mini.train.optim import learning_rate, make_optimizer
from llama_mini.train.run_folder import METRICS, RUN_CONFIG, list_step_checkpoints
from llama_mini.train.trainer import Trainer, TrainingError, TrainSummary, accumulate_gradients

__all__ = [
    "METRICS",
    "RUN_CONFIG",
    "TrainConfig",
    "TrainSummary",
    "Trainer",
    "TrainingError",
    "accumulate_gradients",
    "learning_rate",
    "list_step_checkpoints",
    "make_optimizer",
]
