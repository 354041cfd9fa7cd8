"""How training spreads over the processes of a torchrun job, and activation checkpointing.

Like the fast paths (llama_mini.ops.fast_paths), these change how a built model trains, never what it
computes; the model's code knows nothing of them.

    --parallel ddp    DistributedDataParallel. Every process holds the whole model, its gradients and
                      AdamW's two moments: 4 + 4 + 8 = 16 bytes per parameter before activations (plus,
                      under bf16 autocast, a 2-byte copy of each weight from forward to backward). The
                      gradients are all-reduced once per optimizer step.
    --parallel fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`), as torchtitan and litgpt use it. Every
                      weight, gradient and AdamW moment is cut along its first dimension into N pieces, and
                      each process keeps one: 16 / N bytes per parameter. Each TransformerBlock is one
                      unit: just before it runs (forward, and again in backward) its weights are
                      all-gathered, and after it they are freed; its gradients are reduce-scattered, each
                      process receiving the sum of its own piece. The root unit is the training loss
                      module, NextTokenLoss, whose forward runs the whole model and the loss: its own
                      weights (the embeddings, the final norm and the output layer) stay gathered from the
                      start of forward to the end of backward, so the chunked loss can read
                      model.output.weight directly. On a GPU training in bf16, the gathered weights are
                      bf16 (compute) while the pieces each process keeps, and the gradient reduction, stay
                      float32 (`mixed_precision_policy`).
    one process       nothing to replicate or shard: both settings train the plain model, so a run started
                      under torchrun resumes alone, and the reverse (`parallel_mode`).

    --activation-checkpointing   each TransformerBlock keeps only its input from forward to backward and
                      runs its forward again inside backward to get the rest (`CheckpointedBlock`): the
                      activations of the L blocks shrink to L inputs plus one block's worth, for one more
                      forward pass (about a third more compute). With DDP, FSDP or alone.

Under FSDP with --compile, each block is compiled on its own before it is sharded (torchtitan's order:
checkpointing, then compile, then sharding), and the communication between blocks stays outside the
compiled code; the embeddings and the loss run eagerly.

Where the weights come from (`materialize`): every process builds the model on the meta device (shapes,
no memory), shards it, and allocates only its pieces; the main process alone builds the whole initial
model on the CPU (random, or --init-from's weights) and broadcasts it tensor by tensor, each process
keeping its piece. So a checkpoint is read once per job, never once per process, and a GPU never holds
the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from llama_mini.model.transformer import TransformerBlock

__all__ = [
    "CheckpointedBlock",
    "ParallelMode",
    "checkpoint_activations",
    "gather_full_state_dict",
    "materialize",
    "mixed_precision_policy",
    "parallel_mode",
    "replicate",
    "shard",
    "unsharded",
]

ParallelMode = Literal["single", "ddp", "fsdp"]


def parallel_mode(requested: str, world_size: int) -> ParallelMode:
    """What a run of `world_size` processes does with --parallel `requested`: alone, "single" (there is
    nothing to replicate or shard), else the requested "ddp" or "fsdp"."""
    return "single" if world_size == 1 else requested  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------------------


class CheckpointedBlock(TransformerBlock):
    """A TransformerBlock that saves only its input for backward and recomputes its forward there.

    torch.utils.checkpoint runs the block without keeping any intermediate tensor, and in backward runs
    it again to rebuild them. Non-reentrant checkpointing: the recomputation sees the same random state,
    so dropout draws the same masks, and the gradients are those of the plain block (the same kernels on
    the same shapes in the same order). Same weights, same names, same state dict: a checkpoint does not
    know whether the run that wrote it checkpointed activations.
    """

    def forward(
        self, x: torch.Tensor, rotations: torch.Tensor, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation, sampling: nothing is kept for backward anyway
            return super().forward(x, rotations, start_pos)
        return checkpoint(super().forward, x, rotations, start_pos, use_reentrant=False)


def checkpoint_activations(model: nn.Module) -> int:
    """Make every TransformerBlock of `model` a CheckpointedBlock, in place; returns how many.

    The block keeps its identity, submodules and parameters (only its class changes), so optimizers,
    state dicts and sharding see the same model. Call it before `shard`, which subclasses each block.
    """
    blocks = [module for module in model.modules() if type(module) is TransformerBlock]
    for block in blocks:
        block.__class__ = CheckpointedBlock
    return len(blocks)


# ---------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------


def replicate(loss_module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """`loss_module` under DDP. gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets
    instead of beside them, which saves one gradient-sized buffer (4 bytes per parameter)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(loss_module, device_ids=device_ids, gradient_as_bucket_view=True)


# ---------------------------------------------------------------------------------------------------------
# FSDP
# ---------------------------------------------------------------------------------------------------------


def mixed_precision_policy(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """FSDP's precision: gathered weights in the compute `dtype` (bf16 on GPUs), float32 gradient
    reduction and float32 pieces (the master weights AdamW updates). In float32 nothing is cast."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(
    loss_module: nn.Module,
    model: nn.Module,
    device: torch.device,
    world_size: int,
    dtype: torch.dtype,
) -> nn.Module:
    """Shard `loss_module` (the training loss around `model`) over the `world_size` processes with FSDP2,
    in place: one unit per TransformerBlock, and the root unit (the loss module with the embeddings, the
    final norm and the output layer). Blocks compiled in place (`compile_blocks`) stay compiled, with
    FSDP's hooks outside their graphs.

    The model may be on the meta device (`materialize` then allocates and fills the pieces) or real (its
    weights are then cut into pieces where they are). Returns `loss_module`, now an FSDPModule.
    """
    mesh = init_device_mesh(device.type, (world_size,))
    policy = mixed_precision_policy(dtype)
    blocks = [module for module in model.modules() if isinstance(module, TransformerBlock)]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(loss_module, mesh=mesh, mp_policy=policy)
    return loss_module


def _prefix(root: nn.Module, model: nn.Module) -> str:
    """The state-dict prefix of `model` inside `root` ("model." for NextTokenLoss)."""
    name = next(name for name, module in root.named_modules() if module is model)
    return f"{name}." if name else ""


def materialize(
    root: nn.Module, model: nn.Module, device: torch.device, full_state: dict[str, torch.Tensor] | None
) -> None:
    """Allocate on `device` the pieces of a model that was sharded on the meta device, and fill them from
    the main process's `full_state`, its whole state dict of `model` on the CPU (None on the others).

    The tensors are broadcast one at a time and each process keeps its piece: apart from the main
    process's CPU copy, no process holds more of the model than its pieces and one whole tensor. RoPE's
    table, a buffer that is not saved, is computed afresh by `to_empty`. (A caller that loads every
    weight next, from a sharded checkpoint, calls `root.to_empty(device=device)` alone.)
    """
    root.to_empty(device=device)
    prefix = _prefix(root, model)
    state = {prefix + name: tensor for name, tensor in (full_state or {}).items()}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(root, state, options=options)


def gather_full_state_dict(root: nn.Module, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """`model`'s whole state dict, gathered from every process's pieces, on the main process's CPU (None
    on the others, which must call this too: every tensor is all-gathered). For the Hugging Face folder
    of a checkpoint, which is one file of whole tensors."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    gathered = get_model_state_dict(root, options=options)
    if torch.distributed.get_rank() != 0:
        return None
    prefix = _prefix(root, model)
    return {name[len(prefix) :]: tensor for name, tensor in gathered.items() if name.startswith(prefix)}


@contextlib.contextmanager
def unsharded(root: nn.Module) -> Iterator[None]:
    """Inside the block, the root unit's weights (embeddings, norm, output) are gathered, so the model
    can be called directly (sampling); each block still gathers its own as it runs. Every process must
    run the same calls, as for any FSDP forward pass. Nothing happens for a module that is not sharded."""
    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()
