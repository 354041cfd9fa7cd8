"""The training loop, on a CPU, one GPU, or many with torchrun (DDP or FSDP).

Per optimizer step:

    lr = warmup-then-cosine(step)
    for each of grad_accum micro-batches:              (gradients add up; DDP syncs only on the last)
        loss = loss_module(x, y) / grad_accum          (bf16/fp16 autocast on a GPU, float32 loss)
        loss.backward()
    clip the gradient norm, AdamW step
    every eval_interval steps and at the last: validation loss and bits per byte, checkpoint (last k + best)

The Trainer runs the loop over a run that build.py's `build_run` sets up from the rooms of llama_mini.train:

    build.py       the run's parts, built once in the order they depend on each other
    config.py      the settings, and how a resumed run's settings are merged
    runtime        the device, the dtype, the torchrun process group (llama_mini/runtime.py)
    data_feed.py   the tokenizer, the token shards, the batches of each step
    initial_model.py  the model a run starts from: random, --init-from's, LoRA's frozen base + adapters
    run_folder.py  checkpoints, best/, rotation, resume state, metrics.jsonl, config.toml
    sharded_state.py  the trainable weights and AdamW state in checkpoints, one file per process (DCP)
    parallel.py    DDP, FSDP and activation checkpointing, applied to the built model
    progress.py    the progress bar on a terminal, plain lines in a file
    tracking.py    TensorBoard and W&B (--log), fed the records of metrics.jsonl
    optim.py       AdamW or Muon with AdamW, and the learning-rate schedule
    dpo.py         preference tuning (--dpo): pairs, the reference log-probs, the preference step
    ops/           the training loss and the fast paths applied to the model (llama_mini/ops), and LoRA

Fine-tuning (--init-from) starts from a pretrained checkpoint instead of random weights: its shape, weights
and tokenizer. With LoRA (--lora-rank) its weights stay frozen and only the adapters train
(llama_mini/ops/lora.py); the run folder then keeps the frozen base once, in OUT/base/, and every
checkpoint holds the fine-tuned model with the adapters merged (what generate.py, convert and
transformers read) plus the adapter itself in PEFT's format in adapter/ (what resume and PEFT read).

`--batch-size` is the global number of sequences per micro-step; under DDP or FSDP each of the N processes
takes its 1/N share of the same rows, so one process and N processes compute the same steps, and a run
saved by N processes resumes with M (the checkpoint's sharded state is resharded as it loads).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from llama_mini.checkpoint import assign_weights, load_model, save_pretrained
from llama_mini.checkpoint.peft import ADAPTER_FOLDER, load_adapter, merged_model, save_adapter
from llama_mini.data import TokenSplit
from llama_mini.data.mixture import MixedSplits, rows_per_source, source_of_rows
from llama_mini.errors import LlamaMiniError
from llama_mini.eval import INSTALL_EVAL
from llama_mini.generation import SamplingConfig, generate
from llama_mini.model.sizes import training_flops_per_token
from llama_mini.model.transformer import Transformer
from llama_mini.ops.fast_paths import attention_backend
from llama_mini.ops.lora import trainable_parameters
from llama_mini.runtime import DTYPE_NAMES, autocast, clock, peak_flops, peak_memory_bytes
from llama_mini.tokenizer.chat import chat_stop_ids, encode_chat
from llama_mini.train.build import build_run
from llama_mini.train.config import DERIVED_FROM, TrainConfig, write_run_config
from llama_mini.train.data_feed import batches
from llama_mini.train.dpo import (
    accumulate_preference_gradients,
    evaluate_preferences,
    pair_batches,
    reference_log_probs,
)
from llama_mini.train.held_out import run_harness_tasks, score_held_out
from llama_mini.train.initial_model import LORA_BASE, skeleton
from llama_mini.train.optim import learning_rate, set_learning_rates
from llama_mini.train.parallel import gather_full_state_dict, replicate, unsharded
from llama_mini.train.progress import Progress
from llama_mini.train.run_folder import METRICS, RUN_CONFIG, SHARDED_STATE, MetricsLog, RunFolder
from llama_mini.train.sharded_state import load_sharded_state, save_sharded_state
from llama_mini.train.tracking import Dashboards

# seconds after a first stop signal in which a repeat is torchrun passing it on (see _stop_on_signals)
LAUNCHER_ECHO_S = 5.0

__all__ = ["TrainSummary", "Trainer", "TrainingError", "accumulate_gradients"]


class TrainingError(LlamaMiniError):
    """The run cannot go on (for example the loss became NaN); the message says what was kept."""


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
    trainable_parameters: int = 0  # what the optimizer updates (LoRA: the adapters only)


def accumulate_gradients(
    loss_module: torch.nn.Module,
    micro_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    grad_accum: int,
    device: torch.device,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Run forward and backward on `grad_accum` micro-batches; return their mean loss.

    Each micro-batch's mean loss is divided by grad_accum, so the summed gradients equal those of one
    batch grad_accum times larger. Under DDP, `no_sync` skips the gradient all-reduce on all but the last
    micro-step: the reduction of the summed gradients happens once per optimizer step. Under FSDP every
    micro-step reduce-scatters its gradients and each process adds its piece to its sharded gradient:
    skipping it would keep every block's whole gradient until the last micro-step, the memory FSDP saves.
    """
    total = None  # summed in the loss's own dtype: float32, or float64 for a float64 model
    for micro_step, (x, y) in enumerate(micro_batches):
        last = micro_step == grad_accum - 1
        ddp = isinstance(loss_module, DistributedDataParallel)
        with nullcontext() if last or not ddp else loss_module.no_sync():
            with autocast(device, dtype):
                loss = loss_module(x, y) / grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total.item()


class SourceEpochs:
    """How many times over its training split each source of a mixture has been drawn from, and a line
    for each one that begins a new epoch (none for a single corpus). A pure function of the step, like the
    batches: a resumed run counts the rows before its first step again (llama_mini.data.mixture)."""

    def __init__(self, data, config: TrainConfig, seq_len: int, start_step: int):
        self.mixture = data if isinstance(data, MixedSplits) else None
        self.seed, self.seq_len = config.seed, seq_len
        self.rows_per_step = config.batch_size * config.grad_accum
        if self.mixture is not None:
            self.rows = rows_per_source(self.mixture.weights, self.seed, start_step * self.rows_per_step)
            self.epochs = self._epochs()

    def _epochs(self) -> list[int]:
        """The epoch each source is in: 1 + its tokens drawn // its training split's tokens."""
        splits = self.mixture.splits
        return [
            1 + int(rows) * self.seq_len // len(split) for rows, split in zip(self.rows, splits, strict=True)
        ]

    def after_step(self, step: int) -> list[str]:
        """Lines for the sources whose training split step `step` began drawing from again."""
        if self.mixture is None:
            return []
        picks = source_of_rows(self.mixture.weights, self.seed, (step - 1) * self.rows_per_step,
                               self.rows_per_step)  # fmt: skip
        self.rows += np.bincount(picks, minlength=len(self.rows))
        before, self.epochs = self.epochs, self._epochs()
        return [
            f"data: {source.name} begins epoch {now} at step {step} (its training split drawn "
            f"{now - 1} time{'s' if now > 2 else ''} over)"
            for source, was, now in zip(self.mixture.sources, before, self.epochs, strict=True)
            if now != was
        ]


class Trainer:
    """One run: `Trainer(config, model_overrides)` sets it up (build.py's `build_run`), `run()` trains to
    max_steps.

    `model_overrides` are ModelArgs fields set on the command line or in a config file; they apply on top
    of `config.preset`. On resume, the checkpoint's settings win: only the training settings given
    explicitly in `resume_overrides` (such as a larger --max-steps) change, and model settings must agree.
    With `config.init_from` the model's shape comes from that checkpoint, and `model_overrides` may only
    agree with it (or set initial_model.ADJUSTABLE_WHEN_FINE_TUNING).
    """

    def __init__(
        self,
        config: TrainConfig,
        model_overrides: dict[str, Any] | None = None,
        resume: bool = False,
        resume_overrides: dict[str, Any] | None = None,
        show_progress: bool = True,
    ):
        parts = build_run(config, model_overrides, resume, resume_overrides)  # build.py: the run's parts
        self.config, self.model_args, self.run_folder = parts.config, parts.model_args, parts.run_folder
        self.dist, self.parallel = parts.dist, parts.parallel
        self.device, self.dtype = parts.device, parts.dtype
        self.resume_from, self.init_folder = parts.settings.resume_from, parts.settings.init_folder
        self.lora, self.tokenizer = parts.settings.lora, parts.tokenizer
        self.train_data, self.val_data, self.held_out = parts.train_data, parts.val_data, parts.held_out
        self.fast_paths, self.optimizer = parts.fast_paths, parts.optimizer
        self.raw_model, self.loss_module = parts.raw_model, parts.loss_module
        # fp16 has too few exponent bits for small gradients: scale the loss up, unscale before the step.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.show_progress = show_progress

        self.step = 0
        self.best_val_loss: float | None = None
        self.last_checkpoint: Path | None = None  # on the main process
        self.last_saved_step = -1  # on every process
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        self.reference = self._reference_log_probs() if self.config.dpo else None
        self.train_metrics: dict[str, float] = {}  # a --dpo step's metrics beside its loss
        if self.dist.is_main:  # on resume too: the record follows the settings the run goes on with
            write_run_config(self.out / RUN_CONFIG, self.config, self.model_args, self.describe_place())
        if self.parallel == "ddp":  # after loading: DDP broadcasts the main process's weights
            self.loss_module = replicate(self.loss_module, self.device)

        rows = 2 * self.config.batch_size if self.config.dpo else self.config.batch_size  # a pair: 2 rows
        self.tokens_per_step = rows * self.config.grad_accum * self.model_args.max_seq_len
        self.flops_per_token = training_flops_per_token(self.model_args, self.model_args.max_seq_len)
        self.peak_flops = peak_flops(self.device, self.config.peak_tflops)
        self.stop_requested = False
        self.stop_signal: int | None = None  # the signal that asked for the stop, if one did
        self.warned_no_harness = False
        self.grad_norm: torch.Tensor | None = None  # the last step's, before clipping

    @property
    def out(self) -> Path:
        return self.run_folder.out

    @property
    def base_folder(self) -> Path:
        """OUT/base: a LoRA run's frozen base model."""
        return self.out / LORA_BASE

    # ----------------------------------------------------------------------------------- the loop

    def run(self) -> TrainSummary:
        """Train to max_steps (or until a stop is asked for); the run folder's lock goes with the run."""
        try:
            return self._run()
        finally:
            if self.dist.is_main:
                self.run_folder.unlock()

    def _run(self) -> TrainSummary:
        start_step, started = self.step, time.perf_counter()
        metrics = MetricsLog(self.out / METRICS, enabled=self.dist.is_main, after_step=start_step)
        dashboards = self._open_dashboards(start_step)
        try:
            return self._train(start_step, started, metrics, dashboards)
        finally:
            dashboards.close()

    def _open_dashboards(self, start_step: int) -> Dashboards:
        """--log's dashboards (on the main process), told the run's settings."""
        config = self.config
        if not self.dist.is_main:
            return Dashboards([], self.out, start_step + 1)
        dashboards = Dashboards(
            config.log, self.out, start_step + 1, config.wandb_project, config.wandb_name, config.wandb_mode
        )
        if dashboards.open:
            model = {f"model.{name}": value for name, value in self.model_args.to_dict().items()}
            dashboards.hyperparameters({**config.to_dict(), **model})
            if start_step == 0:
                dashboards.text(0, "settings", (self.out / RUN_CONFIG).read_text())
        return dashboards

    def _train(self, start_step: int, started: float, metrics: MetricsLog, dashboards: Dashboards):
        config = self.config
        progress = Progress(config.max_steps, start_step, enabled=self.show_progress and self.dist.is_main)
        progress.write(f"{self.describe_place()} (train.py --help tells how to switch)")
        if config.init_from:
            progress.write(self._describe_fine_tuning())
        epochs = SourceEpochs(self.train_data, config, self.model_args.max_seq_len, start_step)
        train_loss, evaluation, interrupted = float("nan"), None, False
        sampled_at = None  # the last step whose sample the dashboards show
        window_start, window_tokens = time.perf_counter(), 0
        with self._stop_on_signals():
            while self.step < config.max_steps:
                train_loss = self.train_step(self.step)
                self._stop_if_not_finite(train_loss)
                self.step += 1
                for line in epochs.after_step(self.step):
                    progress.write(line)
                window_tokens += self.tokens_per_step
                if self.step % config.log_interval == 0 or self.step == config.max_steps:
                    record = self._train_record(
                        train_loss, window_tokens / (clock(self.device) - window_start)
                    )
                    metrics.write(record)
                    dashboards.record(record)
                    progress.update_postfix(record)
                    window_start, window_tokens = time.perf_counter(), 0
                progress.advance()
                if self.step % config.eval_interval == 0 or self.step == config.max_steps:
                    eval_started = time.perf_counter()
                    evaluation = self.evaluate()
                    record = {"type": "eval", "step": self.step, "tokens": self.tokens_seen, **evaluation}
                    metrics.write(record)
                    dashboards.record(record)
                    progress.write(self._describe_evaluation(evaluation))
                    sampled_at = self._sample_to_dashboards(dashboards) or sampled_at
                    self.save_checkpoint(evaluation["val_loss"], train_loss)
                    window_start += time.perf_counter() - eval_started  # tokens/s measures training only
                if self.dist.any(self.stop_requested, self.device):
                    interrupted = True
                    break
        if interrupted and self.last_saved_step != self.step:
            self.save_checkpoint(None, train_loss)
        progress.close()
        summary = self._summary(start_step, started, train_loss, evaluation, interrupted)
        if summary.sample is not None and sampled_at != self.step:
            dashboards.text(self.step, "sample", summary.sample)
        return summary

    def _sample_to_dashboards(self, dashboards: Dashboards) -> int | None:
        """At an evaluation, a sample (as the run prints at its end) for the dashboards' text tab, so a
        watched run shows what the model writes as it learns; returns the step, or None where no dashboard
        is open. Decided from the settings alone, which every process holds: under FSDP all of them take
        part in generating (`sample`), while only the main process has the dashboards."""
        if not (self.config.log and self.config.sample_tokens):
            return None
        if not (self.dist.is_main or self.parallel == "fsdp"):
            return None
        sample = self.sample(self.config.sample_prompt, self.config.sample_tokens)
        dashboards.text(self.step, "sample", sample)
        return self.step

    def train_step(self, step: int) -> float:
        """One optimizer step; returns the mean training loss (a non-finite loss skips the update)."""
        set_learning_rates(self.optimizer, step, self.config)
        self.loss_module.train()
        if self.config.dpo:
            return self._preference_step(step)
        with attention_backend(self.fast_paths.attention):
            micro_batches = self._batches(self.train_data, step, self.config.grad_accum, stream=0)
            loss = accumulate_gradients(
                self.loss_module, micro_batches, self.config.grad_accum, self.device, self.dtype, self.scaler
            )
        return self._update(self.dist.mean(loss, self.device))

    def _preference_step(self, step: int) -> float:
        """train_step for --dpo (llama_mini.train.dpo): its metrics go to `train_metrics`."""
        seq_len = self.model_args.max_seq_len
        with attention_backend(self.fast_paths.attention):
            micro_batches = pair_batches(
                self.train_data, self.reference["train"], step, self.config, seq_len, self.dist, self.device
            )
            metrics = accumulate_preference_gradients(
                self.loss_module, micro_batches, self.config.grad_accum, self.device, self.dtype, self.scaler
            )
        self.train_metrics = {name: self.dist.mean(value, self.device) for name, value in metrics.items()}
        return self._update(self.train_metrics.pop("loss"))

    def _update(self, loss: float) -> float:
        """The optimizer step after the gradients of mean loss `loss` were accumulated."""
        if not math.isfinite(loss):  # leave the weights as they were: the caller stops the run
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # The global gradient norm before clipping (kept for the log; --grad-clip 0 measures, clips nothing)
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm).detach()
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
        if self.config.dpo:  # the held-out pairs, and --eval-data/--eval-tasks as any run scores them
            with attention_backend(self.fast_paths.attention):
                preferences = evaluate_preferences(
                    self.loss_module, self.val_data, self.reference["val"], self.config,
                    self.model_args.max_seq_len, self.dist, self.device, self.dtype,
                )  # fmt: skip
            return {**preferences, **self._evaluate_beyond_the_split()}
        if isinstance(self.val_data, MixedSplits):
            return {**self._evaluate_mixture(self.val_data), **self._evaluate_beyond_the_split()}
        val_loss, val_bpb = self._evaluate_split(self.val_data)
        return {"val_loss": val_loss, "val_bpb": val_bpb, **self._evaluate_beyond_the_split()}

    def _evaluate_split(self, split: TokenSplit) -> tuple[float, float]:
        """(loss, bits per byte) over eval_steps fixed batches of one validation split."""
        self.loss_module.eval()
        total = 0.0
        for x, y in self._batches(split, 0, self.config.eval_steps, stream=1):
            with autocast(self.device, self.dtype), attention_backend(self.fast_paths.attention):
                total += self.loss_module(x, y).item()
        val_loss = self.dist.mean(total / self.config.eval_steps, self.device)
        # tokens per byte of the text the loss averages over (chat data: the assistant replies only)
        return val_loss, val_loss * split.meta.loss_tokens_per_byte / math.log(2)

    def _evaluate_mixture(self, val_data: MixedSplits) -> dict[str, float]:
        """Each source's own validation split, as val_loss/NAME and val_bpb/NAME, and their weighted means
        as val_loss and val_bpb (what best/ is chosen by): the loss of text drawn as training draws it."""
        results = {"val_loss": 0.0, "val_bpb": 0.0}
        for source, split in zip(val_data.sources, val_data.splits, strict=True):
            loss, bpb = self._evaluate_split(split)
            results[f"val_loss/{source.name}"], results[f"val_bpb/{source.name}"] = loss, bpb
            results["val_loss"] += source.weight * loss
            results["val_bpb"] += source.weight * bpb
        return results

    def _evaluate_beyond_the_split(self) -> dict[str, float]:
        """--eval-data's held-out corpora (every process: under FSDP each holds a piece of every layer) and
        --eval-tasks' harness tasks (the main process, not under FSDP), on the model as it is now."""
        results: dict[str, float] = {}
        config, model = self.config, self.raw_model
        if self.held_out:
            model.eval()
            with unsharded(self.loss_module), autocast(self.device, self.dtype):
                results |= score_held_out(
                    model, self.tokenizer, self.held_out, config.batch_size, self.device
                )
        if config.eval_tasks and self.dist.is_main and self.parallel != "fsdp":
            model.eval()
            with autocast(self.device, self.dtype):
                scores = run_harness_tasks(
                    model, self.tokenizer, config.eval_tasks, config.eval_tasks_limit, config.batch_size
                )
            if scores is None and not self.warned_no_harness:
                self.warned_no_harness = True
                print(
                    f"note: --eval-tasks skipped: lm-eval is not installed ({INSTALL_EVAL})", file=sys.stderr
                )
            results |= scores or {}
        return results

    def _batches(self, shard, step: int, count: int, stream: int):
        seq_len = self.model_args.max_seq_len
        return batches(shard, step, count, stream, self.config, seq_len, self.dist, self.device)

    def _stop_if_not_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            return
        kept = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint was saved yet"
        )
        raise TrainingError(
            f"loss became {loss} at step {self.step + 1}; {kept}. Lower --lr (now {self.config.lr}), "
            "raise --warmup-steps, or train in --dtype fp32"
        )

    @property
    def tokens_seen(self) -> int:
        return self.step * self.tokens_per_step

    def _train_record(self, loss: float, tokens_per_second: float) -> dict[str, Any]:
        record = {
            "type": "train",
            "step": self.step,
            "tokens": self.tokens_seen,
            "loss": loss,
            **self.train_metrics,
            "lr": learning_rate(self.step - 1, self.config),
            "tokens_per_second": tokens_per_second,
        }
        if self.grad_norm is not None:
            norm = self.grad_norm
            # under FSDP a DTensor: every process calls this, and full_tensor() gathers the one value
            record["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        peak_memory = peak_memory_bytes(self.device)
        if peak_memory is not None:  # on a GPU: the most this process's allocator has held so far
            record["peak_memory_bytes"] = peak_memory
        if self.peak_flops:
            # MFU: the FLOPs the model needs per second at this speed, over what the GPUs could do.
            record["mfu"] = (
                tokens_per_second * self.flops_per_token / (self.peak_flops * self.dist.world_size)
            )
        return record

    def _summary(self, start_step: int, started: float, train_loss: float, evaluation, interrupted: bool):
        seconds = time.perf_counter() - started
        tokens = (self.step - start_step) * self.tokens_per_step
        sample = None
        # Under FSDP every process takes part (each layer's weights are gathered from all of them), and
        # only once a step has run: FSDP learns which module is its root from the first forward pass.
        sharded = self.parallel == "fsdp"
        if self.config.sample_tokens and not interrupted and (self.dist.is_main or sharded):
            if not sharded or self.step > start_step:
                sample = self.sample(self.config.sample_prompt, self.config.sample_tokens)
        self.dist.barrier()
        return TrainSummary(
            step=self.step,
            train_loss=train_loss,
            val_loss=evaluation["val_loss"] if evaluation else None,
            val_bpb=evaluation.get("val_bpb") if evaluation else None,
            best_val_loss=self.best_val_loss,
            tokens=tokens,
            seconds=seconds,
            tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
            checkpoint=self.last_checkpoint,
            interrupted=interrupted,
            sample=sample,
            trainable_parameters=trainable_parameters(self.raw_model),
        )

    def _describe_evaluation(self, evaluation: dict[str, float]) -> str:
        held_out = "".join(
            f", {name.removeprefix('val_bpb/')} {value:.4f}"
            for name, value in evaluation.items()
            if name.startswith("val_bpb/")
        )
        if self.config.dpo:
            return (
                f"step {self.step}: val loss {evaluation['val_loss']:.4f}, reward accuracy "
                f"{evaluation['val_reward_accuracy']:.3f}, margin {evaluation['val_reward_margin']:.4f}"
                + (f"; bits/byte{held_out.removeprefix(',')}" if held_out else "")
            )
        return (
            f"step {self.step}: val loss {evaluation['val_loss']:.4f}, "
            f"{evaluation['val_bpb']:.4f} bits/byte{held_out}"
        )

    def _reference_log_probs(self):
        """--dpo: the starting model's log-probs of every pair (llama_mini.train.dpo.reference_log_probs)."""
        return reference_log_probs(
            self.out,
            {"train": self.train_data, "val": self.val_data},
            self.raw_model,
            self.loss_module,
            seq_len=self.model_args.max_seq_len,
            batch_size=self.config.batch_size,
            source=str(self.init_folder or self.config.init_from),
            lora=self.lora is not None,
            resuming=self.resume_from is not None,
            dist=self.dist,
            device=self.device,
            dtype=self.dtype,
        )

    def _describe_fine_tuning(self) -> str:
        total = sum(parameter.numel() for parameter in self.raw_model.parameters())
        trained = trainable_parameters(self.raw_model)
        how = f"LoRA rank {self.lora.rank} on {','.join(self.lora.targets)}" if self.lora else "every weight"
        source = self.init_folder or self.config.init_from
        return f"fine-tuning {source}: {how}, {trained:,} of {total:,} parameters ({trained / total:.2%})"

    # ----------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, val_loss: float | None, train_loss: float) -> None:
        """Write OUT/step-NNNNNNN (the Hugging Face folder of the whole model, every process's piece of the
        trainable weights and AdamW state, the random states; for LoRA the adapter too), keep the last
        `keep_last`, and make it OUT/best when its validation loss is the best so far, or when there is
        no best/ yet (a run stopped before its first evaluation still leaves one to generate from). Every
        process calls it; under FSDP the whole model is first gathered onto the main process's CPU."""
        is_best = val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss)
        if is_best:
            self.best_val_loss = val_loss
        is_best = is_best or (self.best_val_loss is None and not self.run_folder.best.exists())
        whole = self._whole_model()
        folder = self.run_folder.save_checkpoint(
            self.step,
            lambda path: save_sharded_state(path, self.raw_model, self.optimizer),
            lambda folder: self._write_model(folder, whole),
            self._training_state(),
            {
                "step": self.step,
                "tokens": self.tokens_seen,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "best_val_loss": self.best_val_loss,
                "train_config": self.config.to_dict(),
                "model_args": self.model_args.to_dict(),
                "resolved": self.resolved_settings(),
            },
            is_best=is_best,
            keep_last=self.config.keep_last,
        )
        if self.dist.is_main:
            self.last_checkpoint = folder
        self.last_saved_step = self.step

    def describe_place(self) -> str:
        """'cpu, bf16 autocast; fast paths: compile off, fused AdamW off, ...': where and how the run
        computes."""
        precision = "float32" if self.dtype == torch.float32 else f"{DTYPE_NAMES[self.dtype]} autocast"
        return f"{self.device.type}, {precision}; fast paths: {self.fast_paths.describe()}"

    def resolved_settings(self) -> dict[str, Any]:
        """What the run's settings came to: the schedule's values (set or derived) and the device, dtype and
        fast paths the defaults chose here. Recorded with each checkpoint, so that a resume keeps the ones
        its settings leave to a default although a newer llama_mini may choose otherwise (build.py's
        resolve_settings and own_choices)."""
        schedule = {name: getattr(self.config, name) for name in DERIVED_FROM}
        runtime = {"device": self.device.type, "dtype": DTYPE_NAMES[self.dtype]}
        return {**schedule, **runtime, **dataclasses.asdict(self.fast_paths)}

    def _whole_model(self) -> Transformer | None:
        """The model with whole tensors, for the Hugging Face folder: `raw_model` itself, or under FSDP a
        copy on the main process's CPU gathered from every process's pieces (every process must call
        this; the others get None)."""
        if self.parallel != "fsdp":
            return self.raw_model
        state = gather_full_state_dict(self.loss_module, self.raw_model)
        if state is None:
            return None
        return assign_weights(skeleton(self.model_args, self.lora), state)

    def _write_model(self, folder: Path, model: Transformer) -> None:
        """A checkpoint's model: a Hugging Face folder of the fine-tuned model, with LoRA's adapters merged
        into it, and for LoRA the adapter itself in PEFT's format in folder/adapter/ (llama_mini.checkpoint.
        peft says why a subfolder)."""
        tokenizer = self.tokenizer.model_path
        if self.lora is None:
            save_pretrained(model, folder, tokenizer_path=tokenizer, sampling=SamplingConfig())
            return
        save_pretrained(merged_model(model), folder, tokenizer_path=tokenizer, sampling=SamplingConfig())
        # PEFT's base_model_name_or_path: OUT/base, the frozen base as a Hugging Face folder.
        base = str(self.base_folder.resolve())
        save_adapter(model, folder / ADAPTER_FOLDER, base_model_name_or_path=base)

    def _training_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the sharded state: the random states (the main process's, which
        every process continues from on resume) and fp16's loss scale."""
        state: dict[str, Any] = {"cpu_rng_state": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _load_checkpoint(self, folder: Path) -> None:
        """Continue from checkpoint `folder`: weights, AdamW state, random states, step and best loss.

        Format 2: the trainable weights and AdamW state from sharded_state/, each process reading what it
        holds (a LoRA run's frozen base came from OUT/base). Format 1 (no sharded state; never under FSDP,
        refused earlier): the weights from the Hugging Face folder (LoRA: the adapter), the optimizer's
        state dict from training_state.pt.
        """
        state = RunFolder.read_training_state(folder)
        if RunFolder.checkpoint_format(folder) >= 2:
            load_sharded_state(folder / SHARDED_STATE, self.raw_model, self.optimizer)
        else:
            if self.lora is not None:  # the frozen base came from OUT/base; the adapters are the step's own
                load_adapter(self.raw_model, folder / ADAPTER_FOLDER)
            else:
                saved = load_model(folder, device=self.device)
                self.raw_model.load_state_dict(saved.state_dict())
                del saved
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["cpu_rng_state"])
        if "cuda_rng_state" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng_state"], self.device)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        trainer_state = RunFolder.read_trainer_state(folder)
        self.step = trainer_state["step"]
        self.best_val_loss = trainer_state["best_val_loss"]
        self.last_checkpoint = folder
        self.last_saved_step = self.step

    # ----------------------------------------------------------------------------------- signals, sample

    @contextmanager
    def _stop_on_signals(self):
        """The first Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second
        Ctrl-C stops at once.

        Under torchrun a Ctrl-C at the terminal reaches each process twice: from the terminal, and a moment
        later from torchrun, which passes on what it receives. A repeat within LAUNCHER_ECHO_S of the first
        is that echo, not a second Ctrl-C, so it does not cut the checkpoint short."""
        first_signal_at = None

        def request_stop(signum, frame):
            nonlocal first_signal_at
            if first_signal_at is None:
                first_signal_at = time.monotonic()
            self.stop_requested = True
            self.stop_signal = signum
            under_launcher = "TORCHELASTIC_RUN_ID" in os.environ
            if not (under_launcher and time.monotonic() - first_signal_at < LAUNCHER_ECHO_S):
                signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @torch.no_grad()
    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """A sample from the trained model, to show what it learned (SamplingConfig's default temperature
        and top-p). Under FSDP every process generates the same tokens in step (see `unsharded`)."""
        self.raw_model.eval()
        chat = self.train_data.chat is not None or (self.config.dpo and self.tokenizer.chat_template)
        if chat:  # a chat run: the reply to the prompt as a user's message
            message = [{"role": "user", "content": prompt.strip() or "Hello!"}]
            ids = encode_chat(self.tokenizer, message, add_generation_prompt=True).ids
            stop_ids = chat_stop_ids(self.tokenizer)
        else:
            ids, stop_ids = self.tokenizer.encode(prompt, bos=True), self.tokenizer.eos_ids
        room = self.model_args.max_seq_len - len(ids)
        with unsharded(self.loss_module):
            new = generate(
                self.raw_model,
                [ids],
                max_new_tokens=min(max_new_tokens, room),
                eos_id=stop_ids,
                seed=self.config.seed,
            )[0]
        return self.tokenizer.decode(ids + new)
