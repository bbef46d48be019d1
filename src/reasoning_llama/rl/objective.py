"""The arithmetic of GRPO-style training, kept apart from models and sampling so it can be checked by hand.

Per step, G samples answer each of B prompts. A sample's advantage is its reward minus its group's
mean (optionally over the group's standard deviation): better than its siblings pushes up, worse
pushes down, and a group whose rewards are all equal carries no signal. Every sampled token of a
sample shares its advantage. The objective is PPO's clipped surrogate, normalised by the number of
sampled tokens in the whole batch (DAPO's token-level form, which nanochat and TRL default to), so a
long answer counts token for token like a short one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, *, normalize_std: bool = False, eps: float = 1e-6) -> Tensor:
    """(B, G) rewards -> (B, G) advantages: reward minus the group mean (over the group std if asked)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centred


def zero_signal_groups(rewards: Tensor) -> Tensor:
    """(B,) bool: groups whose rewards are all equal (every advantage is 0)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def clipped_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    n_tokens: int,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate over sampled tokens (1-D tensors of the same length), summed / n_tokens.

    Returns (loss, share of tokens the clip cut: those whose clipped term is the smaller, so their
    gradient is zero; a ratio outside the range whose unclipped term is the smaller still learns). On
    the first update of a batch
    `old_log_probs` equals `log_probs` (detached): every ratio is 1 and the gradient is the plain
    policy gradient, -sum_t A_t grad log p_t / n_tokens. `n_tokens` is the batch's sampled-token count,
    so splitting a batch into pieces and summing their losses gives the whole batch's loss.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped).sum() / max(n_tokens, 1)
    was_clipped = (clipped < unclipped).float().sum() / max(n_tokens, 1)
    return loss, was_clipped.detach()


def kl_estimate(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens: exp(r) - r - 1, r = ref - policy.

    Schulman's k3: non-negative, unbiased, and low-variance when the two are close.
    """
    r = ref_log_probs - log_probs
    return torch.exp(r) - r - 1.0
