"""Preference losses over pairs of answers: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023).

For a prompt x with a preferred answer y_w ("chosen") and a worse one y_l ("rejected"), the policy pi (the
model being trained) and the reference ref (the model it started from, frozen):

    log pi(y | x)  = sum over the answer's tokens t of log pi(y_t | x, y_<t)    (not the prompt's tokens)
    r(y)           = beta * (log pi(y | x) - log ref(y | x))                     the implicit reward
    delta          = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))

    sigmoid (DPO): loss = -log sigmoid(beta * delta)           = ln 2 when pi = ref (delta = 0)
    ipo (IPO):     loss = (delta_avg - 1 / (2 beta))^2          delta_avg: each log-ratio divided by its
                                                                answer's token count

IPO's squared distance grows with the answer's length when the log-probabilities are summed, so, as TRL's
DPOTrainer does (its comment: the IPO authors' reported results use this form), each answer's log-ratio is
averaged over its tokens before the difference is taken. The logged rewards are the summed ones, beta times
the log-ratios, for both losses (as TRL logs them).

The logged metrics, means over the pairs of a batch: reward_accuracy (the share of pairs with
r(y_w) > r(y_l)), reward_margin (r(y_w) - r(y_l)), chosen_reward and rejected_reward.

A batch holds its pairs as 2B rows, the B chosen answers then the B rejected ones, each row the prompt and
the answer, with IGNORE_INDEX targets everywhere but on the answer's tokens. Everything here is float32 at
least: the log-softmax, the sums over tokens and the loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_mini.errors import ConfigError
from llama_mini.ops.loss import IGNORE_INDEX

__all__ = [
    "PREFERENCE_LOSSES",
    "PREFERENCE_METRICS",
    "PreferenceLoss",
    "PreferenceLossName",
    "preference_loss",
    "sequence_log_probs",
]

PreferenceLossName = Literal["sigmoid", "ipo"]
PREFERENCE_LOSSES = ("sigmoid", "ipo")
# What PreferenceLoss returns, in this order: the loss first, then the metrics the run logs.
PREFERENCE_METRICS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def sequence_log_probs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of log p(target) over each row's counted targets, how many were counted): logits (N, T, V),
    targets (N, T) with IGNORE_INDEX where a position does not count -> (N,), (N,), float32 at least."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    counted = targets != IGNORE_INDEX
    # log_softmax's value at the target = -cross_entropy; ignored positions give 0 and are masked anyway.
    token_log_probs = -F.cross_entropy(
        wide.transpose(1, 2), targets.masked_fill(~counted, 0), reduction="none"
    )
    return (token_log_probs * counted).sum(dim=1), counted.sum(dim=1).to(wide.dtype)


def preference_loss(
    policy: Tensor,
    reference: Tensor,
    lengths: Tensor,
    beta: float,
    kind: PreferenceLossName = "sigmoid",
) -> Tensor:
    """The loss and metrics of a batch of pairs, as a (5,) tensor in PREFERENCE_METRICS order (only the loss
    carries a gradient).

    policy, reference: (2B,) summed log-probabilities of the answers under the policy and the reference, the
    B chosen answers first; lengths (2B,): each answer's token count (IPO's averages). See the module
    docstring for the formulas."""
    if kind not in PREFERENCE_LOSSES:
        raise ConfigError(f"unknown preference loss {kind!r}: choose one of {', '.join(PREFERENCE_LOSSES)}")
    policy = policy.to(torch.promote_types(policy.dtype, torch.float32))
    log_ratios = policy - reference.to(policy.dtype)
    chosen, rejected = log_ratios.chunk(2)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    else:
        chosen_length, rejected_length = lengths.to(policy.dtype).clamp(min=1).chunk(2)
        losses = (chosen / chosen_length - rejected / rejected_length - 1 / (2 * beta)) ** 2
    chosen_reward, rejected_reward = beta * chosen.detach(), beta * rejected.detach()
    metrics = torch.stack(
        [
            (chosen_reward > rejected_reward).to(policy.dtype).mean(),
            (chosen_reward - rejected_reward).mean(),
            chosen_reward.mean(),
            rejected_reward.mean(),
        ]
    )
    return torch.cat([losses.mean().reshape(1), metrics])


class PreferenceLoss(nn.Module):
    """The preference objective around a model: (tokens, targets (2B, T), reference (2B,)) -> the (5,)
    tensor of `preference_loss` (loss first). Like NextTokenLoss (llama_mini.ops.loss), it holds the model as
    its submodule "model", so training calls, compiles and wraps it in DDP or FSDP the same way."""

    def __init__(self, model: nn.Module, beta: float, kind: PreferenceLossName = "sigmoid"):
        super().__init__()
        if not beta > 0 or not math.isfinite(beta):
            raise ConfigError(f"the preference loss's beta must be positive, got {beta}")
        self.model, self.beta, self.kind = model, beta, kind

    def forward(self, tokens: Tensor, targets: Tensor, reference: Tensor | None = None) -> Tensor:
        """Without `reference`: the (2B,) summed log-probabilities of the answers themselves, which is how
        the reference's are computed, through the same module (under FSDP, the root that must run first)."""
        policy, lengths = sequence_log_probs(self.model(tokens), targets)
        if reference is None:
            return policy
        return preference_loss(policy, reference, lengths, self.beta, self.kind)
