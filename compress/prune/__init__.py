"""Structured pruning that physically shrinks the model: NIRVANA and baselines on the same units.

Importing this package registers the recipe steps nirvana, taylor, wanda and magnitude.
"""
from compress.prune import steps  # noqa: F401
from compress.prune.shrink import apply_pruned_layers, remove_units
from compress.prune.units import block_parts, layer_dims

__all__ = ["apply_pruned_layers", "remove_units", "block_parts", "layer_dims"]
