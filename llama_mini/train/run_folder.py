"""The run folder (train.py --out): checkpoints, best/, rotation, resume state and metrics.

    OUT/
      config.toml             the resolved settings (`train.py --config` reads it back)
      tokenizer.model         the run's tokenizer
      data/                   the tokenized shards (unless --data-dir points elsewhere)
      metrics.jsonl           one JSON object per logged step and per evaluation
      tensorboard/, wandb/, wandb_run_id    --log's dashboards (llama_mini/train/tracking.py)
      step-NNNNNNN/           the last --keep-last checkpoints, each:
        config.json, model.safetensors, tokenizer files    a Hugging Face folder of the whole model
        sharded_state/        the trainable weights and AdamW's state, one file per process, written with
                              torch.distributed.checkpoint (llama_mini/train/sharded_state.py)
        training_state.pt     the random states and fp16's loss scale (small; the main process's)
        trainer_state.json    step, losses, settings, checkpoint_format: written last
        adapter/              a LoRA run's adapter in PEFT's format
      best/                   the checkpoint with the lowest validation loss (hard links, no extra space)
      base/                   a LoRA run's frozen base model, written once (what resume and PEFT read)

Every process of a torchrun job writes its part of a checkpoint into one folder under a temporary name
(`.partial-step-NNNNNNN`), which the main process renames once all have finished, so a folder with its
final name is always complete; on several machines --out must be a file system they share. Commands that
take a checkpoint accept OUT itself and read OUT/best (llama_mini.checkpoint.resolve_checkpoint).

Checkpoint formats, by trainer_state.json's "checkpoint_format": 2 is the one above. 1 (the key absent)
keeps no sharded state: the weights are read from the Hugging Face folder (LoRA: the adapter) and
training_state.pt holds the optimizer's state dict too; such a run resumes alone or under DDP.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch

from llama_mini.checkpoint import RUN_BEST, RUN_STEP_PREFIX
from llama_mini.errors import CheckpointError, ConfigError
from llama_mini.files import (
    atomic_file,
    check_output_path,
    refused_write,
    write_folder_atomically,
    written_path,
)
from llama_mini.runtime import Distributed

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointWriteError",
    "METRICS",
    "RUN_CONFIG",
    "SHARDED_STATE",
    "TRAINER_STATE",
    "TRAINING_STATE",
    "MetricsLog",
    "RunFolder",
    "list_step_checkpoints",
    "step_dir_name",
]

TRAINING_STATE = "training_state.pt"  # RNG states, loss scale: torch.save, loaded with weights_only=True
SHARDED_STATE = "sharded_state"  # trainable weights and AdamW state, one file per process (DCP)
TRAINER_STATE = "trainer_state.json"  # step, losses, the settings: plain JSON
CHECKPOINT_FORMAT = 2  # trainer_state.json's "checkpoint_format" (see the module docstring)
METRICS = "metrics.jsonl"  # one JSON object per logged step and per evaluation
RUN_CONFIG = "config.toml"  # the resolved settings
LOCK_FILE = ".lock"  # held by the run using the folder (RunFolder.lock), with its process id inside

# The locks this process holds, by file: kept open, since closing any descriptor of a file drops its lock.
_HELD_LOCKS: dict[Path, Any] = {}


def step_dir_name(step: int) -> str:
    return f"{RUN_STEP_PREFIX}{step:07d}"


def list_step_checkpoints(out: Path) -> list[Path]:
    """Complete step checkpoints in `out`, oldest first (a folder exists only once fully written)."""
    folders = Path(out).glob(f"{RUN_STEP_PREFIX}*")
    return sorted(path for path in folders if path.is_dir() and (path / TRAINER_STATE).exists())


class RunFolder:
    """The files of one run. Every process may read; checkpoints are written by all processes together
    (`dist`, set once the torchrun process group is joined), everything else by the main one."""

    def __init__(self, out: str | Path, dist: Distributed | None = None):
        self.out = Path(out)
        self.dist = dist or Distributed()

    @property
    def best(self) -> Path:
        return self.out / RUN_BEST

    def check_writable(self, rank: int = 0) -> None:
        """ConfigError unless the folder can be created and written (checked before any slow work)."""
        check_output_path(self.out, "--out")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{rank}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"cannot write to --out {self.out}: {error.strerror}; choose a writable folder"
            ) from error

    def lock(self) -> str | None:
        """Hold OUT/.lock for the rest of this process: a run folder belongs to one run. Returns None, or
        why it cannot be had (another process holds it, named by the pid it wrote).

        An OS record lock (fcntl.lockf), which the kernel releases when the process ends however it ends,
        so a killed run never leaves a stale lock. It belongs to the process, not to one open file, so
        the same process may take it again; the file is kept open until `unlock` (the end of
        `Trainer.run`) or the process's exit. Under torchrun the main process holds it for the job.
        """
        if fcntl is None:  # not a POSIX system: no lock
            return None
        path = self.out / LOCK_FILE
        handle = _HELD_LOCKS.get(path.resolve())
        if handle is None:
            handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the process
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                return (
                    f"--out {self.out} is in use by another run (process {holder}): wait for it to end, or "
                    "choose another --out"
                )
            _HELD_LOCKS[path.resolve()] = handle
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return None

    def unlock(self) -> None:
        """Let go of OUT/.lock (the run is over; process exit does the same)."""
        handle = _HELD_LOCKS.pop((self.out / LOCK_FILE).resolve(), None)
        if handle is not None:
            fcntl.lockf(handle, fcntl.LOCK_UN)
            handle.close()

    def checkpoints(self) -> list[Path]:
        return list_step_checkpoints(self.out)

    def latest_checkpoint(self) -> Path | None:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def save_checkpoint(
        self,
        step: int,
        write_shards: Callable[[Path], None],
        write_model: Callable[[Path], None],
        training_state: dict[str, Any],
        trainer_state: dict[str, Any],
        is_best: bool,
        keep_last: int,
    ) -> Path:
        """Write OUT/step-NNNNNNN; every process must call it. Returns the new folder.

        In a temporary folder: every process's part of sharded_state/ by `write_shards(path)`, then on the
        main process the Hugging Face folder by `write_model(folder)`, training_state.pt, and
        trainer_state.json last. Then the main process renames the folder into place, links it as best/ if
        `is_best`, and deletes all but the `keep_last` newest step checkpoints; the others wait for it.
        """
        target = self.out / step_dir_name(step)
        partial = self.out / f".partial-{target.name}"
        # The main process measures; every process learns its verdict, so all refuse together or none does.
        too_full = self._too_full_for(target) if self.dist.is_main else None
        too_full = self.dist.from_main(too_full)
        if too_full is not None:
            raise CheckpointWriteError(too_full)
        if self.dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # left by a run that crashed while saving
            partial.mkdir(parents=True)
        self.dist.barrier()
        try:
            write_shards(
                partial / SHARDED_STATE
            )  # collective: returns once every process's pieces are written
            if self.dist.is_main:
                write_model(partial)
                torch.save(training_state, partial / TRAINING_STATE)
                # written last: list_step_checkpoints treats a folder with this file as complete
                state = {**trainer_state, "checkpoint_format": CHECKPOINT_FORMAT}
                (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        except (OSError, RuntimeError) as error:
            cause = write_failure(error, self.out)
            if cause is None:
                raise  # not the file system: a bug, with its traceback
            if self.dist.is_main:
                shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
            raise CheckpointWriteError(
                f"cannot write checkpoint {target.name} in {self.out}: {cause}; {self._last_complete()}"
            ) from None
        if self.dist.is_main:
            _rename_into_place(partial, target)
            if is_best:
                write_folder_atomically(self.best, lambda folder: _link_files(target, folder))
            for old in self.checkpoints()[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return target

    def _last_complete(self) -> str:
        latest = self.latest_checkpoint()
        if latest is None:
            return "no checkpoint of this run was complete yet; free some space and start again"
        return f"the last complete checkpoint, {latest}, is untouched: free some space, then --resume"

    def _too_full_for(self, target: Path) -> str | None:
        """Why the disk cannot hold the checkpoint about to be written (one as large as the last one), or
        None; said before anything is written."""
        latest = self.latest_checkpoint()
        if latest is None:
            return None
        needed = sum(path.stat().st_size for path in latest.rglob("*") if path.is_file())
        free = shutil.disk_usage(self.out).free
        if needed <= free:
            return None
        return (
            f"cannot write checkpoint {target.name} in {self.out}: {free / 2**20:.1f} MiB free, and the "
            f"last checkpoint took {needed / 2**20:.1f} MiB; {self._last_complete()}"
        )

    def remove_leftovers(self) -> list[str]:
        """Delete what a killed run left half-written in the folder (a checkpoint being saved, a best/ being
        linked); called once this run holds the folder's lock, so no other run is writing them. Returns
        their names."""
        leftovers = [path for path in self.out.glob(".partial-*") if path.is_dir()]
        leftovers += [path for path in self.out.glob(f".*-{RUN_BEST}") if path.is_dir()]  # .tmp-, .old-
        leftovers += [path for path in self.out.glob(".old-step-*") if path.is_dir()]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return sorted(path.name for path in leftovers)

    @staticmethod
    def checkpoint_format(folder: Path) -> int:
        """The format of checkpoint `folder` (see the module docstring); CheckpointError for a newer one."""
        found = RunFolder.read_trainer_state(folder).get("checkpoint_format", 1)
        if found > CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{folder} is a checkpoint of format {found}, written by a newer llama_mini (this one reads "
                f"up to {CHECKPOINT_FORMAT}); update llama_mini to resume it"
            )
        return found

    @staticmethod
    def read_trainer_state(folder: Path) -> dict[str, Any]:
        return json.loads((folder / TRAINER_STATE).read_text())

    @staticmethod
    def read_training_state(folder: Path) -> dict[str, Any]:
        # weights_only=True: the file holds tensors, numbers and strings only; no pickled code can run.
        return torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (no space, no permission, a read-only file system)."""


def write_failure(error: BaseException, folder: Path) -> str | None:
    """Why writing into `folder` failed, in words, or None when `error` is not a write the file system
    refused (llama_mini.files.refused_write)."""
    refused = refused_write(error)
    if refused is None:
        return None
    return f"{refused[0]} ({written_path(error) or folder})"


def _rename_into_place(folder: Path, target: Path) -> None:
    """Rename the complete `folder` to `target`. A `target` already there (the same step saved by a run
    that was resumed from an earlier checkpoint) is moved aside first and deleted after, so a crash
    leaves either the old folder or the new one under the name, never a mixture."""
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    folder.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _link_files(source: Path, target: Path) -> None:
    """Hard-link (or, across file systems, copy) every file of `source` into `target`, subfolders too
    (a LoRA run's adapter/).

    Checkpoint files are never modified after they are written, so sharing them is safe and costs no space.
    """
    for path in source.iterdir():
        if path.is_dir():
            (target / path.name).mkdir()
            _link_files(path, target / path.name)
        elif path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copyfile(path, target / path.name)


def _record(line: str) -> dict[str, Any] | None:
    """One line of metrics.jsonl, or None for a line cut short (the process was killed or the disk filled
    while it was written: the resumed run logs that step again)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl (main process only).

    On resume, lines logged after the checkpoint's step (and a last line cut short) are dropped first: the
    resumed run logs those steps again, and the file then reads as one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, after_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            lines = path.read_text().splitlines()
            kept = [
                line
                for line, record in zip(lines, map(_record, lines), strict=True)
                if record and record["step"] <= after_step
            ]
            with atomic_file(path) as file:
                file.write("".join(line + "\n" for line in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps({**record, "time": time.time()}) + "\n")
