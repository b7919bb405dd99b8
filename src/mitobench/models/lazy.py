"""Stand-ins for torch and timm classes in the cards' build arguments.

Cards are read on every run, but a warm run never builds a model; importing torch and timm only to
write ``nn.SiLU`` into a card would cost it seconds. A ``Lazy`` names the class, imports it when the
model is built (``resolve_lazy``) and has the real object's repr, because the embedding cache key holds
``repr`` of every build argument: swapping the real object for its stand-in changes no key.
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Any


class Lazy:
    """``module.name`` (or ``partial(module.name, **kwargs)``), imported on first use."""

    def __init__(self, module: str, name: str, real_repr: str, **kwargs: Any):
        self.module, self.name, self.kwargs, self._repr = module, name, kwargs, real_repr

    def resolve(self) -> Any:
        obj = getattr(importlib.import_module(self.module), self.name)
        return partial(obj, **self.kwargs) if self.kwargs else obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return self._repr


def resolve_lazy(value: Any) -> Any:
    """The real object for a ``Lazy``; any other value unchanged."""
    return value.resolve() if isinstance(value, Lazy) else value
