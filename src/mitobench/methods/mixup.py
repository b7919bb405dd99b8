"""Mixup (Zhang et al., ICLR 2018) for one-logit training (``train.mixup``).

Each batch becomes ``lam * x + (1 - lam) * x[perm]`` with the (possibly soft) targets mixed by the same
``lam ~ Beta(alpha, alpha)``. It regularises a network fine-tuned on a few thousand patches at no
extra compute. ``lam`` is drawn from the engine's generator by inverse CDF, so a resumed fold draws
the same values as an uninterrupted one.
"""

from __future__ import annotations

import torch
from scipy.stats import beta


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a shuffled copy of itself; return the images, the targets and ``lam``."""
    lam = float(beta.ppf(torch.rand((), generator=generator).item(), alpha, alpha))
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm], lam
