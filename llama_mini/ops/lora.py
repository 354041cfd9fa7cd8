"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models"), applied to a built model.

Fine-tuning changes each weight matrix W (out, in) by some dW. LoRA's bet is that dW has low rank, and
trains it as a product of two thin matrices while W stays frozen:

    h = W x + (alpha / r) * B A dropout(x)        A (r, in), B (out, r), r << min(in, out)

    A starts random (nn.Linear's default, uniform in +-1/sqrt(in), as PEFT's), B starts at zero: the adapted
      model starts as the pretrained one exactly, and the first gradient reaches B (dL/dB = s g (A x)^T with
      s = alpha / r), since A x is not zero.
    alpha / r: the update's scale stays about the same when r changes, so the learning rate found for one
      rank serves another (the paper's section 4.1).
    dropout acts on the adapter's input only; the frozen path is the pretrained model's, unchanged.

Only A and B train: r (in + out) numbers per matrix instead of in x out, so the optimizer's two AdamW
moments shrink by the same factor. After training, `merge_lora` folds the product into the weight,
W' = W + (alpha / r) B A, and the model is a plain Transformer again, as fast as before.

Like the fast paths (llama_mini.ops.fast_paths), this is a conversion of a built model: `apply_lora` swaps
each targeted nn.Linear (`wq`, `wk`, `wv`, `wo` of attention, `w1`, `w2`, `w3` of the feed-forward) for a
`LoRALinear` that holds it, and freezes every other parameter. The model's own code never changes. PEFT's
adapter files, in and out, are llama_mini.checkpoint.peft.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LORA_TARGETS",
    "LoRALinear",
    "LoRASettings",
    "apply_lora",
    "check_lora_targets",
    "lora_modules",
    "adapter_settings",
    "adapters_disabled",
    "merge_lora",
    "parse_lora_targets",
    "trainable_parameters",
]

# The linear layers LoRA can adapt, by Meta's names: attention's four projections and the feed-forward's
# gate (w1), output (w2) and value (w3) projections. Embeddings and the output layer are not targets.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
DEFAULT_LORA_TARGETS = "wq,wk,wv,wo"  # attention only, the paper's choice (its section 7.1)
_PARENTS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
            "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}  # fmt: skip


def parse_lora_targets(text: str) -> tuple[str, ...]:
    """ "wq,wv" -> ("wq", "wv"): the comma-separated targets of --lora-targets, checked, in LORA_TARGETS
    order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LORA_TARGETS]
    if not names or unknown:
        shown = f"unknown {', '.join(map(repr, unknown))}" if unknown else "none given"
        raise ConfigError(
            f"--lora-targets {text!r}: {shown}; give a comma-separated list of {','.join(LORA_TARGETS)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"--lora-targets {text!r} names a layer twice; give each once")
    return tuple(name for name in LORA_TARGETS if name in names)


@dataclass(frozen=True)
class LoRASettings:
    """What `apply_lora` adds: rank r, scale alpha (the update is scaled by alpha / r), the adapters' input
    dropout, and the targeted layers (names from LORA_TARGETS)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"the LoRA rank must be positive, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        parse_lora_targets(",".join(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: (..., in) -> (..., out).

    forward(x) = base(x) + scaling * lora_B(lora_A(dropout(x)))      scaling = alpha / r

    base     the original layer (its weight W (out, in) frozen, shared, not copied)
    lora_A   nn.Linear(in, r): A (r, in), random like any nn.Linear
    lora_B   nn.Linear(r, out): B (out, r), zero, so a fresh adapter changes nothing

    The names lora_A and lora_B are PEFT's, so state-dict keys map one to one onto PEFT's files.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.bias is not None:
            raise ConfigError("LoRA here adapts bias-free linear layers only, as every llama_mini layer is")
        weight = base.weight
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.lora_B.weight)
        base.weight.requires_grad_(False)
        self.enabled = True  # False: the layer is its frozen base alone (adapters_disabled)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        # Two thin matmuls, x (.., in) -> (.., r) -> (.., out): never the (out, in) product B A itself.
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A (out, in), in the base weight's dtype; summed in float32 at least, so a bf16
        base gains the update's small values instead of rounding them away twice."""
        wide = torch.promote_types(self.base.weight.dtype, torch.float32)
        delta = self.lora_B.weight.detach().to(wide) @ self.lora_A.weight.detach().to(wide)
        return (self.base.weight.detach().to(wide) + self.scaling * delta).to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout.p:g}"


def _targeted_layers(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent module, attribute) of every layer `targets` names: `layers.N.attention.wq`, ..."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 2 or parts[-1] not in targets or parts[-2] != _PARENTS[parts[-1]]:
            continue
        if isinstance(module, (nn.Linear, LoRALinear)):
            parent = model.get_submodule(".".join(parts[:-1]))
            found.append((name, parent, parts[-1]))
    return found


def apply_lora(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Give every layer that `settings.targets` names a LoRA adapter and freeze everything else; in place.

    Returns the names of the adapted layers (`layers.0.attention.wq`, ...). After it, the parameters that
    require gradients are exactly the adapters' A and B (`trainable_parameters`), so an optimizer built
    from those holds nothing for the frozen base. A target that no layer of the model has (w3 in a
    non-gated feed-forward) is a ConfigError naming it. The adapters start at zero: the logits are unchanged.
    """
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; merge them (merge_lora) before adding others")
    layers = _targeted_layers(model, settings.targets)
    missing = [target for target in settings.targets if not any(attr == target for _, _, attr in layers)]
    if missing:
        raise ConfigError(
            f"--lora-targets {','.join(missing)}: no such layer in this model (its feed-forward "
            f"{_ffn_of(model)} has {', '.join(_ffn_layers(model))}); choose from its layers"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, parent, attr in layers:
        setattr(
            parent, attr, LoRALinear(getattr(parent, attr), settings.rank, settings.alpha, settings.dropout)
        )
    return [name for name, _, _ in layers]


def _ffn_of(model: nn.Module) -> str:
    args = getattr(model, "args", None)
    return repr(args.ffn) if isinstance(args, ModelArgs) else "here"


def _ffn_layers(model: nn.Module) -> list[str]:
    names = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    return [target for target in ("w1", "w2", "w3") if target in names]


def check_lora_targets(args: ModelArgs, targets: tuple[str, ...]) -> None:
    """ConfigError now, before any slow work, if a model of shape `args` lacks one of `targets`. The model
    is built on the meta device: shapes only, no memory, no time."""
    with torch.device("meta"):
        apply_lora(Transformer(args), LoRASettings(rank=1, alpha=1.0, targets=targets))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear layers of `model` by name, in the model's order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def adapter_settings(model: nn.Module) -> LoRASettings | None:
    """The settings the adapters of `model` were made with (None without adapters), read from the modules."""
    modules = lora_modules(model)
    if not modules:
        return None
    first = next(iter(modules.values()))
    targets = {name.rsplit(".", 1)[-1] for name in modules}
    return LoRASettings(
        rank=first.rank,
        alpha=first.alpha,
        dropout=first.dropout.p,
        targets=tuple(target for target in LORA_TARGETS if target in targets),
    )


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block, every LoRALinear of `model` computes its frozen base alone: the model is the one the
    adapters were trained from, without a second copy of it (preference tuning's reference model)."""
    layers = list(lora_modules(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers an optimizer updates: parameters that require gradients, a tied matrix once."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its layer, W <- W + (alpha / r) B A, and put the plain nn.Linear back; in place.

    The model is a plain Transformer again: the same function (up to the rounding of one addition), the
    same speed, saved and loaded like any other. Its weights stay frozen (requires_grad False).
    """
    for name, module in lora_modules(model).items():
        module.base.weight.copy_(module.merged_weight())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.base)
    return model
