"""TrainConfig: every training setting, declared once, and how a run's settings are resolved.

Each field carries its default, help text and choices (llama_mini.settings); train.py's flags, `--config
run.toml` files and the ablation runner are made from these declarations. A run's settings come from, in
increasing priority:

    new run:   the defaults, then --preset (model shape), then --config FILE, then the flags given
    --resume:  the checkpoint's saved settings, then --config FILE, then the flags given

and the run folder keeps the resolved settings in OUT/config.toml, which `--config` reads back to
reproduce the run. A resumed run also keeps the values its defaults came to when it started (the
checkpoint's "resolved" record; `resumed_settings`, and build.py's `own_choices` for the device's), so a
newer llama_mini with other defaults continues it as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llama_mini.data.mixture import parse_mixture
from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.presets import PRESETS, PresetName
from llama_mini.ops.fast_paths import ATTENTION_BACKENDS, CPU_COMPILE_MIN_STEPS
from llama_mini.ops.kernels import SWIGLU_KERNELS
from llama_mini.ops.lora import DEFAULT_LORA_TARGETS, parse_lora_targets
from llama_mini.ops.preference import PreferenceLossName
from llama_mini.runtime import DtypeName, device_setting, dtype_setting
from llama_mini.settings import (
    choice_problems,
    from_dict,
    read_config_file,
    setting,
    type_problem,
    write_config_file,
)
from llama_mini.tokenizer import DEFAULT_VOCAB_SIZE
from llama_mini.train.tracking import DASHBOARDS

__all__ = [
    "DERIVED_FROM",
    "AttentionName",
    "OptimizerName",
    "ParallelName",
    "SwiGLUKernelName",
    "TrainConfig",
    "WandBMode",
    "check_resolved_record",
    "model_args_for",
    "read_run_config",
    "resumed_settings",
    "write_run_config",
]

# The optimizer's and schedule's defaults for each kind of run (TrainConfig._resolve_schedule_defaults),
# measured in docs/BENCHMARKS.md: from scratch in "`make demo` in half the time", fine-tuning in
# "Fine-tuning". The schedule decays to min_lr = lr / *_DECAY.
FROM_SCRATCH_LR, FINE_TUNING_LR, LORA_LR = 4e-3, 3e-4, 3e-3
FROM_SCRATCH_WARMUP, FINE_TUNING_WARMUP = 20, 10
FROM_SCRATCH_DECAY, FINE_TUNING_DECAY = 100, 10
FROM_SCRATCH_WEIGHT_DECAY, FINE_TUNING_WEIGHT_DECAY = 1.0, 0.1
WARMUP_MAX_SHARE = 10  # a default warmup takes at most max_steps / 10: a short run leaves it and learns
# Muon's peak learning rate: the best of 0.005, 0.01, 0.02, 0.04 in docs/BENCHMARKS.md ("Optimizers").
MUON_LR = 0.01

# The SDPA kernels and the SwiGLU activation's kernels by name, from the lists where they are implemented
# (llama_mini.ops.fast_paths, llama_mini.ops.kernels), plus "auto": the flags' choices come from these.
AttentionName = Literal[("auto", *ATTENTION_BACKENDS)]
SwiGLUKernelName = Literal[("auto", *SWIGLU_KERNELS)]
# How training spreads over the processes of a torchrun job (llama_mini.train.parallel).
ParallelName = Literal["ddp", "fsdp"]
# Where --log wandb sends the run (W&B's own modes).
WandBMode = Literal["online", "offline", "disabled"]

# The optimizers (llama_mini.train.optim).
OptimizerName = Literal["adamw", "muon"]


@dataclass
class TrainConfig:
    """Every training setting; train.py's flags map one to one onto these fields (dashes for underscores)."""

    data: str | list[str] = setting(
        "shakespeare",
        "corpus: shakespeare, tinystories, hf:NAME[:CONFIG] (a Hugging Face dataset), a .txt, .jsonl or "
        ".parquet file, a folder of one of those kinds, or a folder written by Dataset.save_to_disk; "
        "repeated as SOURCE:WEIGHT, a weighted mixture (each source prepared and validated on its own, "
        "logged as val_bpb/NAME beside the weighted val_bpb)",
    )
    text_field: str = setting(
        "text", "the field or column holding each document's text in .jsonl, Parquet and Hugging Face data"
    )
    data_split: str = setting("train", "the split of a Hugging Face dataset to read (hf:NAME or saved)")
    chat: bool | None = setting(
        None,
        'chat fine-tuning: read --data (.jsonl) as conversations, one {"messages": [{"role", "content"}, '
        "...]} per line, rendered with the tokenizer's chat template (or llama_mini's default, then saved "
        "with the checkpoints) and trained on the assistant tokens only; none = when the first record has "
        '"messages"',
    )
    data_workers: int | None = setting(
        None,
        "processes that tokenize the corpus (none = the usable cores); the shards are identical for any "
        "number",
    )
    tokenizer_sample_mb: float = setting(
        20.0, "MB of the training split, from its start, that a tokenizer trained for the run learns from"
    )
    out: str = setting(
        "out", "run folder: checkpoints (step-*/, best/), tokenizer, data, metrics, config.toml"
    )
    preset: PresetName | None = setting(None, "model shape by name; model flags override single fields")
    tokenizer: str | None = setting(
        None,
        "an existing tokenizer (a tokenizer.model, a tokenizer.json, or a folder with one) to use instead of "
        "training one on the corpus; with --init-from, the checkpoint's",
    )
    vocab_size: int = setting(DEFAULT_VOCAB_SIZE, "vocabulary of the tokenizer trained on the corpus")
    val_fraction: float = setting(0.1, "share of the corpus's documents held out for validation")
    split_seed: int = setting(
        1337,
        "chooses the validation documents (independent of --seed, so runs with other seeds share a split)",
    )
    data_dir: str | None = setting(
        None, "folder for the tokenized shards (none = OUT/data); runs on one corpus can share it"
    )
    verify_data: bool = setting(
        False,
        "compare every shard's sha256 with the one recorded when it was prepared before training (a full "
        "read; sizes and token ids are always checked)",
    )
    max_steps: int = setting(500, "optimizer steps to train for")
    batch_size: int = setting(16, "sequences per micro-step, shared out over all processes under torchrun")
    grad_accum: int = setting(
        1, "micro-steps per optimizer step (tokens per step = batch size x grad accum x max seq len)"
    )
    lr: float | None = setting(
        None,
        f"peak learning rate, reached at the end of warmup; fine-tuning with --init-from defaults to "
        f"{FINE_TUNING_LR:g} ({LORA_LR:g} with --lora-rank)",
    )
    min_lr: float | None = setting(
        None,
        f"learning rate at the end of the cosine decay; defaults to --lr / {FROM_SCRATCH_DECAY} (--lr / "
        f"{FINE_TUNING_DECAY} when fine-tuning)",
    )
    warmup_steps: int | None = setting(
        None,
        f"steps of linear warmup from 0 to --lr; defaults to {FROM_SCRATCH_WARMUP} ({FINE_TUNING_WARMUP} "
        f"when fine-tuning with --init-from), at most 1/{WARMUP_MAX_SHARE} of --max-steps",
    )
    optimizer: OptimizerName = setting(
        "adamw",
        "adamw: AdamW on every weight; muon: Muon (torch.optim.Muon, torch >= 2.9) on the blocks' matrices "
        "(attention, feed-forward, LoRA's A and B) at --muon-lr, AdamW at --lr on the embeddings, norms "
        "and output layer",
    )
    weight_decay: float | None = setting(
        None,
        f"AdamW weight decay, on matrices only; defaults to {FROM_SCRATCH_WEIGHT_DECAY:g} "
        f"({FINE_TUNING_WEIGHT_DECAY:g} when fine-tuning with --init-from)",
    )
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    muon_lr: float = setting(
        MUON_LR,
        "Muon's peak learning rate (--optimizer muon), on the same schedule as --lr; each matrix's is scaled "
        "by sqrt(max(1, rows / columns)) as torch.optim.Muon does",
    )
    muon_momentum: float = setting(0.95, "Muon's (Nesterov) momentum (torch's and Jordan et al.'s default)")
    muon_weight_decay: float = setting(0.0, "Muon's decoupled weight decay (multiplied by --muon-lr)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = setting(
        100,
        "steps between evaluations, each also saving a checkpoint; the last step is always evaluated and "
        "saved, so a run shorter than this still leaves best/",
    )
    eval_steps: int = setting(20, "validation batches per evaluation")
    eval_data: list[str] = setting(
        factory=list,
        help="held-out corpora (any --data source; repeatable) scored at every evaluation, logged as "
        "val_bpb/NAME beside val_bpb: the first documents of each, up to an evaluation's tokens "
        "(eval steps x batch size x max seq len), every token once (llama-mini eval's bits per byte)",
    )
    eval_tasks: str | None = setting(
        None,
        "lm-evaluation-harness tasks (comma-separated) run at every evaluation, logged as "
        "eval/TASK/METRIC; skipped with one line when lm-eval is not installed",
    )
    eval_tasks_limit: int | None = setting(None, "examples per harness task at each evaluation (none = all)")
    log_interval: int = setting(10, "steps between lines of metrics.jsonl and progress updates")
    log: list[str] = setting(
        factory=list,
        help="dashboards that get what metrics.jsonl records, repeatable or comma-separated: tensorboard "
        "(event files in OUT/tensorboard/) and wandb (Weights & Biases)",
    )
    wandb_project: str | None = setting(None, "--log wandb: the W&B project (none = WANDB_PROJECT or W&B's)")
    wandb_name: str | None = setting(None, "--log wandb: the W&B run's name (none = the --out folder's name)")
    wandb_mode: WandBMode | None = setting(
        None, "--log wandb: online, offline (`wandb sync` later) or disabled (none = WANDB_MODE or online)"
    )
    keep_last: int = setting(2, "step checkpoints to keep (besides best/)")
    seed: int = setting(1337, "seeds the weights and the data order")
    device: str = device_setting()
    dtype: DtypeName = dtype_setting()
    # Fast paths (llama_mini.ops.fast_paths): None / "auto" = the measured default for the device.
    compile: bool | None = setting(
        None,
        "torch.compile each transformer block (none = on for CUDA, and on a CPU for bf16 runs of "
        f"{CPU_COMPILE_MIN_STEPS} steps or more where a C++ compiler is installed)",
    )
    fused_adamw: bool | None = setting(None, "AdamW's fused kernel (none = on for CUDA only)")
    attention: AttentionName = setting(
        "auto", "SDPA kernel: auto (PyTorch chooses), flash, efficient, cudnn, or math (the plain one)"
    )
    swiglu_kernel: SwiGLUKernelName = setting(
        "auto", "SwiGLU activation: auto, eager (the plain one), compiled or triton (fused)"
    )
    loss_chunk_size: int | None = setting(
        None,
        "compute the output layer and loss this many tokens at a time, never holding all the logits "
        "(0 = off; none = auto, by vocabulary and batch size)",
    )
    # Parallelism and memory (llama_mini/train/parallel.py)
    parallel: ParallelName = setting(
        "ddp",
        "under torchrun: ddp (each process holds the whole model, its gradients and AdamW state) or fsdp "
        "(each holds 1/N of them, for models too large for ddp); one process trains the plain model",
    )
    activation_checkpointing: bool = setting(
        False,
        "keep only each block's input from forward to backward and recompute the rest in backward: far "
        "less activation memory for about a third more compute",
    )
    peak_tflops: float | None = setting(
        None, "the device's peak TFLOP/s for MFU (none = looked up for known GPUs)"
    )
    sample_tokens: int = setting(200, "tokens to sample at the end to show what the model learned (0 = none)")
    sample_prompt: str = setting("\n", "the prompt of that sample")
    # Fine-tuning (llama_mini/train/trainer.py; LoRA: llama_mini/ops/lora.py)
    init_from: str | None = setting(
        None,
        "fine-tune a pretrained model: a llama_mini run folder or checkpoint, a Hugging Face Llama folder "
        "or a Meta folder. Its shape, weights and tokenizer are used (no tokenizer is trained; --tokenizer "
        "replaces the checkpoint's, e.g. for a folder without one); model flags that contradict it are "
        "refused, but --max-seq-len (the training window) and --dropout may be set",
    )
    lora_rank: int = setting(
        0,
        "LoRA: freeze the --init-from model and train rank-R adapters on --lora-targets instead "
        "(0 = full fine-tuning of every weight)",
    )
    lora_alpha: float = setting(16.0, "LoRA: the adapters' update is scaled by alpha / rank")
    lora_dropout: float = setting(0.0, "LoRA: dropout on the adapters' input, in training")
    lora_targets: str = setting(
        DEFAULT_LORA_TARGETS, "LoRA: the layers to adapt, comma-separated, any of wq,wk,wv,wo,w1,w2,w3"
    )

    # Preference tuning (llama_mini/train/dpo.py; the loss: llama_mini/ops/preference.py)
    dpo: bool = setting(
        False,
        "preference tuning (DPO) of the --init-from model: read --data (.jsonl or .parquet) as pairs "
        '{"prompt", "chosen", "rejected"} (strings, or message lists rendered with the chat template) and '
        "train the model to prefer each chosen answer over the rejected one, against the starting model",
    )
    dpo_beta: float = setting(
        0.1, "DPO: beta, how far the tuned model may move from the starting one (larger = less far)"
    )
    dpo_loss: PreferenceLossName = setting(
        "sigmoid", "DPO: sigmoid (Rafailov et al. 2023) or ipo (Azar et al. 2023, length-averaged as TRL's)"
    )

    def __post_init__(self) -> None:
        self._resolve_schedule_defaults()
        problems = choice_problems(self)
        problems += self._resolve_dashboards()
        if isinstance(self.data, (list, tuple)):
            # One corpus is kept as a plain string, so its record (config.toml, checkpoints) is as it
            # always was; a mixture is a list of SOURCE[:WEIGHT].
            self.data = self.data[0] if len(self.data) == 1 else list(self.data)
        try:
            self.sources = parse_mixture(self.data)  # not a field: derived from data
        except ConfigError as error:
            problems.append(str(error))
        else:
            if len(self.sources) > 1 and self.chat:
                problems.append("--chat fine-tunes on one corpus of conversations: pass a single --data")
        positive = ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_steps", "log_interval",
                    "keep_last", "vocab_size")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_tokens"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.eval_tasks_limit is not None and self.eval_tasks_limit < 1:
            problems.append(
                f"--eval-tasks-limit must be at least 1 (or none for all), got {self.eval_tasks_limit}"
            )
        if self.data_workers is not None and self.data_workers < 1:
            problems.append(
                f"--data-workers must be at least 1 (or none for every core), got {self.data_workers}"
            )
        if not self.tokenizer_sample_mb > 0:
            problems.append(f"--tokenizer-sample-mb must be positive, got {self.tokenizer_sample_mb}")
        if not self.text_field or not self.data_split:
            problems.append("--text-field and --data-split must not be empty")
        if not 0 < self.val_fraction < 1:
            problems.append(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            problems.append(
                f"need 0 < --lr and 0 <= --min-lr <= --lr, got lr {self.lr}, min-lr {self.min_lr}"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            problems.append("--grad-clip and --weight-decay must not be negative")
        if not self.muon_lr > 0 or not 0 <= self.muon_momentum < 1 or self.muon_weight_decay < 0:
            problems.append(
                f"need --muon-lr > 0, 0 <= --muon-momentum < 1 and --muon-weight-decay >= 0, got "
                f"{self.muon_lr}, {self.muon_momentum}, {self.muon_weight_decay}"
            )
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            problems.append(f"--loss-chunk-size must not be negative (0 = off), got {self.loss_chunk_size}")
        problems += self._fine_tuning_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _resolve_schedule_defaults(self) -> None:
        """None (the default) for --lr, --min-lr, --warmup-steps, --weight-decay becomes the value for this
        kind of run: fine-tuning a pretrained model wants smaller, sooner steps than training from scratch,
        which would undo much of what it learned in the first hundred steps, and a weight decay that pulls
        its weights towards zero less; LoRA's adapters start at zero and take larger steps; a short run
        keeps its warmup short enough to leave it.

        The names so derived are kept in `derived`: `to_dict()` gives them as None, so a run's record
        (config.toml, its checkpoints) says which values the user chose, and building the settings again
        with one input changed (`--config OUT/config.toml --lr 1e-3`, `--resume --max-steps 40`) derives
        them again from the new inputs instead of keeping the old derived values as if they had been set."""
        derived = []
        if self.lr is None:
            self.lr = (LORA_LR if self.lora_rank else FINE_TUNING_LR) if self.init_from else FROM_SCRATCH_LR
            derived.append("lr")
        if self.min_lr is None and isinstance(self.lr, (int, float)):
            decay = FINE_TUNING_DECAY if self.init_from else FROM_SCRATCH_DECAY
            self.min_lr = round(self.lr / decay, 15)  # rounded: 3e-4 / 10 is 2.9999999999999997e-05 in binary
            derived.append("min_lr")
        if self.weight_decay is None:
            self.weight_decay = FINE_TUNING_WEIGHT_DECAY if self.init_from else FROM_SCRATCH_WEIGHT_DECAY
            derived.append("weight_decay")
        if self.warmup_steps is None:
            warmup = FINE_TUNING_WARMUP if self.init_from else FROM_SCRATCH_WARMUP
            if isinstance(self.max_steps, int):
                warmup = min(warmup, self.max_steps // WARMUP_MAX_SHARE)
            self.warmup_steps = warmup
            derived.append("warmup_steps")
        self.derived = tuple(derived)  # not a field: not compared, not saved as a value

    def _resolve_dashboards(self) -> list[str]:
        """--log's names, whether repeated or comma-separated, as one list in the order first given."""
        names = [name.strip() for item in self.log for name in str(item).split(",") if name.strip()]
        self.log = list(dict.fromkeys(names))
        unknown = [name for name in self.log if name not in DASHBOARDS]
        if unknown:
            return [f"--log must be one or more of {', '.join(DASHBOARDS)}, got {', '.join(unknown)}"]
        return []

    def _fine_tuning_problems(self) -> list[str]:
        problems = []
        if self.init_from is not None and self.preset is not None:
            problems.append(
                f"--preset {self.preset} and --init-from: the model's shape comes from the checkpoint; "
                "drop --preset"
            )
        if self.lora_rank < 0:
            problems.append(f"--lora-rank must not be negative (0 = full fine-tuning), got {self.lora_rank}")
        if self.dpo and self.init_from is None:
            problems.append("--dpo tunes a trained model against itself: pass --init-from with it")
        if self.dpo and self.chat:
            problems.append("--dpo reads preference pairs, --chat conversations: pass one of them")
        if not self.dpo_beta > 0:
            problems.append(f"--dpo-beta must be positive, got {self.dpo_beta}")
        if self.lora_rank > 0 and self.init_from is None:
            problems.append("--lora-rank adapts a pretrained model: pass --init-from with it")
        if not self.lora_alpha > 0:
            problems.append(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            parse_lora_targets(self.lora_targets)
        except ConfigError as error:
            problems.append(str(error))
        return problems

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict such as a saved config; unknown keys are an error naming them."""
        return from_dict(cls, values, "the training config")

    def to_dict(self) -> dict[str, Any]:
        """The settings as the user chose them: a derived value (see `_resolve_schedule_defaults`) is None,
        so `TrainConfig.from_dict` derives it again from the other values."""
        values = dataclasses.asdict(self)
        return {name: None if name in self.derived else value for name, value in values.items()}

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes`, its derived values derived again (dataclasses.replace would freeze them)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def with_derived_values(self, values: dict[str, Any]) -> TrainConfig:
        """A copy whose derived settings named in `values` take those values and stay marked derived: a
        resumed run's own (`resumed_settings`), which may predate a change of the defaults."""
        kept = copy.copy(self)
        for name, value in values.items():
            if name not in self.derived:
                raise ValueError(f"{name} is not a derived setting of this config")
            setattr(kept, name, value)
        return kept


def model_args_for(config: TrainConfig, overrides: dict[str, Any], vocab_size: int) -> ModelArgs:
    """The model's settings: the preset (if any), then `overrides` (flags, a config file); the tokenizer
    sets vocab_size."""
    base = dict(PRESETS[config.preset]) if config.preset else {}
    return ModelArgs.from_dict({**base, **overrides, "vocab_size": vocab_size})


# What each setting derived by TrainConfig._resolve_schedule_defaults is derived from. A resumed run keeps
# the values its checkpoint recorded (`resumed_settings`) unless one of these changes on resume.
DERIVED_FROM = {
    "lr": ("init_from", "lora_rank"),
    "min_lr": ("lr", "init_from"),
    "weight_decay": ("init_from",),
    "warmup_steps": ("max_steps", "init_from"),
}

# Settings a resumed run cannot change: they decide which weights exist and where they came from, which
# text the run reads (another corpus or tokenizer would silently replace the run's prepared data while its
# record still named the old one), and which optimizer state the checkpoint holds.
FIXED_ON_RESUME = ("init_from", "lora_rank", "lora_alpha", "lora_targets", "data", "text_field", "data_split",
                   "chat", "tokenizer", "vocab_size", "val_fraction", "split_seed", "dpo", "dpo_beta",
                   "dpo_loss", "optimizer")  # fmt: skip


def resumed_settings(
    saved: dict[str, Any], explicit: dict[str, Any], model_overrides: dict[str, Any], out: str
) -> tuple[TrainConfig, dict[str, Any], dict[str, tuple[Any, Any]]]:
    """The settings of a resumed run: the checkpoint's `saved` trainer_state (its "train_config" and
    "model_args"), with the training settings given explicitly (`explicit`: flags, a config file) on top.
    The model's shape cannot change, nor the FIXED_ON_RESUME settings: a setting that disagrees with the
    checkpoint is a ConfigError.

    A derived setting keeps the value the run trained with (the checkpoint's "resolved" record), so that a
    newer llama_mini with other defaults continues the run as it was; it is derived again, as in a fresh
    run, when one of its DERIVED_FROM inputs is given another value. A checkpoint written before that
    record existed has its values derived by today's rules. Returns (config, model settings, the kept values
    that today's rules would set otherwise: name -> (kept, today's))."""
    saved_model = dict(saved["model_args"])
    for name, value in model_overrides.items():
        if saved_model.get(name) != value:
            raise ConfigError(
                f"--{name.replace('_', '-')} {value} conflicts with the checkpoint's {name} "
                f"{saved_model.get(name)}: drop the flag to resume, or train into a new --out"
            )
    config = TrainConfig.from_dict({**saved["train_config"], **explicit, "out": out})
    defaults = TrainConfig()
    for name in FIXED_ON_RESUME:  # a saved config that predates one of them had its default
        before, now = saved["train_config"].get(name, getattr(defaults, name)), getattr(config, name)
        if before != now:
            raise ConfigError(
                f"--{name.replace('_', '-')} {now} differs from the resumed run's {before}: drop the flag to "
                "resume, or train into a new --out"
            )
    recorded = {name: value for name, value in saved.get("resolved", {}).items() if name in DERIVED_FROM}
    ran_with = {**saved["train_config"], **recorded}  # the values the run trained with
    kept = {
        name: recorded[name]
        for name in config.derived
        if name in recorded
        and not any(key in explicit and explicit[key] != ran_with.get(key) for key in DERIVED_FROM[name])
    }
    differences = {
        name: (value, getattr(config, name)) for name, value in kept.items() if value != getattr(config, name)
    }
    return config.with_derived_values(kept), saved_model, differences


def check_resolved_record(resolved: Any, where: Path) -> None:
    """ConfigError naming what is wrong with a checkpoint's "resolved" record (Trainer.resolved_settings)
    where a value is not one its setting takes: a damaged file is refused, not half used."""
    if not isinstance(resolved, dict):
        problems = [f"resolved must be a table, got {type(resolved).__name__}"]
    else:
        settings = {field.name for field in dataclasses.fields(TrainConfig)}
        problems = [
            f"resolved {problem}"
            for name, value in resolved.items()
            if name in settings and (problem := type_problem(TrainConfig, name, value))
        ]
        # The schedule's values are recorded as numbers: none there is no value the run trained with.
        problems += [f"resolved {name} = None must be a number" for name in DERIVED_FROM
                     if name in resolved and resolved[name] is None]  # fmt: skip
    if problems:
        raise ConfigError(
            f'{where} is damaged: {"; ".join(problems)}; remove its "resolved" entry to resume with the '
            "defaults of today"
        )


def read_run_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The [train] and [model] settings of a --config file, checked against TrainConfig and ModelArgs."""
    tables = read_config_file(path, {"train": TrainConfig, "model": ModelArgs})
    model = tables["model"]
    if "vocab_size" in model:
        raise ConfigError(
            f"--config {path}: [model] vocab_size comes from the tokenizer; set [train] vocab_size (the size "
            "of the tokenizer trained on the corpus) or [train] tokenizer instead"
        )
    return tables["train"], model


def write_run_config(
    path: str | Path, config: TrainConfig, model_args: ModelArgs, ran_with: str | None = None
) -> None:
    """OUT/config.toml: the run's resolved settings, which `train.py --config` reads back to reproduce it.
    `ran_with` says what the settings left to auto came to (the device, dtype and fast paths), in the
    header: a rerun elsewhere may choose otherwise."""
    model = model_args.to_dict()
    del model["vocab_size"]  # the tokenizer's: [train] tokenizer / vocab_size reproduce it
    header = (
        "The settings of this run. `python train.py --config THIS_FILE --out NEW_FOLDER` trains the same\n"
        "run again; flags given on the command line override the values here. Values shown as comments\n"
        "marked (derived) were not set but derived from the others, and are derived again when read."
    )
    if ran_with:
        header += (
            f"\n\nThis run trained on\n    {ran_with}.\nAnother machine or a newer llama_mini may choose "
            "otherwise for the settings left to auto\nor none: set them in [train] to keep them."
        )
    derived = {"train": {name: getattr(config, name) for name in config.derived}}
    write_config_file(path, {"train": config.to_dict(), "model": model}, header=header, derived=derived)
