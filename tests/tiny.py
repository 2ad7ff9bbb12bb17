"""Tiny in-process models and tokenizers shared by the tests."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

# Shapes chosen to exercise the real code paths: grouped-query attention
# (4 query heads on 2 KV heads), a partial last quantization group
# (hidden 160 = 128 + 32) and more than one block.
_COMMON = dict(
    vocab_size=256 + 8, hidden_size=160, intermediate_size=320, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=40, max_position_embeddings=512,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def tiny_config(arch: str = "llama"):
    if arch == "llama":
        return LlamaConfig(**_COMMON)
    if arch == "qwen2":
        return Qwen2Config(**_COMMON)
    raise ValueError(f"unknown tiny arch {arch!r}")


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


TINY_ARCHS = ("llama", "qwen2")


def byte_tokenizer():
    """Byte-level BPE tokenizer with no merges: token id == byte value (256 ids), plus
    ``<|endoftext|>`` (id 256) as eos/pad so it fits the tiny models' 256 + 8 vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable-char table, which is what ByteLevel.alphabet() contains.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {ch: b for b, ch in chars.items()}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_model_dir(path, arch: str = "llama", seed: int = 0):
    """Save a tiny model and the byte tokenizer as a Hugging Face directory; return its path."""
    model = tiny_model(arch, seed)
    tok = byte_tokenizer()
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "\n\n"
        "Calibration data should look like the text the model will see. " * 2 + "\n\n") * 40
