"""Structured sparse fine-tuning (S2FT): selected heads/channels co-permuted into dense
slices, trained with slice-only weight gradients, saved as small fuse-able adapters.

See README.md. The training loop lives elsewhere; it trains ``handle.parameters()``.
"""
from compress.finetune.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, S2FTHandle, apply_s2ft,
                                       load_adapter, read_adapter, s2ft_config, save_adapter,
                                       switch_adapter)
from compress.finetune.partial import S2FTLinear, SliceLinearFunction
from compress.finetune.select import S2FTConfig, Selection, decoder_blocks, select_units

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "S2FTConfig", "S2FTHandle", "S2FTLinear", "Selection",
    "SliceLinearFunction", "apply_s2ft", "decoder_blocks", "load_adapter", "read_adapter",
    "s2ft_config", "save_adapter", "select_units", "switch_adapter",
]
