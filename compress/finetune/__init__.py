"""Structured sparse fine-tuning (S2FT): selected heads/channels co-permuted into dense
slices, trained with slice-only weight gradients, saved as small fuse-able adapters.

See README.md. ``train`` trains any set of parameters (S2FT deltas, LoRA, the full model);
importing this package registers the ``s2ft`` recipe step.
"""
from compress.finetune.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, S2FTHandle, apply_s2ft,
                                       load_adapter, read_adapter, s2ft_config, save_adapter,
                                       switch_adapter)
from compress.finetune.data import (IGNORE, check_dataset, collate, instruction_dataset, lm_dataset,
                                    micro_batches, topic_dataset, topic_pairs)
from compress.finetune.partial import S2FTLinear, SliceLinearFunction
from compress.finetune.select import S2FTConfig, Selection, decoder_blocks, select_units
from compress.finetune.steps import AdapterSnapshot, S2FTStepConfig, s2ft_step  # registers "s2ft"
from compress.finetune.train import TrainConfig, TrainResult, labelled_loss_sum, latest_checkpoint, train

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "IGNORE", "AdapterSnapshot", "S2FTConfig", "S2FTHandle",
    "S2FTLinear", "S2FTStepConfig", "Selection", "SliceLinearFunction", "TrainConfig", "TrainResult",
    "apply_s2ft", "check_dataset", "collate", "decoder_blocks", "instruction_dataset", "labelled_loss_sum",
    "latest_checkpoint", "lm_dataset", "load_adapter", "micro_batches", "read_adapter", "s2ft_config",
    "s2ft_step", "save_adapter", "select_units", "switch_adapter", "topic_dataset", "topic_pairs", "train",
]
