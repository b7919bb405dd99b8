"""Give one module a mixin's forward by swapping its class for a cached subclass ``(mixin, original class)``.

Parameter names, state dicts, deep copies and checkpoints stay as they are, which a wrapper module would change.
Used for the fast depthwise convolutions (methods/precision.py) and the fused LoRA layers (methods/fused_lora.py).
"""

from __future__ import annotations

from torch import nn

_SUBCLASSES: dict[tuple[type, type], type] = {}


def mix_in(module: nn.Module, mixin: type, prefix: str) -> None:
    """Make ``module`` an instance of ``prefix + its class name``, subclass of ``(mixin, its class)``; idempotent."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    if (mixin, cls) not in _SUBCLASSES:
        _SUBCLASSES[(mixin, cls)] = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _SUBCLASSES[(mixin, cls)]
