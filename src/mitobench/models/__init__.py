"""Backbones: model cards in a registry, built offline, with their official feature recipe.

The names below load on first use (PEP 562), so reading a card never imports torch.
"""

from __future__ import annotations

from typing import Any

_CARDS = ("ModelCard", "get_card", "list_cards", "register")
_BUILD = ("Backbone", "create_backbone")
__all__ = [*_CARDS, *_BUILD]


def __getattr__(name: str) -> Any:
    if name in _CARDS:
        from mitobench.models import cards

        return getattr(cards, name)
    if name in _BUILD:
        from mitobench.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'mitobench.models' has no attribute {name!r}")
