"""Structured pruning that physically shrinks the model: NIRVANA and baselines on the same units.

Importing this package registers the recipe steps nirvana, taylor, wanda and magnitude
(``config.py``); the module surgery below imports torch, so its names are bound on first use.
"""
from compress.deferred import deferred_names
from compress.prune import config  # noqa: F401  (registers the steps)

__all__ = ["apply_pruned_layers", "remove_units", "block_parts", "layer_dims"]
__getattr__ = deferred_names(__name__, {"apply_pruned_layers": "compress.prune.shrink",
                                        "remove_units": "compress.prune.shrink",
                                        "block_parts": "compress.prune.units", "layer_dims": "compress.prune.units"})
