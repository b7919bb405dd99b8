"""Freeze a backbone's stem and first stages (``train.freeze_stages``).

The early layers of a CNN run at the highest resolution, so their backward pass is a large part of a
CPU training step. Frozen stages keep their pretrained weights and BatchNorm statistics, and autograd
records nothing for them: faster, but on H&E patches the early filters gain from adapting (see
docs/training.md), so the CPU preset does not freeze. Stages follow timm's coarse ``group_matcher`` (the stem, then ``blocks.N``), so the same
option works for EfficientNets, ConvNeXts, ViTs (a stage is one block) and any timm backbone.
"""

from __future__ import annotations

from torch import nn

from mitobench.errors import MitobenchError


def stage_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone, grouped as [stem, stage 1, stage 2, ...] (head-side groups last)."""
    from timm.models._manipulate import group_parameters

    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        raise MitobenchError(f"{type(model).__name__} has no timm group_matcher, so its stages are unknown: "
                             "train.freeze_stages needs a timm backbone; set it to 0.")
    groups = group_parameters(model, matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def freeze_stages(classifier: nn.Module, n_stages: int, freeze_norm_stats: bool = True) -> list[str]:
    """Freeze the stem and the first ``n_stages`` stages; return the frozen parameter names.

    With ``freeze_norm_stats`` their BatchNorm layers stay in eval mode during training
    (``Classifier.train`` sees to that); without, they normalise with batch statistics and update their
    running statistics as usual (still no gradient flows into them).
    """
    if n_stages <= 0:
        return []
    model = classifier.backbone.model
    groups = stage_groups(model)
    if n_stages + 2 > len(groups):  # the last group (the final stage or the head's norm) always trains
        raise MitobenchError(f"train.freeze_stages={n_stages} leaves no stage of {classifier.backbone.card.key} to train: "
                             f"use at most {len(groups) - 2}.")
    names = [name for group in groups[:n_stages + 1] for name in group]
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    owners = {name.rsplit(".", 1)[0] for name in names}
    modules = dict(model.named_modules())
    frozen = [modules[o] for o in sorted(owners) if freeze_norm_stats
              and isinstance(modules.get(o), nn.modules.batchnorm._BatchNorm)]
    already = {id(m) for m in classifier.frozen_norms}  # a method may have frozen some (LoRA: all of them)
    classifier.frozen_norms = [*classifier.frozen_norms, *(m for m in frozen if id(m) not in already)]
    return names
