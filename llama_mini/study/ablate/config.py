"""The ablation's settings: which variants and seeds, and the training and model settings every run shares.

Only the ablation's own settings are declared here (variants, seeds, its folder). Every run's training
settings are a `TrainConfig` and its model a `ModelArgs`, the one declaration of each setting; the ablation
changes some of their defaults (TRAIN_DEFAULTS, MODEL_DEFAULTS) and exposes some of them as flags
(TRAIN_SETTINGS, MODEL_SETTINGS), with TrainConfig's and ModelArgs' own help texts, types and choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_mini.errors import ConfigError
from llama_mini.model.args import FeedForwardName, ModelArgs
from llama_mini.model.ffn import FEED_FORWARDS
from llama_mini.settings import choice_problems, setting
from llama_mini.train.config import TrainConfig

__all__ = ["MODEL_DEFAULTS", "MODEL_SETTINGS", "TRAIN_DEFAULTS", "TRAIN_SETTINGS", "AblationConfig"]

# The training and model settings the ablation's command line exposes (every run shares them).
TRAIN_SETTINGS = ("data", "tokenizer", "vocab_size", "val_fraction", "split_seed", "max_steps", "batch_size",
                  "lr", "min_lr", "warmup_steps", "weight_decay", "eval_steps", "device", "dtype", "compile",
                  "optimizer", "muon_lr")  # fmt: skip
MODEL_SETTINGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "weight_init")

# Where the ablation's defaults differ from TrainConfig's and ModelArgs': a small model and short runs, so
# that 8 variants x 3 seeds finish in about 15 minutes on a 2-core CPU (docs/ABLATION.md).
TRAIN_DEFAULTS: dict[str, Any] = {
    "vocab_size": 2048,  # small, so that the FFN is a large share of the model
    "split_seed": 0,  # one train/validation split for every run, whatever its seed
    "max_steps": 200,
    "batch_size": 8,  # at a fixed budget of tokens, 200 steps of 8 beat 100 of 16 here
    "lr": 2e-3,
    "min_lr": 2e-4,  # given, not derived from --lr: --lr alone leaves it here
    "warmup_steps": 20,
    "weight_decay": 0.1,  # and float32 (not auto's bf16 on a CPU with AMX): the settings its results had
    "dtype": "fp32",
    "eval_steps": 40,  # validation batches at the end of each run
}
# (4 heads: ModelArgs' default when the results were made; it is 3 since issue 28)
MODEL_DEFAULTS: dict[str, Any] = {"dim": 96, "n_heads": 4, "multiple_of": 32, "max_seq_len": 128}

# TrainConfig fields each run sets for itself (AblationConfig.train_config), and ModelArgs fields set per
# run (the variant) or by the tokenizer: none of them is a setting shared by the runs.
RUN_TRAIN_FIELDS = ("out", "seed", "data_dir", "eval_interval", "log_interval", "keep_last", "sample_tokens")
RUN_MODEL_FIELDS = ("ffn", "vocab_size")


@dataclass
class AblationConfig:
    """The ablation: the variants and seeds to train, and the settings every run shares.

    `train` and `model` are every run's TrainConfig and ModelArgs; a run adds its own seed and folder to
    `train` (train_config) and its variant to `model` (model_args). `from_settings` builds one from flat
    settings, as the command line gives them.
    """

    variants: list[FeedForwardName] = setting(
        factory=lambda: list(FEED_FORWARDS), help="FFN variants to train"
    )
    seeds: list[int] = setting(factory=lambda: [0, 1, 2], help="seeds: initial weights and batch order")
    out: str = setting(
        "runs/ablation", "ablation folder: shared data, runs/, results.jsonl, ablation.md, ablation.png"
    )
    keep_checkpoints: bool = setting(False, "keep each run's checkpoints")
    train: TrainConfig = setting(
        factory=lambda: TrainConfig(**TRAIN_DEFAULTS),
        help="the training settings of every run; each run sets its own seed and folder",
        flag=False,
    )
    model: ModelArgs = setting(
        factory=lambda: ModelArgs(**MODEL_DEFAULTS),
        help="the model of every run but its feed-forward; the tokenizer sets vocab_size",
        flag=False,
    )

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.variants or not self.seeds:
            raise ConfigError("--variants and --seeds need at least one value each")
        if len(set(self.variants)) != len(self.variants) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--variants and --seeds must not repeat a value")

    @classmethod
    def from_settings(cls, **values: Any) -> AblationConfig:
        """From flat settings (the command line's): the ablation's own fields, and TRAIN_SETTINGS and
        MODEL_SETTINGS over the ablation's defaults. Anything else is a ConfigError naming it."""
        own = {field.name for field in dataclasses.fields(cls)} - {"train", "model"}
        unknown = sorted(set(values) - own - set(TRAIN_SETTINGS) - set(MODEL_SETTINGS))
        if unknown:
            raise ConfigError(f"unknown ablation setting(s) {', '.join(map(repr, unknown))}")
        train = {name: value for name, value in values.items() if name in TRAIN_SETTINGS}
        model = {name: value for name, value in values.items() if name in MODEL_SETTINGS}
        return cls(
            **{name: value for name, value in values.items() if name in own},
            train=TrainConfig(**{**TRAIN_DEFAULTS, **train}),
            model=ModelArgs(**{**MODEL_DEFAULTS, **model}),
        )

    def model_args(self, variant: str, vocab_size: int | None = None) -> ModelArgs:
        """One run's model: `model` with the run's feed-forward and the tokenizer's vocabulary."""
        return dataclasses.replace(self.model, ffn=variant, vocab_size=vocab_size or self.train.vocab_size)

    def model_overrides(self, variant: str) -> dict[str, Any]:
        """The ModelArgs fields a Trainer is given (it sets vocab_size from the tokenizer itself)."""
        values = self.model_args(variant).to_dict()
        del values["vocab_size"]
        return values

    def train_config(
        self, seed: int, out: Path, tokenizer: Path | None = None, data_dir: Path | None = None
    ) -> TrainConfig:
        """One run's TrainConfig: `train` with the run's `seed` and folder `out`, and the shared tokenizer
        and prepared data.

        One evaluation, at the end (eval_interval = max_steps): the final validation loss is what the
        table compares, and each evaluation also writes a checkpoint.
        """
        return self.train.replace(
            out=str(out),
            seed=seed,
            tokenizer=str(tokenizer) if tokenizer else self.train.tokenizer,
            data_dir=str(data_dir) if data_dir else None,
            eval_interval=self.train.max_steps,
            log_interval=min(10, self.train.max_steps),
            keep_last=1,
            sample_tokens=0,
        )

    def settings(self) -> dict[str, Any]:
        """What determines a run's result besides its variant and seed: stored with every result, and
        compared on resume so that runs with different settings never share a table.

        Every exposed setting, and any other shared field of `train` or `model` that differs from the
        ablation's default (one set from Python), so that it too keeps results apart.
        """
        train_defaults, model_defaults = TrainConfig(**TRAIN_DEFAULTS), ModelArgs(**MODEL_DEFAULTS)
        values = {}
        for config, exposed, per_run, defaults in (
            (self.train, TRAIN_SETTINGS, RUN_TRAIN_FIELDS, train_defaults),
            (self.model, MODEL_SETTINGS, RUN_MODEL_FIELDS, model_defaults),
        ):
            for name, value in config.to_dict().items():
                if name in exposed or (name not in per_run and value != getattr(defaults, name)):
                    values[name] = value
        if values.get("optimizer") == "adamw":  # --muon-lr does not change an AdamW run
            values.pop("muon_lr", None)
        return dict(sorted(values.items()))
