"""The optimizer and its learning-rate schedule.

lr(step) = linear warmup over warmup_steps, then a cosine from lr down to min_lr at max_steps
AdamW over the trainable parameters, weight decay on matrices only
"""

from __future__ import annotations

import math

import torch

from llama_mini.train.config import TrainConfig

__all__ = ["learning_rate", "make_optimizer"]


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
    """AdamW over the trainable parameters, with weight decay on matrices (embeddings, projections, LoRA's
    A and B) but not on vectors (norm weights, beta).

    Decaying a norm's scale toward 0 only fights the normalisation; matrices are what decay regularises.
    Frozen parameters (requires_grad False: a LoRA run's base model) are left out, so AdamW keeps its two
    moments, 8 bytes per number in float32, for the adapters only. `fused`: the fused kernel updates all
    parameters in one launch instead of several per tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]  # LoRA has no vectors to train
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)
