"""The optimizer and its learning-rate schedule.

lr(step) = linear warmup over warmup_steps, then a cosine from lr down to min_lr at max_steps

    --optimizer adamw   AdamW over the trainable parameters, weight decay on matrices only
    --optimizer muon    torch.optim.Muon (Jordan et al. 2024) on the blocks' matrices (attention,
                        feed-forward, LoRA's A and B) at --muon-lr; AdamW on everything else (embeddings,
                        norms, the output layer) at --lr. Both follow the same schedule, each scaled to its
                        own peak. Under DDP every process orthogonalizes the whole all-reduced gradient;
                        under FSDP torch's Muon runs on the sharded matrices (DTensors), whose matmuls
                        gather what each product needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llama_mini.errors import ConfigError
from llama_mini.train.config import TrainConfig

__all__ = [
    "JointOptimizer",
    "check_optimizer",
    "learning_rate",
    "make_optimizer",
    "muon_available",
    "partition_for_muon",
    "set_learning_rates",
]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from `lr` down to `min_lr` at `max_steps`.

    Warmup keeps the first updates, made while Adam's moment estimates are still noisy, small.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    progress = min(progress, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> None:
    """Every parameter group's learning rate at `step`: AdamW's groups follow `learning_rate`, Muon's the
    same curve scaled from --lr to --muon-lr (warmup and decay alike)."""
    adamw = learning_rate(step, config)
    for group in optimizer.param_groups:  # Muon's groups are those with its Newton-Schulz settings
        group["lr"] = adamw * config.muon_lr / config.lr if "ns_steps" in group else adamw


def muon_available() -> bool:
    """torch.optim.Muon arrived in torch 2.9."""
    return hasattr(torch.optim, "Muon")


def partition_for_muon(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the parameters Muon updates, names of those AdamW updates), trainable ones only.

    Muon orthogonalizes each update of a matrix that maps one hidden representation to another: the 2-D
    weights inside the blocks (layers.*): wq, wk, wv, wo, w1, w2, w3, and LoRA's A and B. The embedding
    (a lookup table: each row sees only its own token's gradient), the output layer (its update follows the
    vocabulary's frequencies) and the vectors (norm scales, a learned swish beta) stay with AdamW, as in
    Jordan et al. and Moonlight."""
    muon, adamw = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (muon if name.startswith("layers.") and parameter.dim() == 2 else adamw).append(name)
    return muon, adamw


def check_optimizer(config: TrainConfig) -> None:
    """Refuse, before any slow work, an --optimizer this torch cannot run."""
    if config.optimizer != "muon":
        return
    if not muon_available():
        raise ConfigError(
            f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon; this is {torch.__version__}): "
            "pip install -U torch, or use --optimizer adamw"
        )


def make_optimizer(model: nn.Module, config: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """The optimizer of `model`'s trainable parameters: AdamW alone, or Muon and AdamW (--optimizer)."""
    params = dict(model.named_parameters())
    if config.optimizer == "adamw":
        return make_adamw([p for p in params.values() if p.requires_grad], config, fused)
    check_optimizer(config)
    muon_names, adamw_names = partition_for_muon(model)
    parts: list[torch.optim.Optimizer] = []
    if muon_names:
        parts.append(
            torch.optim.Muon(
                [params[name] for name in muon_names],
                lr=config.muon_lr,
                weight_decay=config.muon_weight_decay,
                momentum=config.muon_momentum,
                nesterov=True,
                adjust_lr_fn="original",  # lr * sqrt(max(1, rows / columns)): torch's documented default
            )
        )
    if adamw_names:  # a LoRA run's adapters all lie in the blocks: nothing for AdamW
        parts.append(make_adamw([params[name] for name in adamw_names], config, fused))
    return JointOptimizer(parts)


def make_adamw(params: list[torch.Tensor], config: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over `params`, with weight decay on matrices (embeddings, projections, LoRA's A and B) but not
    on vectors (norm weights, beta).

    Decaying a norm's scale toward 0 only fights the normalisation; matrices are what decay regularises.
    Frozen parameters (requires_grad False: a LoRA run's base model) are left out by the caller, so AdamW
    keeps its two moments, 8 bytes per number in float32, for the adapters only. `fused`: the fused kernel
    updates all parameters in one launch instead of several per tensor.
    """
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]  # LoRA has no vectors to train
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)


class JointOptimizer(torch.optim.Optimizer):
    """Several torch optimizers, each over its own parameters, as one: one `step`, one `zero_grad`, one
    state dict, one `param_groups` list (the parts' groups in order) and one `state` (keyed by parameter,
    which the parts share), so the trainer, the gradient scaler and the checkpoints (sharded_state.py reads
    `state` by parameter) treat it as any optimizer.

    torch has no such combinator; the parts keep torch's own update rules, and this class only keeps
    their groups and state in the one place a checkpoint reads and writes."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts
        super().__init__([group for part in parts for group in part.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point each part at its slice of `param_groups` (the same dicts) and at the one `state`."""
        start = 0
        for part in self.parts:
            count = len(part.param_groups)
            part.param_groups = self.param_groups[start : start + count]
            part.state = self.state
            start += count

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state: share them again
        self._share()
