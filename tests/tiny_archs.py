"""Tiny random-initialised models of every architecture the coverage table claims (README), built
from transformers' own config classes: hidden 64, 2 layers, 4 experts for the mixtures of experts.

Widths are multiples of 32 so that every projection packs at 2/3/4/8 bits; attention is grouped
(4 query heads on 2 KV heads) wherever the architecture has it.
"""
from __future__ import annotations

import torch

from tests.tiny import byte_tokenizer

_COMMON = dict(vocab_size=256 + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               tie_word_embeddings=False)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def _configs():
    import transformers as t

    return {
        "llama": lambda: t.LlamaConfig(**_COMMON),
        "qwen2": lambda: t.Qwen2Config(**_COMMON),
        "qwen3": lambda: t.Qwen3Config(**_COMMON),
        "mistral": lambda: t.MistralConfig(**_COMMON),
        # gemma: alternating sliding / global attention with a window shorter than the calibration
        # windows, so that a block replayed with another block's mask or rotary would be caught.
        "gemma2": lambda: t.Gemma2Config(**{**_COMMON, "tie_word_embeddings": True}, sliding_window=8),
        "gemma3": lambda: t.Gemma3TextConfig(**{**_COMMON, "tie_word_embeddings": True}, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: t.Phi3Config(**{k: v for k, v in _COMMON.items() if k != "head_dim"}, pad_token_id=256,
                                      bos_token_id=1, eos_token_id=256),
        "mixtral": lambda: t.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(**_COMMON, **_MOE, shared_expert_intermediate_size=64),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**_COMMON, **_MOE),
    }


COVERAGE_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe",
                  "qwen3_moe")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


def arch_config(arch: str):
    try:
        return _configs()[arch]()
    except KeyError:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(COVERAGE_ARCHS)}") from None


def arch_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_config(arch), dtype=torch.float32)
    return model.eval()


def arch_model_dir(path, arch: str, seed: int = 0, max_shard_size: str | None = None) -> str:
    """Save the tiny ``arch`` model and the byte tokenizer as a Hugging Face folder (in shards of at
    most ``max_shard_size`` where given); return its path."""
    model = arch_model(arch, seed)
    tok = byte_tokenizer()
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(path)
    return str(path)
