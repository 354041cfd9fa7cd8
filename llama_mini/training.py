"""Training: from a corpus to checkpoints, on a CPU, one GPU, or many with torchrun (DDP).

The loop, per optimizer step:

    lr = warmup-then-cosine(step)
    for each of grad_accum micro-batches:              (gradients add up; DDP syncs only on the last)
        loss = model(x, targets=y) / grad_accum         (bf16/fp16 autocast on a GPU, float32 loss)
        loss.backward()
    clip the gradient norm, AdamW step
    every eval_interval steps: validation loss and bits per byte, checkpoint (last k + best)

Batches are a pure function of (seed, step, micro-step), so a resumed run sees exactly the data the
uninterrupted run would have: nothing about the data order needs saving.

`--batch-size` is the global number of sequences per micro-step; under DDP each of the N processes takes
its 1/N share of the same rows, so one process and N processes compute the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from llama_mini.checkpoint import load_pretrained, save_pretrained
from llama_mini.data import TokenShard, get_batch, load_documents, prepare_data, split_documents
from llama_mini.errors import ConfigError, LlamaMiniError
from llama_mini.fast_paths import (
    ATTENTION_BACKENDS,
    apply_fast_paths,
    attention_backend,
    check_attention_backend,
    choose_fast_paths,
)
from llama_mini.kernels import SWIGLU_KERNELS, check_triton_kernel
from llama_mini.model import ModelArgs, Transformer, training_flops_per_token
from llama_mini.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, train_tokenizer

TRAINING_STATE = "training_state.pt"  # optimizer, RNG states: torch.save, loaded with weights_only=True
TRAINER_STATE = "trainer_state.json"  # step, losses, the training config: plain JSON
METRICS = "metrics.jsonl"  # one JSON object per logged step and per evaluation

# Dense bf16 tensor-core peak in FLOP/s by GPU name, for MFU (model FLOPs utilisation). --peak-tflops
# overrides it for a GPU not listed here.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


class TrainingError(LlamaMiniError):
    """The run cannot go on (for example the loss became NaN); the message says what was kept."""


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every training setting; train.py's flags map one to one onto these fields (dashes for underscores)."""

    data: str = "shakespeare"  # corpus: shakespeare, tinystories, a .txt file, a folder of .txt, a .jsonl
    out: str = "out"  # run folder: checkpoints, tokenizer, prepared data, metrics
    preset: str | None = None  # model shape by name (llama_mini.presets); model flags override it
    tokenizer: str | None = None  # an existing sentencepiece tokenizer.model; None = train one on the corpus
    vocab_size: int = DEFAULT_VOCAB_SIZE  # of the tokenizer trained on the corpus
    val_fraction: float = 0.1  # share of the documents held out for validation
    split_seed: int = 1337  # chooses the validation documents; kept apart from --seed so that runs with
    # different seeds are compared on the same held-out text
    data_dir: str | None = None  # where the tokenized shards go; None = OUT/data. Runs may share one
    max_steps: int = 600
    batch_size: int = 16  # sequences per micro-step, across all processes
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-3  # peak learning rate, reached after warmup
    min_lr: float = 2e-4  # the cosine schedule's floor
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only (not norms)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_interval: int = 100  # steps between evaluations (each also saves a checkpoint)
    eval_steps: int = 20  # validation batches per evaluation
    log_interval: int = 10  # steps between metrics lines
    keep_last: int = 2  # step checkpoints kept (at least 1, to resume from) besides out/best
    seed: int = 1337
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "auto"  # auto = bf16 on GPUs that support it, else fp16 on CUDA, fp32 on CPU/MPS
    # Fast paths (llama_mini.fast_paths): None / "auto" = the measured default for the device.
    compile: bool | None = None  # torch.compile the model and its loss; None = on for CUDA only
    fused_adamw: bool | None = None  # AdamW's fused kernel; None = on for CUDA only
    attention: str = "auto"  # SDPA kernel: auto, flash, efficient, cudnn or math
    swiglu_kernel: str = "auto"  # SwiGLU activation: auto, eager, compiled or triton
    loss_chunk_size: int | None = None  # tokens per chunk of the fused output + loss; 0 = off; None = auto
    peak_tflops: float | None = None  # the device's peak, for MFU; None = look the GPU up
    sample_tokens: int = 200  # tokens sampled at the end to show what the model learned; 0 = none
    sample_prompt: str = "\n"

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_steps",
            "log_interval",
            "keep_last",
            "vocab_size",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_tokens"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            problems.append(
                f"need 0 < --lr and 0 <= --min-lr <= --lr, got lr {self.lr}, min-lr {self.min_lr}"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            problems.append("--grad-clip and --weight-decay must not be negative")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            problems.append(f"--loss-chunk-size must not be negative (0 = off), got {self.loss_chunk_size}")
        if self.attention not in ATTENTION_BACKENDS:
            choices = ", ".join(ATTENTION_BACKENDS)
            problems.append(f"--attention must be one of {choices}, got {self.attention!r}")
        if self.swiglu_kernel not in ("auto", *SWIGLU_KERNELS):
            choices = ", ".join(SWIGLU_KERNELS)
            problems.append(f"--swiglu-kernel must be auto or one of {choices}, got {self.swiglu_kernel!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.preset is not None:
            from llama_mini.presets import PRESETS

            if self.preset not in PRESETS:
                problems.append(f"unknown --preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if self.eval_interval > self.max_steps:
            problems.append(
                f"--eval-interval ({self.eval_interval}) is longer than the run "
                f"(--max-steps {self.max_steps}): lower --eval-interval so the run is evaluated "
                "and checkpointed along the way"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from `lr` down to `min_lr` at `max_steps`.

    Warmup keeps the first updates, made while Adam's moment estimates are still noisy, small.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    progress = min(progress, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) but not on vectors (norm weights, beta).

    Decaying a norm's scale toward 0 only fights the normalisation; matrices are what decay regularises.
    `fused`: the fused kernel updates all parameters in one launch instead of several per tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)


# ---------------------------------------------------------------------------------------------------------
# Devices, precision, processes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> Distributed:
    """Join the torchrun process group if torchrun started us (it sets RANK, LOCAL_RANK, WORLD_SIZE).

    NCCL moves gradients GPU to GPU; gloo is the CPU backend.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    info = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)
    uses_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if uses_cuda else "gloo")
    return info


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; under torchrun each process takes its own GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU and MPS."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, while RMSNorm, RoPE and the loss upcast to float32 themselves."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------------------


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    grad_accum: int,
    device: torch.device,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Run forward and backward on `grad_accum` micro-batches; return their mean loss.

    Each micro-batch's mean loss is divided by grad_accum, so the summed gradients equal those of one
    batch grad_accum times larger. Under DDP, `no_sync` skips the gradient all-reduce on all but the last
    micro-step: the reduction of the summed gradients happens once per optimizer step.
    """
    total = torch.zeros((), device=device)
    for micro_step, (x, y) in enumerate(micro_batches):
        last = micro_step == grad_accum - 1
        sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with autocast(device, dtype):
                loss = model(x, targets=y) / grad_accum  # the mean loss, float32
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    return total.item()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints in the run folder
# ---------------------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_step_checkpoints(out: Path) -> list[Path]:
    """Complete step checkpoints in `out`, oldest first (a folder exists only once fully written)."""
    return sorted(path for path in out.glob("step-*") if path.is_dir() and (path / TRAINER_STATE).exists())


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with `write`, then swap it in for `target` by renaming.

    A crash before the rename leaves the old `target` untouched (and a `.tmp-` folder to ignore); a crash
    between the two renames leaves the complete old folder under `.old-`. Nothing half-written ever
    carries the final name.
    """
    tmp = target.with_name(f".tmp-{target.name}")
    old = target.with_name(f".old-{target.name}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainSummary:
    step: int  # optimizer steps completed
    train_loss: float
    val_loss: float | None
    val_bpb: float | None
    best_val_loss: float | None
    tokens: int  # training tokens seen
    seconds: float
    tokens_per_second: float
    checkpoint: Path | None  # the last checkpoint written
    interrupted: bool
    sample: str | None


class Trainer:
    """Owns one run: the data, the model, the optimizer and the run folder. `run()` trains to max_steps.

    `model_overrides` are ModelArgs fields set on the command line; they apply on top of `config.preset`.
    On resume, the checkpoint's model config and training config win: only settings given explicitly in
    `resume_overrides` (such as a larger --max-steps) change, and model shape flags must agree.
    """

    def __init__(
        self,
        config: TrainConfig,
        model_overrides: dict[str, Any] | None = None,
        resume: bool = False,
        resume_overrides: dict[str, Any] | None = None,
        show_progress: bool = True,
    ):
        model_overrides = dict(model_overrides or {})
        self.out = Path(config.out)
        self.resume_from = self._find_resume_checkpoint(config) if resume else None
        if self.resume_from is not None:
            config, model_overrides = self._resumed_settings(config, model_overrides, resume_overrides or {})
        self.config = config
        self.show_progress = show_progress

        self.dist = setup_distributed(config.device)
        self.device = resolve_device(config.device, self.dist.local_rank)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.batch_size % self.dist.world_size:
            raise ConfigError(
                f"--batch-size {config.batch_size} must be divisible by the number of processes "
                f"({self.dist.world_size}): each takes an equal share of every micro-batch"
            )
        self._check_out_writable()
        # Fast-path settings that cannot run here are refused before the slow work (choose_fast_paths,
        # below, checks them again for callers of its own).
        check_attention_backend(config.attention, self.device, self.dtype)
        if config.swiglu_kernel == "triton":
            check_triton_kernel(self.device)
        if not resume and list_step_checkpoints(self.out):
            raise ConfigError(
                f"{self.out} already holds checkpoints of a run: pass --resume to continue it, "
                "or choose a new --out"
            )
        # Validate the model shape before the slow work (tokenizer, data); the vocabulary comes later.
        self._model_args(model_overrides, vocab_size=config.vocab_size or 1)

        self.tokenizer = self._prepare_tokenizer()
        self.train_data, self.val_data = self._prepare_data()
        self.model_args = self._model_args(model_overrides, vocab_size=self.tokenizer.vocab_size)
        window = self.model_args.max_seq_len + 1
        if window > min(len(self.train_data), len(self.val_data)):
            raise ConfigError(
                f"--max-seq-len {self.model_args.max_seq_len} needs windows of {window} "
                f"tokens, but the training split has {len(self.train_data)} and validation "
                f"{len(self.val_data)}: lower --max-seq-len or use a larger corpus"
            )

        self.fast_paths = choose_fast_paths(
            self.device,
            tokens_per_micro_batch=config.batch_size // self.dist.world_size * self.model_args.max_seq_len,
            vocab_size=self.model_args.vocab_size,
            dtype=self.dtype,
            compile=config.compile,
            fused_adamw=config.fused_adamw,
            attention=config.attention,
            swiglu_kernel=config.swiglu_kernel,
            loss_chunk_size=config.loss_chunk_size,
        )
        torch.manual_seed(config.seed)  # the same initial weights on every process
        self.raw_model = Transformer(self.model_args).to(self.device)
        self.model: torch.nn.Module = apply_fast_paths(self.raw_model, self.fast_paths)  # what steps call
        self.optimizer = make_optimizer(self.raw_model, config, self.fast_paths.fused_adamw)
        # fp16 has too few exponent bits for small gradients: scale the loss up, unscale before the step.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.step = 0
        self.best_val_loss: float | None = None
        self.last_checkpoint: Path | None = None  # on rank 0
        self.last_saved_step = -1  # on every rank
        if self.resume_from is not None:
            self._load_training_state(self.resume_from)

        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids)

        self.tokens_per_step = config.batch_size * config.grad_accum * self.model_args.max_seq_len
        self.flops_per_token = training_flops_per_token(self.raw_model, self.model_args.max_seq_len)
        self.peak_flops = peak_flops(self.device, config.peak_tflops)
        self.stop_requested = False
        self.stop_signal: int | None = None  # the signal that asked for the stop, if one did

    # ----------------------------------------------------------------------------------- set-up helpers

    def _find_resume_checkpoint(self, config: TrainConfig) -> Path | None:
        checkpoints = list_step_checkpoints(Path(config.out))
        if not checkpoints:
            raise ConfigError(
                f"--resume: no checkpoint in {config.out} (expected step-* folders); "
                "check --out, or drop --resume to start a new run"
            )
        return checkpoints[-1]

    def _resumed_settings(
        self, config: TrainConfig, model_overrides: dict[str, Any], explicit: dict[str, Any]
    ) -> tuple[TrainConfig, dict[str, Any]]:
        state = json.loads((self.resume_from / TRAINER_STATE).read_text())
        saved = {**state["train_config"], **explicit, "out": config.out}
        saved_model = state["model_args"]
        for name, value in model_overrides.items():
            if saved_model.get(name) != value:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {value} conflicts with the checkpoint's {name} "
                    f"{saved_model.get(name)}: drop the flag to resume, or train into a new --out"
                )
        return TrainConfig.from_dict(saved), saved_model

    def _check_out_writable(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{self.dist.rank}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"cannot write to --out {self.out}: {error.strerror}; choose a writable folder"
            ) from error

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

    def _prepare_tokenizer(self) -> Tokenizer:
        """The tokenizer: --tokenizer if given, the run's own when resuming, else trained on the corpus."""
        config = self.config
        run_tokenizer = self.out / "tokenizer.model"
        if self.resume_from is not None and run_tokenizer.exists():
            return Tokenizer(run_tokenizer)
        if config.tokenizer is not None:
            source = Path(config.tokenizer)
            tokenizer = Tokenizer(source)  # validates the file before anything is copied
            if self.dist.is_main and source.resolve() != run_tokenizer.resolve():
                shutil.copyfile(source, run_tokenizer)
            self._barrier()
            return tokenizer
        if self.dist.is_main:
            documents = load_documents(config.data)
            train_documents, _ = split_documents(documents, config.val_fraction, config.split_seed)
            train_tokenizer(train_documents, run_tokenizer, config.vocab_size)
        self._barrier()
        return Tokenizer(run_tokenizer)

    def _prepare_data(self) -> tuple[TokenShard, TokenShard]:
        data_dir = Path(self.config.data_dir) if self.config.data_dir else self.out / "data"
        if self.dist.is_main:  # reuses shards already there when corpus, split and tokenizer match
            prepare_data(
                self.config.data, data_dir, self.tokenizer, self.config.val_fraction, self.config.split_seed
            )
        self._barrier()
        return TokenShard(data_dir / "train.bin"), TokenShard(data_dir / "val.bin")

    def _model_args(self, overrides: dict[str, Any], vocab_size: int) -> ModelArgs:
        """The preset (if any), then the command line's model flags; the tokenizer sets vocab_size."""
        from llama_mini.presets import PRESETS

        base = dict(PRESETS[self.config.preset]) if self.config.preset else {}
        return ModelArgs.from_dict({**base, **overrides, "vocab_size": vocab_size})

    # ----------------------------------------------------------------------------------- the loop

    def batches(self, shard: TokenShard, step: int, count: int, stream: int) -> Iterator[tuple]:
        """`count` micro-batches for `step`; `stream` separates training (0) from validation (1) draws."""
        per_process = self.config.batch_size // self.dist.world_size
        for micro_step in range(count):
            index = (step * count + micro_step) * 2 + stream  # a distinct, reproducible draw for each
            yield get_batch(
                shard,
                per_process,
                self.model_args.max_seq_len,
                step=index,
                seed=self.config.seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                device=self.device,
            )

    def train_step(self, step: int) -> float:
        """One optimizer step; returns the mean training loss (a non-finite loss skips the update)."""
        lr = learning_rate(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with attention_backend(self.fast_paths.attention):
            loss = accumulate_gradients(
                self.model,
                self.batches(self.train_data, step, self.config.grad_accum, stream=0),
                self.config.grad_accum,
                self.device,
                self.dtype,
                self.scaler,
            )
        loss = self._mean_over_processes(loss)
        if not math.isfinite(loss):  # leave the weights as they were: the caller stops the run
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per token) over eval_steps fixed batches, and bits per byte.

        Bits per byte = loss * (tokens / bytes) / ln 2: the cost of the text itself, comparable across
        tokenizers (a model with a bigger vocabulary has a higher loss per token but fewer tokens).
        The same batches are drawn at every evaluation, so evaluations are comparable with each other.
        """
        self.model.eval()
        total = 0.0
        for x, y in self.batches(self.val_data, 0, self.config.eval_steps, stream=1):
            with autocast(self.device, self.dtype), attention_backend(self.fast_paths.attention):
                total += self.model(x, targets=y).item()
        val_loss = self._mean_over_processes(total / self.config.eval_steps)
        meta = self.val_data.meta
        bits_per_byte = val_loss * meta.tokens / meta.bytes / math.log(2)
        return {"val_loss": val_loss, "val_bpb": bits_per_byte}

    def _mean_over_processes(self, value: float) -> float:
        if not self.dist.enabled:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)  # a sum (gloo has no average)
        return tensor.item() / self.dist.world_size

    def _stop_everywhere(self) -> bool:
        """True if any process was asked to stop (Ctrl-C or SIGTERM), so all processes stop together."""
        if not self.dist.enabled:
            return self.stop_requested
        flag = torch.tensor(int(self.stop_requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @contextmanager
    def _stop_on_signals(self):
        """The first Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second
        Ctrl-C stops at once."""

        def request_stop(signum, frame):
            self.stop_requested = True
            self.stop_signal = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> TrainSummary:
        config = self.config
        start_step, started = self.step, time.perf_counter()
        metrics_log = MetricsLog(self.out / METRICS, enabled=self.dist.is_main, after_step=start_step)
        progress = Progress(config.max_steps, start_step, enabled=self.show_progress and self.dist.is_main)
        train_loss, evaluation, interrupted = float("nan"), None, False
        window_start, window_tokens = time.perf_counter(), 0
        progress.write(f"fast paths: {self.fast_paths.describe()} (train.py --help tells how to switch)")
        with self._stop_on_signals():
            while self.step < config.max_steps:
                loss = self.train_step(self.step)
                if not math.isfinite(loss):
                    kept = (
                        f"the last good checkpoint is {self.last_checkpoint}"
                        if self.last_checkpoint
                        else "no checkpoint was saved yet"
                    )
                    raise TrainingError(
                        f"loss became {loss} at step {self.step + 1}; {kept}. Lower --lr (now {config.lr}), "
                        "raise --warmup-steps, or train in --dtype fp32"
                    )
                self.step += 1
                train_loss, window_tokens = loss, window_tokens + self.tokens_per_step
                if self.step % config.log_interval == 0 or self.step == config.max_steps:
                    self._synchronize()
                    seconds = time.perf_counter() - window_start
                    record = self._train_record(loss, window_tokens / seconds)
                    metrics_log.write(record)
                    progress.update_postfix(record)
                    window_start, window_tokens = time.perf_counter(), 0
                progress.advance()
                if self.step % config.eval_interval == 0 or self.step == config.max_steps:
                    eval_started = time.perf_counter()
                    evaluation = self.evaluate()
                    metrics_log.write(
                        {"type": "eval", "step": self.step, "tokens": self.tokens_seen, **evaluation}
                    )
                    progress.write(
                        f"step {self.step}: val loss {evaluation['val_loss']:.4f}, "
                        f"{evaluation['val_bpb']:.4f} bits/byte"
                    )
                    self.save_checkpoint(evaluation["val_loss"], train_loss)
                    # tokens/s measures training: leave the evaluation and the save out of the window
                    window_start += time.perf_counter() - eval_started
                if self._stop_everywhere():
                    interrupted = True
                    break
        if interrupted and self.last_saved_step != self.step:
            self.save_checkpoint(None, train_loss)
        progress.close()
        seconds = time.perf_counter() - started
        tokens = (self.step - start_step) * self.tokens_per_step
        sample = None
        if config.sample_tokens and not interrupted and self.dist.is_main:
            sample = self.sample(config.sample_prompt, config.sample_tokens)
        self._barrier()
        return TrainSummary(
            step=self.step,
            train_loss=train_loss,
            val_loss=evaluation["val_loss"] if evaluation else None,
            val_bpb=evaluation["val_bpb"] if evaluation else None,
            best_val_loss=self.best_val_loss,
            tokens=tokens,
            seconds=seconds,
            tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
            checkpoint=self.last_checkpoint,
            interrupted=interrupted,
            sample=sample,
        )

    @property
    def tokens_seen(self) -> int:
        return self.step * self.tokens_per_step

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _train_record(self, loss: float, tokens_per_second: float) -> dict[str, Any]:
        record = {
            "type": "train",
            "step": self.step,
            "tokens": self.tokens_seen,
            "loss": loss,
            "lr": learning_rate(self.step - 1, self.config),
            "tokens_per_second": tokens_per_second,
        }
        if self.peak_flops:
            # MFU: the FLOPs the model needs per second at this speed, over what the GPUs could do.
            record["mfu"] = (
                tokens_per_second * self.flops_per_token / (self.peak_flops * self.dist.world_size)
            )
        return record

    # ----------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, val_loss: float | None, train_loss: float) -> None:
        """Write out/step-NNNNNNN (weights, config, tokenizer, optimizer and RNG state), keep the last
        `keep_last`, and copy it to out/best when its validation loss is the best so far."""
        is_best = val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss)
        if is_best:
            self.best_val_loss = val_loss
        if self.dist.is_main:
            target = self.out / step_dir_name(self.step)
            write_folder_atomically(
                target, lambda folder: self._write_checkpoint(folder, val_loss, train_loss)
            )
            if is_best:
                write_folder_atomically(self.out / "best", lambda folder: _link_files(target, folder))
            for old in list_step_checkpoints(self.out)[: -self.config.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            self.last_checkpoint = target
        self.last_saved_step = self.step
        self._barrier()

    def _write_checkpoint(self, folder: Path, val_loss: float | None, train_loss: float) -> None:
        save_pretrained(self.raw_model, folder, tokenizer_path=self.tokenizer.model_path)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "cpu_rng_state": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, folder / TRAINING_STATE)
        trainer_state = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": self.best_val_loss,
            "train_config": dataclasses.asdict(self.config),
            "model_args": self.model_args.to_dict(),
        }
        # written last: list_step_checkpoints treats a folder with this file as complete
        (folder / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))

    def _load_training_state(self, folder: Path) -> None:
        saved = load_pretrained(folder, device=self.device)
        self.raw_model.load_state_dict(saved.state_dict())
        del saved
        # weights_only=True: the file holds tensors, numbers and strings only; no pickled code can run.
        state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["cpu_rng_state"])
        if "cuda_rng_state" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng_state"], self.device)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        trainer_state = json.loads((folder / TRAINER_STATE).read_text())
        self.step = trainer_state["step"]
        self.best_val_loss = trainer_state["best_val_loss"]
        self.last_checkpoint = folder
        self.last_saved_step = self.step

    # ----------------------------------------------------------------------------------- sample

    @torch.no_grad()
    def sample(self, prompt: str, max_new_tokens: int) -> str:
        from llama_mini.generation import generate

        self.raw_model.eval()
        ids = self.tokenizer.encode(prompt, bos=True)
        room = self.model_args.max_seq_len - len(ids)
        new = generate(
            self.raw_model,
            [ids],
            max_new_tokens=min(max_new_tokens, room),
            temperature=0.8,
            top_k=50,
            eos_id=self.tokenizer.eos_id,
            seed=self.config.seed,
        )[0]
        self.raw_model.clear_cache()
        return self.tokenizer.decode(ids[1:] + new)


def _link_files(source: Path, target: Path) -> None:
    """Hard-link (or, across file systems, copy) every file of `source` into `target`.

    Checkpoint files are never modified after they are written, so sharing them is safe and costs no space.
    """
    for path in source.iterdir():
        if path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copyfile(path, target / path.name)


# ---------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends one JSON object per line to out/metrics.jsonl (rank 0 only).

    On resume, lines logged after the checkpoint's step are dropped first: the resumed run logs those
    steps again, and the file then reads as one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, after_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps({**record, "time": time.time()}) + "\n")


class Progress:
    """A tqdm bar over the steps (or nothing, on other ranks and in tests)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def update_postfix(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            postfix = {
                "loss": f"{record['loss']:.3f}",
                "lr": f"{record['lr']:.1e}",
                "tok/s": f"{record['tokens_per_second']:,.0f}",
            }
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
