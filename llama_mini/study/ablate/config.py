"""The ablation's settings: which variants and seeds, and the training and model settings every run shares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_mini.errors import ConfigError
from llama_mini.model.args import FeedForwardName, InitName, ModelArgs
from llama_mini.model.ffn import FEED_FORWARDS
from llama_mini.settings import choice_problems, setting
from llama_mini.train.config import TrainConfig

__all__ = ["MODEL_SETTINGS", "TRAIN_SETTINGS", "AblationConfig"]

# The training and model settings an ablation exposes (every run shares them); their help texts are
# TrainConfig's and ModelArgs', their defaults the ablation's own, below.
TRAIN_SETTINGS = ("data", "tokenizer", "vocab_size", "val_fraction", "split_seed", "max_steps", "batch_size",
                  "lr", "min_lr", "warmup_steps", "eval_steps", "device", "dtype", "compile")  # fmt: skip
MODEL_SETTINGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "weight_init")


@dataclass
class AblationConfig:
    """The ablation's settings; every run uses them all, with its own variant and seed.

    The defaults finish 8 variants x 3 seeds in about 15 minutes on a 2-core CPU (docs/ABLATION.md).
    """

    variants: list[FeedForwardName] = setting(
        factory=lambda: list(FEED_FORWARDS), help="FFN variants to train"
    )
    seeds: list[int] = setting(factory=lambda: [0, 1, 2], help="seeds: initial weights and batch order")
    out: str = setting(
        "runs/ablation", "ablation folder: shared data, runs/, results.jsonl, ablation.md, ablation.png"
    )
    keep_checkpoints: bool = setting(False, "keep each run's checkpoints")
    # TRAIN_SETTINGS, with the ablation's defaults
    data: str = setting("shakespeare", flag=False)
    tokenizer: str | None = setting(None, flag=False)  # None = train one once, into out
    vocab_size: int = setting(2048, flag=False)  # small, so that the FFN is a large share of the model
    val_fraction: float = setting(0.1, flag=False)
    split_seed: int = setting(0, flag=False)  # one train/validation split for every run, whatever its seed
    max_steps: int = setting(200, flag=False)
    batch_size: int = setting(
        8, flag=False
    )  # at a fixed budget of tokens, 200 steps of 8 beat 100 of 16 here
    lr: float = setting(2e-3, flag=False)
    min_lr: float = setting(2e-4, flag=False)
    warmup_steps: int = setting(20, flag=False)
    eval_steps: int = setting(40, flag=False)  # validation batches at the end of each run
    device: str = setting("auto", flag=False)
    dtype: str = setting("auto", flag=False)
    compile: bool | None = setting(None, flag=False)
    # MODEL_SETTINGS: every run the same model but for ffn
    dim: int = setting(96, flag=False)
    n_layers: int = setting(4, flag=False)
    n_heads: int = setting(4, flag=False)
    n_kv_heads: int | None = setting(None, flag=False)
    multiple_of: int = setting(32, flag=False)
    max_seq_len: int = setting(128, flag=False)
    weight_init: InitName = setting("scaled", flag=False)

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.variants or not self.seeds:
            raise ConfigError("--variants and --seeds need at least one value each")
        if len(set(self.variants)) != len(self.variants) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--variants and --seeds must not repeat a value")
        self.model_args("swiglu")  # a bad model shape fails here, before any data is prepared
        self.train_config(self.seeds[0], Path(self.out))

    def model_args(self, variant: str, vocab_size: int | None = None) -> ModelArgs:
        return ModelArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            multiple_of=self.multiple_of,
            max_seq_len=self.max_seq_len,
            vocab_size=vocab_size or self.vocab_size,
            ffn=variant,
            weight_init=self.weight_init,
        )

    def model_overrides(self, variant: str) -> dict[str, Any]:
        """The ModelArgs fields a Trainer is given (it sets vocab_size from the tokenizer itself)."""
        values = self.model_args(variant).to_dict()
        del values["vocab_size"]
        return values

    def train_config(
        self, seed: int, out: Path, tokenizer: Path | None = None, data_dir: Path | None = None
    ) -> TrainConfig:
        """One run's TrainConfig: the same for every run but `seed` and `out`.

        One evaluation, at the end (eval_interval = max_steps): the final validation loss is what the
        table compares, and each evaluation also writes a checkpoint.
        """
        return TrainConfig(
            data=self.data,
            out=str(out),
            tokenizer=str(tokenizer) if tokenizer else self.tokenizer,
            vocab_size=self.vocab_size,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            data_dir=str(data_dir) if data_dir else None,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            eval_interval=self.max_steps,
            eval_steps=self.eval_steps,
            log_interval=min(10, self.max_steps),
            keep_last=1,
            seed=seed,
            device=self.device,
            dtype=self.dtype,
            compile=self.compile,
            sample_tokens=0,
        )

    def settings(self) -> dict[str, Any]:
        """What determines a run's result besides its variant and seed: stored with every result, and
        compared on resume so that runs with different settings never share a table."""
        values = dataclasses.asdict(self)
        for name in ("variants", "seeds", "out", "keep_checkpoints"):
            del values[name]
        return values
