"""Losses on one logit (atypical = 1): BCE, class-weighted BCE, focal; label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_loss(name: str, pos_weight: float, gamma: float = 2.0, smoothing: float = 0.0):
    """Return ``loss(logits, targets)``; targets may be soft (expert vote fractions)."""

    def smooth(t: torch.Tensor) -> torch.Tensor:
        return t * (1 - smoothing) + 0.5 * smoothing if smoothing else t

    if name == "bce":
        return lambda z, t: F.binary_cross_entropy_with_logits(z, smooth(t))
    if name == "weighted_bce":
        pw = torch.tensor(pos_weight)
        return lambda z, t: F.binary_cross_entropy_with_logits(z, smooth(t), pos_weight=pw.to(z))
    if name == "focal":
        alpha = pos_weight / (1 + pos_weight)

        def focal(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = smooth(t)
            ce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
            p = torch.sigmoid(z)
            p_t = p * t + (1 - p) * (1 - t)
            a_t = alpha * t + (1 - alpha) * (1 - t)
            return (a_t * (1 - p_t) ** gamma * ce).mean()

        return focal
    from mitobench.errors import MitobenchError

    raise MitobenchError(f"unknown loss {name!r}: use bce, weighted_bce or focal")
