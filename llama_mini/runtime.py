"""Where the work runs: the device, the dtype, mixed precision and the processes of a torchrun job.

Training and generation both resolve `--device` and `--dtype` here, with one rule each:

    device auto   cuda, then mps, then cpu; under torchrun each process takes the GPU of its local rank
    dtype auto    bf16 on a CUDA GPU that supports it, fp16 on an older CUDA GPU, fp32 on CPU and MPS;
                  training on a CPU with bfloat16 matrix units (AMX) also takes bf16

In training the dtype is the autocast dtype (the weights stay float32, `autocast`); in generation it is the
dtype the weights are loaded in. The two settings are declared once (`device_setting`, `dtype_setting`)
and used by both TrainConfig and SamplingConfig's command line.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from llama_mini.errors import ConfigError
from llama_mini.settings import setting

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "PEAK_BF16_FLOPS",
    "Distributed",
    "RuntimeSettings",
    "DtypeName",
    "autocast",
    "clock",
    "cpu_has_bf16_matrix_units",
    "device_setting",
    "dtype_setting",
    "peak_flops",
    "peak_memory_bytes",
    "resolve_device",
    "resolve_dtype",
    "setup_distributed",
    "synchronize",
]

DtypeName = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # torch.bfloat16 -> "bf16"

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


def device_setting() -> Any:
    """The --device setting, as every command declares it."""
    return setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def dtype_setting() -> Any:
    """The --dtype setting, as every command declares it."""
    return setting(
        "auto",
        "auto (bf16 on GPUs that support it, fp16 on older CUDA GPUs, fp32 on CPU and MPS, but bf16 for "
        "training on a CPU with AMX), fp32, bf16 or fp16; training computes in it under autocast, generation "
        "loads the weights in it",
    )


@dataclass
class RuntimeSettings:
    """The two settings of where a command runs, for commands that have no settings class of their own
    to hold them (generate.py's --device and --dtype are made from these)."""

    device: str = device_setting()
    dtype: DtypeName = dtype_setting()


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
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device, training: bool = False) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older CUDA GPUs, fp32 on CPU and MPS, except bf16 for
    `training` on a CPU with bfloat16 matrix units; or the named one."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if training and device.type == "cpu" and cpu_has_bf16_matrix_units():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cpu_has_bf16_matrix_units() -> bool:
    """True on a CPU with AMX tiles (Intel Xeon from Sapphire Rapids on), whose bfloat16 matrix units make a
    bf16-autocast training step faster than a float32 one: 0.70-0.75 of its time on the demo's model
    (docs/BENCHMARKS.md, "`make demo` in half the time", second and third tries). Elsewhere bf16 is not
    measured faster on a CPU, so training keeps float32 there; generation keeps float32 weights on every CPU
    (its measured fast paths are float32 and int8)."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.3; absent means unknown
    return bool(supported is not None and supported())


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision: matmuls in dtype, while RMSNorm, RoPE and the loss upcast to float32 themselves."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously), so a clock reads its time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s (for MFU): `override_tflops`, or looked up by GPU name."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most memory PyTorch's allocator has held on a CUDA device since the process started (None on
    other devices: a CPU process's peak resident size counts the interpreter and the data preparation
    too, so bench/parallel_memory.py measures CPU peaks itself, around the training steps only)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


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

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of `value` over all processes (itself when alone)."""
        if not self.enabled:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)  # a sum (gloo has no average)
        return tensor.item() / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True if `flag` is true on any process."""
        if not self.enabled:
            return flag
        tensor = torch.tensor(int(flag), device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def from_main(self, value: Any) -> Any:
        """The main process's `value` (a small picklable object), on every process."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)  # NCCL: through the current GPU, which setup chose
        return box[0]

    def share_main_rng_state(self, device: torch.device) -> None:
        """Give every process the main process's CPU random state.

        Processes that built the model on the meta device (FSDP) drew no random numbers while the main
        process drew the initial weights; from here on every process draws what one process would, as
        under DDP, and a resumed run (which restores the main process's state everywhere) continues them.
        The state travels through `device`: NCCL moves only GPU tensors.
        """
        if not self.enabled:
            return
        state = torch.get_rng_state().to(device)
        dist.broadcast(state, src=0)
        torch.set_rng_state(state.cpu())


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
        atexit.register(_leave_process_group)
    return info


def _leave_process_group(settle_seconds: float = 0.2) -> None:
    """Leave the process group while the interpreter is still whole (at exit).

    A finished collective's tensors are freed by the backend's own threads, after the caller has moved
    on, and freeing a tensor made in Python takes the GIL. A thread still waiting for it when the
    interpreter starts to finalize is stopped mid-destructor, which aborts the process ("terminate called
    without an active exception") after a run that ended well: measured about once in 20 two-process
    gloo runs on a busy CPU. Sleeping first hands them the GIL; then the group is destroyed (NCCL's
    threads are joined, as PyTorch asks of every program).
    """
    if not dist.is_initialized():
        return
    time.sleep(settle_seconds)
    dist.destroy_process_group()
