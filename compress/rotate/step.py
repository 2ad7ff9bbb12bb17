"""The ``rotate`` step: fold the RMSNorm weights into the linears, then rotate the residual stream.

For a row vector h of the residual stream and an orthogonal Q, RMSNorm(h·Q) = RMSNorm(h)·Q once the
norm's weight is 1 (‖h·Q‖ = ‖h‖), so the whole model can run in the basis h' = h·Q:
  - each norm's weight g is folded into the linears that read its output (W ← W·diag(g)), g ← 1;
  - embeddings E ← E·Q; every linear reading the stream (q, k, v, gate, up; the LM head) W ← W·Q;
  - every linear writing it (o, down) W ← Qᵀ·W (a bias b ← b·Q).
Optionally each head's values are rotated too, v ← v·R (R of the head size): v_proj's rows of each
head ← Rᵀ·W_h, o_proj's columns of each head ← W_h·R; attention mixes tokens, not features, so it
commutes. All of it is offline and exact (float64, then cast back): the export is a plain
checkpoint of the same architecture with no runtime op. Tied embeddings are untied only when the
final norm's folded weight makes the LM head differ from the embeddings; the bytes it costs are
reported.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.algorithms import StepContext
from compress.errors import CompressError
from compress.rotate.config import RotateConfig
from compress.rotate.hadamard import rotation

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")  # RMSNorm (weight · x̂, no offset), pre-norm blocks
READ_ATTN, READ_MLP, WRITES = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj", "down_proj")


def _set(p: nn.Parameter, value: torch.Tensor) -> None:
    p.data.copy_(value.to(p.dtype))


def _fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.data.double()
    for lin in readers:
        _set(lin.weight, lin.weight.data.double() * g[None, :])
    norm.weight.data.fill_(1.0)


def _check(model: nn.Module) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise CompressError(f"rotate: model type {kind!r} is not supported (supported: {', '.join(SUPPORTED)}); "
                            f"its norms or block layout may not commute with a rotation")
    for i, block in enumerate(model.model.layers):
        norms = {n for n, m in block.named_modules() if "norm" in type(m).__name__.lower()} - {
            "self_attn.q_norm", "self_attn.k_norm"}  # qwen3's per-head norms act after the rotation is undone
        if norms != {"input_layernorm", "post_attention_layernorm"}:
            raise CompressError(f"rotate: block {i} has norms {sorted(norms)}; only pre-norm blocks (input_layernorm, "
                                f"post_attention_layernorm) are rotated")


def _untie_if_needed(model: nn.Module) -> dict:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    final = model.model.norm.weight.data
    if not tied or bool((final == 1).all()):
        return {"tied": tied, "untied": False, "untie_bytes": 0}
    head.weight = nn.Parameter(emb.weight.data.clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    n = head.weight.numel()
    return {"tied": True, "untied": True, "untie_bytes": n * head.weight.element_size(), "untie_bytes_fp16": 2 * n,
            "why": "the final norm's weight is folded into the LM head, not into the embeddings"}


@torch.no_grad()
def rotate_model(model: nn.Module, cfg: RotateConfig) -> dict:
    """Fold and rotate ``model`` in place (see the module doc); returns what was done."""
    _check(model)
    report = _untie_if_needed(model)
    layers = model.model.layers
    for block in layers:
        _fold(block.input_layernorm, [getattr(block.self_attn, n) for n in READ_ATTN])
        _fold(block.post_attention_layernorm, [getattr(block.mlp, n) for n in READ_MLP])
    head = model.get_output_embeddings()
    _fold(model.model.norm, [head])
    emb = model.get_input_embeddings()
    n = emb.weight.shape[1]
    Q, what = rotation(n, cfg.kind, cfg.seed)
    Q = Q.to(emb.weight.device)
    _set(emb.weight, emb.weight.data.double() @ Q)
    if head.weight is not emb.weight:  # tied and untouched by the fold: already rotated with E
        _set(head.weight, head.weight.data.double() @ Q)
    for block in layers:
        for lin in [getattr(block.self_attn, n) for n in READ_ATTN] + [getattr(block.mlp, n) for n in READ_MLP]:
            _set(lin.weight, lin.weight.data.double() @ Q)
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            _set(lin.weight, Q.T @ lin.weight.data.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.data.double() @ Q)
    report.update(hidden_size=n, rotation=what, seed=cfg.seed, folded_norms=2 * len(layers) + 1)
    if cfg.values:
        report["values"] = _rotate_values(model, cfg)
    return report


def _rotate_values(model: nn.Module, cfg: RotateConfig) -> str:
    cfg_ = model.config
    hd = getattr(cfg_, "head_dim", None) or cfg_.hidden_size // cfg_.num_attention_heads
    R, what = rotation(hd, cfg.kind, cfg.seed + 1)
    for i, block in enumerate(model.model.layers):
        v, o = block.self_attn.v_proj, block.self_attn.o_proj
        if v.out_features % hd or o.in_features % hd:
            raise CompressError(f"rotate: block {i}'s v_proj ({v.out_features}) / o_proj ({o.in_features}) are not "
                                f"whole heads of {hd}")
        Rd = R.to(v.weight.device)
        wv = v.weight.data.double().view(-1, hd, v.in_features)  # [heads, hd, hidden]
        _set(v.weight, torch.einsum("dk,hdi->hki", Rd, wv).reshape(v.weight.shape))  # Rᵀ·W_h per head
        if v.bias is not None:
            _set(v.bias, (v.bias.data.double().view(-1, hd) @ Rd).reshape(-1))
        wo = o.weight.data.double().view(o.out_features, -1, hd)  # [hidden, heads, hd]
        _set(o.weight, (wo @ Rd).reshape(o.weight.shape))
    return f"{what}, per head ({hd})"


def _probe_logits(model: nn.Module, device) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(32, device=device) * 7919 % vocab)[None]
    return model(input_ids=ids, use_cache=False).logits.double()


def apply_rotate(model: nn.Module, cfg: RotateConfig, ctx: StepContext) -> dict:
    """Fold the RMSNorm weights and rotate the residual stream (and each head's values) in place."""
    device = next(model.parameters()).device
    with torch.no_grad():
        before = _probe_logits(model, device) if cfg.check else None
        report = rotate_model(model, cfg)
        if before is not None:
            after = _probe_logits(model, device)
            report["max_rel_change"] = float((after - before).abs().max() / before.abs().max())
    ctx.state.rotation = report
    return report
