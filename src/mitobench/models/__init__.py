"""Backbones: model cards in a registry, built offline, with their official feature recipe."""

from mitobench.models.registry import Backbone, ModelCard, create_backbone, get_card, list_cards, register  # noqa: F401
