"""Structured sparse fine-tuning (S2FT): selected heads/channels co-permuted into dense
slices, trained with slice-only weight gradients, saved as small fuse-able adapters.

See README.md. ``train`` trains any set of parameters (S2FT deltas, LoRA, the full model);
importing this package registers the ``s2ft`` recipe step (``config.py``). The configs are plain
pydantic; every other name imports torch, so it is bound on first use.
"""
from compress.deferred import deferred_names
from compress.finetune.config import S2FTConfig, S2FTStepConfig, TrainConfig  # registers "s2ft"

_WHERE = {
    "adapter": ("ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "S2FTHandle", "apply_s2ft", "load_adapter", "read_adapter",
                "s2ft_config", "save_adapter", "switch_adapter"),
    "data": ("IGNORE", "check_dataset", "collate", "instruction_dataset", "lm_dataset", "micro_batches",
             "topic_dataset", "topic_pairs"),
    "partial": ("S2FTLinear", "SliceLinearFunction"),
    "select": ("Selection", "decoder_blocks", "select_units"),
    "steps": ("AdapterSnapshot", "s2ft_step"),
    "training": ("TrainResult", "labelled_loss_sum", "latest_checkpoint", "train"),
}
__getattr__ = deferred_names(__name__, {name: f"compress.finetune.{module}" for module, names in _WHERE.items()
                                        for name in names})

__all__ = ["S2FTConfig", "S2FTStepConfig", "TrainConfig", *sorted(n for names in _WHERE.values() for n in names)]
