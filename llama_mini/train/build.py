"""Setting a run up: everything the training loop needs, built once, in the order each part depends on.

    settings   the run's TrainConfig and model settings, final from here on: a resumed run's own, with
               the flags it may change on top; a new fine-tuning run's shape and tokenizer from --init-from
    place      the torchrun process group, the device, the dtype, single process / DDP / FSDP
    checks     everything that can be refused before the slow work (the tokenizer, the data)
    data       the tokenizer and the token shards (data_feed.py), the model's shape, --eval-data's corpora
    model      random, --init-from's, or LoRA's frozen base with adapters; the fast paths and parallelism
               applied to it (ops/fast_paths.py, parallel.py); the optimizer of its trainable parameters

`build_run` returns a `Run` holding them; `Trainer` (trainer.py) runs it. Each step is a function of what
the steps before it returned, so nothing is decided twice and no line depends on an attribute an earlier
line happened to set.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama_mini.data.mixture import MixedSplits
from llama_mini.data.sources import open_source
from llama_mini.errors import ConfigError, DataError
from llama_mini.files import check_output_path
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.ops.fast_paths import (
    FastPaths,
    apply_fast_paths,
    check_attention_backend,
    check_cpu_instruction_sets,
    choose_fast_paths,
    compiles_by_default,
    cpu_compile_works,
)
from llama_mini.ops.kernels import check_triton_kernel
from llama_mini.ops.lora import LoRASettings
from llama_mini.runtime import DTYPE_NAMES, Distributed, resolve_device, resolve_dtype, setup_distributed
from llama_mini.tokenizer import Tokenizer
from llama_mini.train.config import TrainConfig, check_resolved_record, model_args_for, resumed_settings
from llama_mini.train.data_feed import prepare_shards, prepare_tokenizer
from llama_mini.train.dpo import preference_objective
from llama_mini.train.held_out import HeldOutCorpus, read_held_out
from llama_mini.train.initial_model import (
    LORA_BASE,
    build_model,
    lora_from_config,
    resolve_init_from,
    skeleton,
)
from llama_mini.train.optim import check_optimizer, make_optimizer
from llama_mini.train.parallel import checkpoint_activations, materialize, parallel_mode, shard
from llama_mini.train.run_folder import TRAINER_STATE, RunFolder
from llama_mini.train.tracking import check_dashboards_installed

__all__ = ["Run", "RunSettings", "build_run", "resolve_settings"]


@dataclass(frozen=True)
class RunSettings:
    """What a run is, decided once: its settings and where its weights come from."""

    config: TrainConfig  # final: a resumed run's own (plus the flags it may change), --init-from's tokenizer
    model_overrides: dict[str, Any]  # ModelArgs fields on top of config.preset
    resume_from: Path | None  # the checkpoint a resumed run continues from
    init_folder: Path | None  # the checkpoint a new fine-tuning run starts from
    lora: LoRASettings | None  # None: every weight trains
    # A resumed run's checkpoint record of what its settings resolved to (Trainer.resolved_settings);
    # empty for a new run, and for a checkpoint written before that record existed.
    resolved_before: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Derived settings kept at the resumed run's values where today's rules differ: name -> (kept, today's).
    kept_derived: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)


@dataclass
class Run:
    """Everything the training loop works with (see the module docstring for what each part is)."""

    settings: RunSettings
    run_folder: RunFolder
    dist: Distributed
    device: torch.device
    dtype: torch.dtype
    parallel: str  # "single", "ddp" or "fsdp"
    tokenizer: Tokenizer
    train_data: Any  # TokenSplit
    val_data: Any
    held_out: list[HeldOutCorpus]  # --eval-data's corpora
    model_args: ModelArgs
    fast_paths: FastPaths
    raw_model: Transformer  # what is saved and loaded
    loss_module: nn.Module  # what the steps call: the model inside the loss, compiled, sharded
    optimizer: torch.optim.Optimizer

    @property
    def config(self) -> TrainConfig:
        return self.settings.config


def build_run(
    config: TrainConfig,
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    resume_overrides: dict[str, Any] | None = None,
) -> Run:
    """Set a run up (see the module docstring). `model_overrides` are ModelArgs fields set on the command
    line or in a config file; on resume only the training settings in `resume_overrides` may change."""
    run_folder = RunFolder(config.out)
    settings = resolve_settings(config, model_overrides or {}, run_folder, resume, resume_overrides or {})
    config = settings.config
    dist = setup_distributed(config.device)
    run_folder.dist = dist
    device = resolve_device(config.device, dist.local_rank)
    own = own_choices(config, settings.resolved_before, device, given=resume_overrides or {})
    dtype = resolve_dtype(own.get("dtype", config.dtype), device, training=True)
    parallel = parallel_mode(config.parallel, dist.world_size)
    try:
        return _build(settings, run_folder, dist, device, dtype, parallel, own)
    except BaseException:  # refused, failed or interrupted before training: the folder is free again
        if dist.is_main:
            run_folder.unlock()
        raise


def _build(
    settings: RunSettings,
    run_folder: RunFolder,
    dist: Distributed,
    device: torch.device,
    dtype: torch.dtype,
    parallel: str,
    own: dict[str, Any],
) -> Run:
    """build_run's steps from the checks on, once the settings and the place are known; `own` holds a
    resumed run's own choices for the settings it leaves to auto (`own_choices`)."""
    config = settings.config
    check_before_slow_work(settings, run_folder, dist, device, dtype, parallel)

    compile_setting = own.get("compile", config.compile)
    compiling = (
        compiles_by_default(device, dtype, config.max_steps) if compile_setting is None else compile_setting
    )
    if compiling and device.type == "cpu":
        check_cpu_instruction_sets()  # inductor's first question, answered while the data are prepared

    resuming = settings.resume_from is not None
    tokenizer = prepare_tokenizer(config, run_folder.out, dist, resuming=resuming)
    train_data, val_data = prepare_shards(config, run_folder.out, tokenizer, dist)
    # The vocabulary is the tokenizer's, or when fine-tuning the checkpoint's (it may be padded past it).
    vocab_size = settings.model_overrides["vocab_size"] if config.init_from else tokenizer.vocab_size
    model_args = model_args_for(config, settings.model_overrides, vocab_size)
    if not config.dpo:  # preference rows are padded and truncated to the context: any length fits
        check_data_fits_the_context(model_args, train_data, val_data)
    # held-out corpora (--eval-data): as many tokens of each as one evaluation of the run's own split reads
    held_out = read_held_out(
        config, tokenizer, config.eval_steps * config.batch_size * model_args.max_seq_len
    )

    choose = functools.partial(
        choose_fast_paths,
        device,
        tokens_per_micro_batch=config.batch_size // dist.world_size * model_args.max_seq_len,
        vocab_size=model_args.vocab_size,
        attention=config.attention,
        steps=config.max_steps,
    )
    fast_paths = choose(
        dtype=dtype,
        compile=compiling,
        fused_adamw=own.get("fused_adamw", config.fused_adamw),
        swiglu_kernel=own.get("swiglu_kernel", config.swiglu_kernel),
        loss_chunk_size=own.get("loss_chunk_size", config.loss_chunk_size),
    )
    if settings.resume_from is not None and dist.is_main:
        say_what_the_resume_keeps(settings, device, dtype, fast_paths, choose)
    torch.manual_seed(config.seed)  # the same initial weights on every process, and as one process
    starting_model = StartingModel(settings, model_args, run_folder.out / LORA_BASE, tokenizer, dist)
    if parallel == "fsdp":
        raw_model, loss_module = build_sharded_model(starting_model, fast_paths, device, dtype, dist)
    else:
        raw_model = starting_model.build(device)
        loss_module = training_module(
            raw_model, fast_paths, config.activation_checkpointing, objective=preference_objective(config)
        )
    optimizer = make_optimizer(raw_model, config, fast_paths.fused_adamw)
    return Run(
        settings, run_folder, dist, device, dtype, parallel, tokenizer, train_data, val_data, held_out,
        model_args, fast_paths, raw_model, loss_module, optimizer,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Settings and checks
# ---------------------------------------------------------------------------------------------------------


def resolve_settings(
    config: TrainConfig,
    model_overrides: dict[str, Any],
    run_folder: RunFolder,
    resume: bool,
    resume_overrides: dict[str, Any],
) -> RunSettings:
    """The run's final settings. Resuming: the checkpoint's settings win, and only the training settings in
    `resume_overrides` (such as a larger --max-steps) change; model settings must agree. A new run with
    --init-from takes its model's shape and tokenizer from that checkpoint (its checkpoint has them all on
    resume), and `model_overrides` may only agree with it (or set ADJUSTABLE_WHEN_FINE_TUNING)."""
    resume_from, resolved_before, kept_derived = None, {}, {}
    if resume:
        resume_from = run_folder.latest_checkpoint()
        if resume_from is None:
            raise ConfigError(
                f"--resume: no checkpoint in {run_folder.out} (expected step-* folders); "
                "check --out, or drop --resume to start a new run"
            )
        saved = RunFolder.read_trainer_state(resume_from)
        resolved_before = saved.get("resolved", {})  # absent in checkpoints written before the record
        check_resolved_record(resolved_before, resume_from / TRAINER_STATE)
        config, model_overrides, kept_derived = resumed_settings(
            saved, resume_overrides, model_overrides, config.out
        )
    lora = lora_from_config(config)
    init_folder = None
    if config.init_from is not None and resume_from is None:
        init_folder, config, model_overrides = resolve_init_from(config, model_overrides, lora)
    return RunSettings(
        config, dict(model_overrides), resume_from, init_folder, lora, resolved_before, kept_derived
    )


# The settings whose default ("auto", None) a run resolves by the machine it runs on (runtime.py's
# resolve_dtype, fast_paths.choose_fast_paths). A resumed run keeps what they resolved to when it started,
# as recorded in its checkpoint, so a newer llama_mini whose defaults differ continues it as it was.
OWN_ON_RESUME = ("dtype", "compile", "fused_adamw", "swiglu_kernel", "loss_chunk_size")


def own_choices(
    config: TrainConfig,
    resolved_before: dict[str, Any],
    device: torch.device,
    given: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A resumed run's own choices for the OWN_ON_RESUME settings it leaves to their defaults and the resume
    does not set (`given`: its flags and config file; `--dtype auto` there asks for today's choice), from
    its checkpoint's record: kept when the run continues on the same kind of device (a run moved from a
    GPU to a CPU takes the CPU's defaults) and the choice can run here (bf16 on a CUDA GPU without it, or
    compiling on a CPU without a C++ compiler, are decided again)."""
    if resolved_before.get("device") != device.type:
        return {}
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    own = {
        name: resolved_before[name]
        for name in OWN_ON_RESUME
        if name in resolved_before and name not in (given or {}) and getattr(config, name) == defaults[name]
    }
    if device.type == "cuda" and own.get("dtype") == "bf16" and not torch.cuda.is_bf16_supported():
        del own["dtype"]
    if device.type == "cpu" and own.get("compile") and not cpu_compile_works():
        del own["compile"]
    return own


def say_what_the_resume_keeps(
    settings: RunSettings,
    device: torch.device,
    dtype: torch.dtype,
    fast_paths: FastPaths,
    choose: Callable[..., FastPaths],
) -> None:
    """One line on stderr naming the settings a resumed run keeps (`settings.kept_derived`, `own_choices`)
    where a new run with its settings would choose otherwise here; nothing when none differ. `choose` is
    choose_fast_paths with the run's other arguments bound."""
    config = settings.config
    new_dtype = resolve_dtype(config.dtype, device, training=True)
    new = choose(
        dtype=new_dtype,
        compile=config.compile,
        fused_adamw=config.fused_adamw,
        swiglu_kernel=config.swiglu_kernel,
        loss_chunk_size=config.loss_chunk_size,
    )
    kept = dict(settings.kept_derived)
    if dtype != new_dtype:
        kept["dtype"] = (DTYPE_NAMES[dtype], DTYPE_NAMES[new_dtype])
    for field in dataclasses.fields(FastPaths):
        own, other = getattr(fast_paths, field.name), getattr(new, field.name)
        if own != other:
            kept[field.name] = (own, other)
    if kept:
        print(describe_kept(kept), file=sys.stderr)


def describe_kept(kept: dict[str, tuple[Any, Any]]) -> str:
    """One line naming the settings a resumed run keeps where a new run here would choose otherwise."""

    def spoken(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return f"{value:g}" if isinstance(value, float) else str(value)

    listed = ", ".join(
        f"--{name.replace('_', '-')} {spoken(own)} (a new run here: {spoken(new)})"
        for name, (own, new) in kept.items()
    )
    return f"resuming with the run's own {listed}; pass a flag to change one"


def check_before_slow_work(
    settings: RunSettings,
    run_folder: RunFolder,
    dist: Distributed,
    device: torch.device,
    dtype: torch.dtype,
    parallel: str,
) -> None:
    """Everything that can be refused before the tokenizer and the data are prepared."""
    config, resume_from = settings.config, settings.resume_from
    if config.batch_size % dist.world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} must be divisible by the number of processes "
            f"({dist.world_size}): each takes an equal share of every micro-batch"
        )
    run_folder.check_writable(dist.rank)
    # One run per folder: the main process takes the lock, and every process learns whether it got it.
    refused = run_folder.lock() if dist.is_main else None
    if dist.any(refused is not None, device):
        raise ConfigError(refused or f"--out {run_folder.out} is in use by another run")
    if dist.is_main and (leftovers := run_folder.remove_leftovers()):
        print(f"removed what a stopped run left half-written in {run_folder.out}: {', '.join(leftovers)}",
              file=sys.stderr)  # fmt: skip
    if config.data_dir is not None:
        check_output_path(config.data_dir, "--data-dir")
    if parallel == "fsdp" and dtype == torch.float16:
        raise ConfigError(
            "--parallel fsdp trains in bf16 or fp32: fp16's loss scaling is not supported on sharded "
            "gradients here; pass --dtype bf16 (or fp32), or --parallel ddp"
        )
    # A checkpoint of a newer format than this llama_mini reads is refused here (checkpoint_format raises).
    saved_format = RunFolder.checkpoint_format(resume_from) if resume_from is not None else None
    if parallel == "fsdp" and saved_format == 1:
        raise ConfigError(
            f"{resume_from} has no sharded state (checkpoint format 1), which resumes alone or with "
            "--parallel ddp; resume it that way until its next checkpoint, then with fsdp"
        )
    check_dashboards_installed(config.log)  # --log's libraries, imported when the run starts
    check_optimizer(config)
    # The fast paths' own settings (choose_fast_paths accepts them later, after the data are prepared).
    check_attention_backend(config.attention, device, dtype)
    if config.swiglu_kernel == "triton":
        check_triton_kernel(device)
    if resume_from is None and run_folder.checkpoints():
        raise ConfigError(
            f"{run_folder.out} already holds checkpoints of a run: pass --resume to continue it, "
            "or choose a new --out"
        )
    for spec in config.eval_data:  # a held-out corpus that cannot be read is refused now, not after the data
        try:
            open_source(spec, text_field=config.text_field, data_split=config.data_split, chat=False)
        except DataError as error:
            raise DataError(f"--eval-data: {str(error).replace('--data', '--eval-data')}") from None
    # The shape's own checks, with a stand-in vocabulary (the real one is the tokenizer's, known later).
    model_args_for(config, settings.model_overrides, vocab_size=config.vocab_size or 1)


def check_data_fits_the_context(model_args: ModelArgs, train_data, val_data) -> None:
    if isinstance(train_data, MixedSplits):  # each source of a mixture, on its own
        for source, train, val in zip(train_data.sources, train_data.splits, val_data.splits, strict=True):
            try:
                check_data_fits_the_context(model_args, train, val)
            except ConfigError as error:
                raise ConfigError(f"--data {source.spec}: {error}") from None
        return
    window = model_args.max_seq_len + 1
    if val_data.chat is not None:  # chat rows start at conversations and are padded: any length fits
        return
    if window > min(len(train_data), len(val_data)):
        raise ConfigError(
            f"--max-seq-len {model_args.max_seq_len} needs windows of {window} "
            f"tokens, but the training split has {len(train_data)} and validation "
            f"{len(val_data)}: lower --max-seq-len or use a larger corpus"
        )


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StartingModel:
    """The model a run starts from, built on a given device (initial_model.build_model)."""

    settings: RunSettings
    model_args: ModelArgs
    base_folder: Path  # OUT/base: a LoRA run's frozen base model
    tokenizer: Tokenizer
    dist: Distributed

    def build(self, device: torch.device) -> Transformer:
        """Random, --init-from's, or LoRA's base with fresh adapters, on `device`."""
        return build_model(
            self.model_args,
            device,
            self.settings.lora,
            init_folder=self.settings.init_folder,
            base_folder=self.base_folder,
            resuming=self.settings.resume_from is not None,
            write_base=self.dist.is_main,
            tokenizer_path=self.tokenizer.model_path,
        )


def training_module(
    model: Transformer,
    fast_paths: FastPaths,
    activation_checkpointing: bool,
    objective: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """`model` as training calls it: activation checkpointing if asked, then the fast paths, which compile
    its blocks if asked and wrap it in the loss (NextTokenLoss, or `objective`'s for preference tuning)."""
    if activation_checkpointing:
        checkpoint_activations(model)
    return apply_fast_paths(model, fast_paths, objective)


def build_sharded_model(
    starting_model: StartingModel,
    fast_paths: FastPaths,
    device: torch.device,
    dtype: torch.dtype,
    dist: Distributed,
) -> tuple[Transformer, nn.Module]:
    """FSDP: (the model, the sharded loss module around it), each process holding its pieces only.

    Every process builds the model on the meta device and shards it (parallel.py); only the main process
    builds the whole initial model, on the CPU, exactly as one process would (the same random draws,
    --init-from's weights, or LoRA's base and fresh adapters), and broadcasts it, each process keeping its
    pieces. A resumed full-training run skips that: its checkpoint holds every weight. With --compile,
    each block is compiled (as without FSDP) before it is sharded.
    """
    settings = starting_model.settings
    needs_initial_weights = settings.resume_from is None or settings.lora is not None
    initial = None
    if needs_initial_weights and dist.is_main:
        initial = starting_model.build(torch.device("cpu")).state_dict()
    model = skeleton(starting_model.model_args, settings.lora)
    loss_module = training_module(
        model, fast_paths, settings.config.activation_checkpointing, preference_objective(settings.config)
    )
    shard(loss_module, model, device, dist.world_size, dtype)
    if needs_initial_weights:
        materialize(loss_module, model, device, initial)
    else:
        loss_module.to_empty(device=device)
    del initial
    dist.share_main_rng_state(device)  # the others drew nothing while building on meta
    return model, loss_module
