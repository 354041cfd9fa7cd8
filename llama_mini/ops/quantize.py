"""Weight-only quantization for inference: a built model's linear layers, converted from outside.

    quantize(model, "int8")                    every nn.Linear but the output layer -> Int8Linear
    quantize(model, "int4", group_size=32)     -> Int4Linear (two weights a byte, groups of 32)
    QuantizeSettings                           --quantize and --group-size of generate, serve and eval

Only the weights of the linear layers change; activations, the KV cache, embeddings and norms stay in the
model's dtype, and every product is computed in that dtype.

int8, per output channel (row n of the (N, K) weight):
    scale[n] = max_k |w[n, k]| / 127,   q[n, k] = round(w[n, k] / scale[n]) in [-127, 127]
    y = (x @ q^T) * scale              the same as x @ (q * scale[:, None])^T up to rounding
`Int8Linear` computes it as F.linear(x, q.to(x.dtype)) * scale. We write it out rather than call torchao's
Int8WeightOnlyConfig or torch's `_weight_int8pack_mm` because the form matters to the compiled decode step:
the ahead-of-time step (llama_mini.ops.aot_step) rewrites each small matrix product as a multiply-and-sum
that inductor fuses with the int8-to-float conversion, so the step reads one byte per weight instead of
four. torch's `_weight_int8pack_mm` and torchao's tensor subclass are opaque calls there, and eagerly at
batch 1 every int8 form ran at 0.34-0.45x the float32 product on this project's CPU, this one included
(bench/int8_matvec.py; docs/BENCHMARKS.md, "Weight-only quantization: quality and speed"): the speed of
int8 comes from the compiled step.

int4, groups of `group_size` (32 or 128) along the input dimension, asymmetric, as torch's int4 kernels
define it: for each row n and group g,
    scale = (max - min) / 15,   q = round((w - min) / scale) in [0, 15],
    w ~ (q - 8) * scale + zero,  zero = min + 8 * scale
On CUDA `Int4Linear` runs torch's own kernel (`_weight_int4pack_mm`, the one torchao's Int4WeightOnlyConfig
wraps), which unpacks each group as it multiplies; where this torch has none, --quantize int4 is refused
in one line. On a CPU it keeps two values per byte in a plain layout (column k in the low nibble, column
k + K/2 in the high one) and computes F.linear(x, dequantized weight), written out in torch operations:
torch's CPU kernel (`_weight_int4pack_mm_for_cpu`) ran float32 inputs 40x slower than the float product
at 2,048 rows (an evaluation's windows) and below it at one row on this project's CPU, and inductor lowers
it with a constant of its own that a decode step compiled without its constants cannot bind
(llama_mini.ops.aot_step). Written out, it compiles: the step unpacks each weight to a byte in a loop of
its own (not yet fused into the dot products as int8's conversion is, so int4 decodes slower than int8);
eagerly each call unpacks the whole weight, slower than float.

The output layer is left in the model's dtype: its errors land on the logits directly (greedy choices flip
first there), it often shares its matrix with the token embeddings, and at small vocabularies it is a
small share of the weights read per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from llama_mini.errors import ConfigError
from llama_mini.settings import setting

__all__ = [
    "GROUP_SIZES",
    "Int4Linear",
    "Int8Linear",
    "QuantizeSettings",
    "check_quantize",
    "int4_kernel_available",
    "quantize",
]

Scheme = Literal["none", "int8", "int4"]
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
INT4_ROW_MULTIPLE = 16  # torch's int4 packing needs the output width a multiple of this


@dataclass(frozen=True)
class QuantizeSettings:
    """The quantization flags of generate, serve and eval."""

    quantize: Scheme = setting(
        "none",
        "store the linear layers' weights in fewer bits for inference: int8 (a scale per output channel) "
        "or int4 (a scale and zero per --group-size inputs; on CUDA it needs torch's int4 kernel)",
    )
    group_size: int = setting(128, "with --quantize int4: inputs sharing one scale and zero (32 or 128)")


def int4_kernel_available(device: torch.device | str) -> bool:
    """True where --quantize int4 runs on `device`: always on a CPU (written out, module docstring); on CUDA
    where this torch has its packed-int4 matrix kernel."""
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and hasattr(torch.ops.aten, "_weight_int4pack_mm"))


def check_quantize(scheme: str, group_size: int, device: torch.device | str) -> None:
    """ConfigError for a scheme this machine cannot run, before any loading."""
    if scheme not in ("none", "int8", "int4"):
        raise ConfigError(f"unknown --quantize {scheme!r}: choose none, int8 or int4")
    if scheme != "int4":
        return
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size} is not supported: choose 32, 64, 128 or 256")
    if not int4_kernel_available(device):
        raise ConfigError(
            f"--quantize int4 needs an int4 matrix kernel, which this torch lacks on {torch.device(device)}: "
            "use --quantize int8"
        )


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and one float scale per output channel:
    (..., in_features) -> (..., out_features), y = (x @ weight^T) * scales (module docstring)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) in the model's dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,); an all-zero row keeps scale > 0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """A bias-free linear layer with int4 weights, two per byte (CUDA: torch's packed layout), a scale
    and zero per `group_size` inputs of each output channel: (..., in_features) -> (..., out_features)."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, shape, group_size: int):
        super().__init__()
        self.out_features, self.in_features = shape
        self.group_size = group_size
        self.register_buffer(
            "packed", packed
        )  # CPU: (N, K / 2) uint8, low nibble k, high k + K/2; CUDA: the kernel's
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K / group, N, 2)

    @staticmethod
    def quantize_weight(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (N, K) int32 in [0, 15], scales_and_zeros (K / group, N, 2) float32) with
        w ~ (q - 8) * scale + zero per group (module docstring)."""
        n, k = weight.shape
        groups = weight.detach().float().reshape(n, k // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-6)
        q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
        zeros = low + 8 * scales
        return q.reshape(n, k), torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        weight = linear.weight
        q, scales_and_zeros = cls.quantize_weight(weight, group_size)
        if weight.device.type == "cpu":  # two values per byte (module docstring)
            half = q.shape[1] // 2
            packed = (q[:, :half] | q[:, half:] << 4).to(torch.uint8)
        else:  # CUDA: two values per byte, then the kernel's tiled layout
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
        # float32 scales on a CPU (dequantized in float32, then rounded once to the activations' dtype); the
        # CUDA kernel takes the activations' dtype (bf16).
        dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        return cls(packed, scales_and_zeros.to(dtype), tuple(weight.shape), group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return F.linear(x, self.dequantized().to(x.dtype))
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size, self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The CPU layout's weight in float32, (N, K): (q - 8) * scale + zero for each group."""
        q = torch.cat([self.packed & 15, self.packed >> 4], dim=1).float()  # (N, K) in [0, 15]
        groups = q.reshape(self.out_features, -1, self.group_size)  # (N, K / group, group)
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K / group) each
        return ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(self.out_features, -1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 groups of {self.group_size}"
        )


def quantize(model: nn.Module, scheme: str, group_size: int = 128) -> nn.Module:
    """Replace every nn.Linear of `model` except `model.output` by its `scheme` version, in place; returns
    the model. "none" leaves it as it is. With int4, layers the kernels cannot take stay in float: an input
    width that is not a multiple of `group_size`, or an output width not a multiple of INT4_ROW_MULTIPLE.
    ConfigError where the device cannot run int4."""
    if scheme == "none":
        return model
    device = next(model.parameters()).device
    check_quantize(scheme, group_size, device)
    output = getattr(model, "output", None)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is output or child.bias is not None:
                continue
            if scheme == "int8":
                setattr(parent, name, Int8Linear.from_linear(child))
            elif child.in_features % group_size == 0 and child.out_features % INT4_ROW_MULTIPLE == 0:
                setattr(parent, name, Int4Linear.from_linear(child, group_size))
    return model
