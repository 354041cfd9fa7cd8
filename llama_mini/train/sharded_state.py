"""A run's resumable training state, saved sharded with torch.distributed.checkpoint (DCP).

A step checkpoint's `sharded_state/` folder holds what training changes, as flat tensors:

    model.NAME                every trainable parameter, float32 (the master weights AdamW updates)
    optimizer.NAME.KEY        its optimizer state: AdamW's step, exp_avg, exp_avg_sq; Muon's momentum_buffer

Under FSDP every process holds one piece of each tensor (a DTensor cut along dim 0) and writes only its
pieces, to its own file (`__R_0.distcp`): neither the weights nor AdamW's moments are ever gathered. Under
DDP and alone the tensors are whole; DCP writes each once. Loading reshards: the metadata says where each
piece of each tensor lies, and every process reads the parts of the files that its own pieces (or whole
tensors) cover. So a checkpoint of N processes resumes with M processes, under FSDP, DDP or alone.

Only trainable parameters are stored: LoRA's frozen base is read from OUT/base, once per run. The
optimizer's hyperparameters (learning rate, betas, weight decay) are not stored: the learning rate is
the schedule's at the step, the others are the run's settings. The Hugging Face folder beside
sharded_state/ has the same weights again, whole, for everything that is not training (generate.py,
transformers, convert, best/): a step checkpoint takes 16 bytes per parameter on disk (4 weights + 4
weights + 8 AdamW).

Safety. DCP's reader unpickles `.metadata` with plain `pickle.load`, and non-tensor entries with
`torch.load(weights_only=False)`: either would run code from a crafted checkpoint. Here only tensors are
saved, and `SafeMetadataReader` reads `.metadata` with an unpickler that builds nothing but DCP's own
metadata classes, torch.Size and dtypes; a non-tensor entry is refused, so the loader never reaches the
unsafe branch. The tensor files themselves DCP reads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from llama_mini.errors import CheckpointError

__all__ = [
    "METADATA_FILE",
    "SafeMetadataReader",
    "initialize_optimizer_state",
    "load_sharded_state",
    "read_metadata",
    "save_sharded_state",
    "training_tensors",
]

METADATA_FILE = ".metadata"  # DCP's index of a checkpoint: every tensor's shape and where its pieces lie

# What `.metadata` may build: DCP's metadata records (plain dataclasses and an enum), tensor sizes and
# layouts, and the Path DCP records the checkpoint was written to. Dtypes are allowed by type below.
# BytesStorageMetadata, which marks a non-tensor entry, is left out on purpose: DCP would load such an
# entry with torch.load(weights_only=False).
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle's documented way to restrict what a pickle may build ("Restricting Globals")."""

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _METADATA_GLOBALS and not is_dtype:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a tensor checkpoint's metadata")
        return super().find_class(module, name)


def read_metadata(folder: Path) -> Metadata:
    """The DCP metadata of `folder`, read safely; CheckpointError if it is missing, not DCP's, or lists
    anything but tensors (BytesStorageMetadata is not among the classes it may build)."""
    path = Path(folder) / METADATA_FILE
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {METADATA_FILE}; the sharded state is incomplete") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a tensor checkpoint's metadata ({error})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not a tensor checkpoint's metadata")
    return metadata


class SafeMetadataReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read by `read_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@torch.no_grad()
def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Make `optimizer` create its per-parameter state (AdamW's step and two moments, Muon's momentum), so
    that a checkpoint can be loaded into it: one step with zero gradients at learning rate 0. The
    parameters do not move (weight decay multiplies them by 1 - 0 * decay = 1, the update is 0 * m /
    sqrt(v), or Muon's 0 * NS(0)), and the state it creates is overwritten by the checkpoint's."""
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p not in optimizer.state]
    if not parameters:
        return
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for parameter in parameters:
        parameter.grad = None
    for group, lr in zip(optimizer.param_groups, learning_rates, strict=True):
        group["lr"] = lr


def training_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The flat dict of tensors that `sharded_state/` holds (see the module docstring), sharing storage
    with the model and the optimizer: saving reads them, loading writes into them in place."""
    tensors = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        tensors[f"model.{name}"] = parameter.detach()
        for key, value in optimizer.state.get(parameter, {}).items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{name}.{key}"] = value
    return tensors


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _alone_without_warning() -> Iterator[None]:
    """DCP warns on every save and load without a process group, which is how one process trains."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write `model`'s trainable weights and `optimizer`'s state to `folder` with DCP. Every process of a
    torchrun job must call it: each writes its own pieces (FSDP) or its share of the whole tensors
    (DDP), and the main process writes `.metadata` last, once every piece is on disk."""
    writer = FileSystemWriter(folder)  # fsyncs every file before `.metadata` is written
    try:
        with _alone_without_warning():
            dcp.save(training_tensors(model, optimizer), storage_writer=writer, no_dist=_single_process())
    except CheckpointException as failed:
        # DCP gathers every process's failure into one BaseException; the first one's own error (a full
        # disk, say) is what the caller can name, and it is the same on every process
        raise first_failure(failed) from None


def first_failure(failed: CheckpointException) -> BaseException:
    """The error of the lowest-ranked process that failed in a DCP collective."""
    error, _ = failed.failures[min(failed.failures)]
    return error


def load_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load `folder` (written by `save_sharded_state`, by any number of processes) into `model`'s
    trainable weights and `optimizer`'s state, in place, resharding as needed. The checkpoint must hold
    every tensor asked for, at the same shape; anything else is a one-line CheckpointError."""
    initialize_optimizer_state(optimizer)
    wanted = training_tensors(model, optimizer)
    stored = read_metadata(folder).state_dict_metadata
    missing = [name for name in wanted if name not in stored]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{folder}: missing {shown}; it was saved from another model or optimizer")
    for name, tensor in wanted.items():
        if tuple(stored[name].size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{folder}: {name} has shape {list(stored[name].size)}, the model {list(tensor.shape)}"
            )
    with _alone_without_warning():
        dcp.load(wanted, storage_reader=SafeMetadataReader(folder), no_dist=_single_process())
