"""The exit head of a shared-prefix self-drafter, its trimmed vocabulary and its files.

A self-drafter is the target's first k blocks (the target's own weights, never copied; k = 0 for a
deep head, which then reads the token's embedding, as EAGLE's head does) followed by an *exit head*:
one decoder layer of the target's shape (it starts as a copy of the target's last block, or of
block k, the block it stands in for: ``init="next"``, and by default at depth 0), an RMSNorm, and
the target's LM head restricted to a trimmed vocabulary — the N most frequent tokens of the
training text (VocabTrim / FR-Spec), EOS always among them. A token outside the trimmed vocabulary can never be drafted: when
the target wants one, the draft is rejected there and the target's own token is committed, as with
any rejection.

Context. A ``shallow`` head reads h_k alone. A ``deep`` head (EAGLE's lesson, on Kangaroo's shared
prefix) also reads the target's *final* state of the previous position — the output of its final
norm, which the verify pass has already computed for every committed position — through a
zero-initialised linear map added to h_k: at the start of a round the head knows what the whole
target made of the context, not only what k blocks did. For the second and later drafts of a round
that state does not exist yet, so the head feeds itself its own normed output of the previous draft
(the same space: it goes into the same LM head). ``forward_unrolled`` trains and scores exactly that
recurrence on whole windows at once (EAGLE-3's "training-time test"). A deep head with a ``mid_layer``
m (k < m < L) also reads the target's state after block m of the previous position, RMS-normalised,
through a second zero-initialised map (EAGLE-3 fuses a low, a middle and a high layer); the verify pass
computes that state anyway. A round's later drafts have none (their previous position is a draft): the
term is zero there.

Files (an export folder, ``self_spec.json`` naming everything): ``head-<name>.safetensors`` per
head (layer, norm and the vocabulary map; the trimmed LM-head rows are re-gathered from the
target at load time, or saved with the head where they were trained: ``lm_rows="trained"``),
the target's fingerprint (a head only runs on the target it was trained for), and the chosen
depth, draft length and confidence threshold.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from compress.draft.engine import _ACTS, _rms, _rope, check_engine_model
from compress.errors import CompressError

MANIFEST = "self_spec.json"
CONTEXTS = ("shallow", "deep")
INITS = ("auto", "last", "next")
LM_ROWS = ("frozen", "trained")
FORMAT = "self-spec"


def eos_ids(model) -> set[int]:
    ids = set()
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            ids |= {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}
    return ids


def trimmed_vocabulary(token_lists: Iterable[Iterable[int]], size: int, *, vocab_size: int,
                       always: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent ids of the given token sequences (ties by id), plus ``always``
    (e.g. EOS), sorted; at most ``vocab_size`` ids. Rarer ids pad the list when the text has fewer."""
    if size < 1:
        raise CompressError(f"the trimmed vocabulary size must be >= 1, got {size}")
    always = sorted({int(t) for t in always})
    counts = Counter()
    for ids in token_lists:
        counts.update(int(t) for t in ids)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    keep = set(always)
    for t in ranked:
        if len(keep) >= size:
            break
        keep.add(t)
    t = 0
    while len(keep) < min(size, vocab_size):  # a short text: fill with the lowest unused ids
        keep.add(t)
        t += 1
    return torch.tensor(sorted(keep), dtype=torch.long)


def check_vocabulary(vocab_map: torch.Tensor, vocab_size: int, eos: set[int]) -> None:
    if vocab_map.dim() != 1 or vocab_map.numel() == 0:
        raise CompressError("the trimmed vocabulary must be a non-empty 1-D list of token ids")
    if int(vocab_map.min()) < 0 or int(vocab_map.max()) >= vocab_size:
        raise CompressError(f"the trimmed vocabulary holds ids outside the target's 0..{vocab_size - 1}")
    if vocab_map.unique().numel() != vocab_map.numel():
        raise CompressError("the trimmed vocabulary repeats token ids")
    missing = sorted(eos - set(vocab_map.tolist()))
    if missing:
        raise CompressError(f"the trimmed vocabulary misses the target's EOS token(s) {missing}: the drafter "
                            f"could never propose the end of a sequence; keep EOS in the vocabulary")


def target_fingerprint(model) -> dict:
    """What identifies a target to a head: shapes plus a hash of a few weight slices rounded to
    bfloat16 (the same for the float32 and bfloat16 loads of the same weights)."""
    cfg = model.config
    h = hashlib.sha256()
    base = model.model
    for t in (base.embed_tokens.weight[:4], base.norm.weight, base.layers[0].input_layernorm.weight,
              base.layers[-1].mlp.down_proj.weight[:2]):
        h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size, "weights_sha256": h.hexdigest()}


def forward_with_final(target, **inputs):
    """The target's forward output and the output of its final norm at every position (what its LM
    head reads; what a deep-context head is fed), taken from the norm module itself: whether
    ``hidden_states[-1]`` is normed differs between transformers versions."""
    seen = []
    hook = target.model.norm.register_forward_hook(lambda _m, _i, o: seen.append(o))
    try:
        out = target(**inputs)
    finally:
        hook.remove()
    return out, seen[-1]


def mid_norm(h: torch.Tensor, eps: float, ones: torch.Tensor | None = None) -> torch.Tensor:
    """What a head's mid map reads: the state after block m, RMS-normalised without a weight (the residual
    stream's scale grows with depth) — one definition for training and the pair (which passes its own
    ``ones`` [hidden], allocated once)."""
    return _rms(h, torch.ones(h.shape[-1], dtype=h.dtype, device=h.device) if ones is None else ones, eps)


class ExitHead(nn.Module):
    """One decoder layer + RMSNorm + a trimmed LM head, reading the target's hidden state after
    block ``exit_layer`` (parameters float32 for training; cast for inference)."""

    def __init__(self, target, exit_layer: int, vocab_map: torch.Tensor, context: str = "shallow",
                 mid_layer: int | None = None, init: str = "auto", lm_rows: str = "frozen"):
        super().__init__()
        if context not in CONTEXTS:
            raise CompressError(f"head context must be one of {', '.join(CONTEXTS)}, got {context!r}")
        if init not in INITS:
            raise CompressError(f"head init must be one of {', '.join(INITS)}, got {init!r}")
        if lm_rows not in LM_ROWS:
            raise CompressError(f"head lm_rows must be one of {', '.join(LM_ROWS)}, got {lm_rows!r}")
        self.context = context
        check_engine_model(target)
        cfg = target.config
        layers = target.model.layers
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 0 <= exit_layer < len(layers):
            raise CompressError(f"exit_layer must be an integer in 0..{len(layers) - 1} (the target has "
                                f"{len(layers)} blocks; the drafter runs the first exit_layer of them), got {exit_layer!r}")
        if exit_layer == 0 and context != "deep":
            raise CompressError("exit_layer 0 needs context 'deep': a shallow head there reads the token's embedding "
                                "alone (a bigram table); a deep one also reads the target's final state of the "
                                "position before, as EAGLE's head does")
        check_vocabulary(vocab_map, target.lm_head.weight.shape[0], eos_ids(target))
        self.exit_layer = exit_layer
        if mid_layer is not None and (context != "deep" or isinstance(mid_layer, bool) or not isinstance(mid_layer, int)
                                      or not exit_layer < mid_layer < len(layers)):
            raise CompressError(f"mid_layer must be an integer in {exit_layer + 1}..{len(layers) - 1} (after the exit "
                                f"block, before the last; the verify pass computes its state) and needs context "
                                f"'deep', got {mid_layer!r} with context {context!r}")
        self.mid_layer = mid_layer
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.act = getattr(cfg, "hidden_act", "silu")
        # the block the head starts as: "last", whose output is what the final norm and the LM head expect;
        # "next", block exit_layer, the one the head stands in for, whose input is what the head reads (h_k:
        # at depth 0 the token's embedding, which the last block never sees); "auto", next at depth 0 and last
        # deeper (a CPU probe, bench/results/draft/README.md, "Depth 0, and where the head starts": from the
        # last block a depth-0 head agrees 0.19 after 300 steps, from block 0 0.25, as a depth-1 head then did)
        nxt = init == "next" or (init == "auto" and exit_layer == 0)
        src = layers[exit_layer] if nxt else layers[-1]
        a, m = src.self_attn, src.mlp
        f32 = lambda t: nn.Parameter(t.detach().float().clone())  # noqa: E731
        self.ln1, self.ln2 = f32(src.input_layernorm.weight), f32(src.post_attention_layernorm.weight)
        self.wqkv = f32(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        self.bqkv = (f32(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])) if a.q_proj.bias is not None
                     else None)
        self.wo, self.wd = f32(a.o_proj.weight), f32(m.down_proj.weight)
        self.wgu = f32(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
        self.norm = f32(target.model.norm.weight)
        # deep context: the previous position's final (normed) state, mapped into the residual stream;
        # zero at the start, so a deep head begins as the shallow head it extends
        self.wf = nn.Parameter(torch.zeros_like(self.wo, dtype=torch.float32)) if context == "deep" else None
        # ... and (mid_layer) the previous position's normed state after block m, the same way
        self.wm = nn.Parameter(torch.zeros_like(self.wo, dtype=torch.float32)) if mid_layer is not None else None
        self.n_q, self.n_kv = a.q_proj.out_features // self.head_dim, a.k_proj.out_features // self.head_dim
        self.register_buffer("vocab_map", vocab_map.long().clone())
        # the trimmed LM head: rows of the target's head, frozen (a buffer, not saved: re-gathered from the
        # target at load time), or trained with the head (a parameter, saved): capacity a draft does not pay
        # for, since a draft multiplies by its rows either way
        rows = target.lm_head.weight.detach()[vocab_map.to(target.lm_head.weight.device)].float().clone()
        if lm_rows == "trained":
            self.lm_rows = nn.Parameter(rows)
        else:
            self.register_buffer("lm_rows", rows, persistent=False)
        self.fingerprint = target_fingerprint(target)

    @property
    def vocab_size(self) -> int:
        return int(self.vocab_map.numel())

    @property
    def lm_rows_trained(self) -> bool:
        return isinstance(self.lm_rows, nn.Parameter)

    def with_vocabulary(self, target, vocab_map: torch.Tensor) -> "ExitHead":
        """The same trained head over another vocabulary (e.g. ``torch.arange(V)``, untrimmed): frozen LM
        rows are the target's, so only the rows it scores change; trained ones keep their values for the
        ids of this head's vocabulary, the target's rows elsewhere."""
        head = ExitHead(target, self.exit_layer, vocab_map, context=self.context, mid_layer=self.mid_layer,
                        lm_rows="trained" if self.lm_rows_trained else "frozen")
        own = {k: v for k, v in self.state_dict().items() if k not in ("vocab_map", "lm_rows")}
        missing, unexpected = head.load_state_dict(own, strict=False)
        if set(missing) != ({"vocab_map", "lm_rows"} if self.lm_rows_trained else {"vocab_map"}) or unexpected:
            raise CompressError(f"internal: a head over another vocabulary lacks {missing} or has {unexpected}")
        if self.lm_rows_trained:  # each of this head's ids to its row in the new vocabulary (-1: not there)
            row = torch.full((int(max(vocab_map.max(), self.vocab_map.max())) + 1,), -1, dtype=torch.long)
            row[vocab_map.cpu()] = torch.arange(vocab_map.numel())
            dst = row[self.vocab_map.cpu()]
            kept = dst >= 0
            with torch.no_grad():
                head.lm_rows[dst[kept].to(head.lm_rows.device)] = \
                    self.lm_rows.detach()[kept.to(self.lm_rows.device)].to(head.lm_rows)
        return head.to(self.ln1.device)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def fuse(self, h: torch.Tensor, prev: torch.Tensor | None, prev_mid: torch.Tensor | None = None) -> torch.Tensor:
        """The head's input: h_k, plus (deep context) the mapped final state ``prev`` of the position before,
        plus (a mid layer) its mapped normed state ``prev_mid`` after block m (None: the term is zero)."""
        if self.wf is None:
            return h
        if prev is None:
            raise CompressError("a deep-context head needs the previous positions' final states")
        x = h + F.linear(prev.to(h.dtype), self.wf.to(h.dtype))
        if self.wm is not None and prev_mid is not None:
            x = x + F.linear(prev_mid.to(h.dtype), self.wm.to(h.dtype))
        return x

    def mid_state(self, h: torch.Tensor) -> torch.Tensor:
        """What the mid map reads (``mid_norm``)."""
        return mid_norm(h, self.eps)

    def _qkv(self, x: torch.Tensor, cos, sin):
        b, t, _ = x.shape
        d = self.head_dim
        y = _rms(x, self.ln1.to(x.dtype), self.eps)
        qkv = F.linear(y, self.wqkv.to(x.dtype), None if self.bqkv is None else self.bqkv.to(x.dtype))
        q, k, v = qkv.split([self.n_q * d, self.n_kv * d, self.n_kv * d], dim=-1)
        q = _rope(q.view(b, t, self.n_q, d).transpose(1, 2), cos, sin)
        k = _rope(k.view(b, t, self.n_kv, d).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.n_kv, d).transpose(1, 2)
        g = self.n_q // self.n_kv
        return q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Attention output [B, n_q, T, d] -> the rest of the layer -> the final-normed state [B, T, hidden]."""
        b, t, _ = x.shape
        h = x + F.linear(attn.transpose(1, 2).reshape(b, t, self.n_q * self.head_dim), self.wo.to(x.dtype))
        y = _rms(h, self.ln2.to(x.dtype), self.eps)
        gate, up = F.linear(y, self.wgu.to(x.dtype)).chunk(2, dim=-1)
        h = h + F.linear(_ACTS[self.act](gate) * up, self.wd.to(x.dtype))
        return _rms(h, self.norm.to(x.dtype), self.eps)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """Trimmed logits (float32) of final-normed states."""
        return F.linear(state, self.lm_rows.to(state.dtype)).float()

    def forward_sequence(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         final: torch.Tensor | None = None, mid: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced: h [B, T, hidden] (the target's state after ``exit_layer`` blocks) at
        positions 0..T−1 (``cos``/``sin`` [T, head_dim]) -> trimmed logits [B, T, N] (float32).
        A deep head also takes ``final`` [B, T, hidden], the target's final-normed states: each
        position reads the one before it (zeros at position 0) — a round's first draft; a head with a
        mid layer also ``mid`` [B, T, hidden], the target's states after block m (un-normed)."""
        return self.forward_unrolled(h, cos, sin, final, steps=1, mid=mid)[0]

    def forward_unrolled(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         final: torch.Tensor | None, steps: int, mid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Trimmed logits [B, T, N] of drafts 1..``steps`` of a round, teacher-forced on every window position.

        Step s at position p is the s-th draft of a round begun at r = p − s + 1: its input is h_k(p) plus the
        head's own final state of p − 1 from step s − 1 (step 1: the target's, ``final``), and it attends to
        the committed positions ≤ r through their step-1 keys (the loop recomputes a committed position's
        head state from the target's final states) and to r+1..p through the keys of the steps that drafted
        them. Positions p < s − 1 (a round begun before the window) hold no meaning. A shallow head's drafts
        do not depend on the step: its steps are all step 1. A head with a mid layer reads ``mid`` (the
        target's states after block m) of p − 1 at step 1 only: at later steps p − 1 is a draft."""
        if steps < 1:
            raise CompressError(f"steps must be >= 1, got {steps}")
        if (self.wm is not None) != (mid is not None):
            raise CompressError(f"a head with mid_layer {self.mid_layer} needs the target's states after that "
                                f"block, and only such a head takes them")
        b, t, _ = h.shape
        shift = lambda z: F.pad(z[:, :-1], (0, 0, 1, 0))  # noqa: E731  position p reads p − 1; zeros at 0
        x = self.fuse(h, None if final is None else shift(final), None if mid is None else shift(self.mid_state(mid)))
        q, k1, v1 = self._qkv(x, cos, sin)
        attn = F.scaled_dot_product_attention(q, k1, v1, is_causal=True, scale=self.head_dim ** -0.5)
        state = self._finish(x, attn)
        out = [self.logits(state)]
        if self.wf is None:
            return out * steps
        keys, values = [k1], [v1]
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        for s in range(2, steps + 1):
            x = self.fuse(h, shift(state))
            q, ks, vs = self._qkv(x, cos, sin)
            keys.append(ks)
            values.append(vs)
            scale = self.head_dim ** -0.5
            # committed part: keys of step 1 at j <= p - s + 1
            main = (q.float() @ keys[0].float().transpose(-1, -2)) * scale
            main = main.masked_fill(~causal.tril(-(s - 1)), float("-inf"))
            # this round's earlier drafts and itself: j = p - s + i for i = 2..s, keys of step i
            band = []
            for i in range(2, s + 1):
                lag = s - i  # position p reads position p - lag
                kk = F.pad(keys[i - 1].float(), (0, 0, lag, 0))[:, :, :t]
                band.append((q.float() * kk).sum(-1) * scale)
            band = torch.stack(band, -1)  # [B, n_q, T, s - 1]
            valid = torch.arange(t, device=h.device)[:, None] >= torch.arange(s - 2, -1, -1, device=h.device)[None]
            band = band.masked_fill(~valid, float("-inf"))
            probs = torch.softmax(torch.cat([main, band], -1), -1)
            attn = probs[..., :t] @ values[0].float()
            for i in range(2, s + 1):
                lag = s - i
                vv = F.pad(values[i - 1].float(), (0, 0, lag, 0))[:, :, :t]
                attn = attn + probs[..., t + i - 2].unsqueeze(-1) * vv
            state = self._finish(x, attn.to(x.dtype))
            out.append(self.logits(state))
        return out

    # ---------------------------------------------------------------- files

    def state(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().contiguous() for k, v in self.named_parameters()}
        out["vocab_map"] = self.vocab_map.contiguous()
        return out

    def save_as(self, folder: Path, name: str, dtype: torch.dtype = torch.bfloat16) -> str:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).cpu() for k, v in self.state().items()}
        meta = {"exit_layer": str(self.exit_layer), "context": self.context, "lm_rows": "trained" if
                self.lm_rows_trained else "frozen",
                **({} if self.mid_layer is None else {"mid_layer": str(self.mid_layer)})}
        save_file(tensors, str(Path(folder) / name), metadata=meta)
        return name

    @classmethod
    def load(cls, target, path: Path, exit_layer: int, fingerprint: dict | None,
             context: str = "shallow", mid_layer: int | None = None) -> "ExitHead":
        if fingerprint is not None and fingerprint != target_fingerprint(target):
            raise CompressError(f"{path} holds a head trained for another target ({fingerprint}); the target "
                                f"given is {target_fingerprint(target)}: train a head for this target")
        tensors = load_file(str(path))
        if ("wm" in tensors) != (mid_layer is not None):
            raise CompressError(f"{path}: the manifest gives mid_layer {mid_layer}, the file "
                                f"{'has' if 'wm' in tensors else 'lacks'} its map (wm)")
        head = cls(target, exit_layer, tensors.pop("vocab_map"), context="deep" if "wf" in tensors else context,
                   mid_layer=mid_layer, lm_rows="trained" if "lm_rows" in tensors else "frozen")
        own = dict(head.named_parameters())
        if set(tensors) != set(own):
            raise CompressError(f"{path}: head tensors {sorted(tensors)} do not match {sorted(own)}")
        with torch.no_grad():
            for k, v in tensors.items():
                if v.shape != own[k].shape:
                    raise CompressError(f"{path}: {k} has shape {tuple(v.shape)}, the target needs {tuple(own[k].shape)}")
                own[k].copy_(v.float())
        return head


def write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


class HeadAsModel(nn.Module):
    """A self-drafter as a plain model for teacher-forced scoring (``draft-eval``'s numbers): the
    target's own pass up to the exit, the head, and the trimmed logits scattered into the full
    vocabulary (−inf elsewhere). Slow (it runs the whole target); for measurement only. A deep head
    reads the target's final-normed states (the final norm's output): its scores are a round's first
    draft at every position."""

    def __init__(self, target, head: ExitHead):
        super().__init__()
        self.target, self.head = target, head

    @torch.no_grad()
    def forward(self, input_ids, use_cache: bool = False, logits_to_keep: int = 0, **_):
        # a deep head reads the previous position's final state (a round's first draft)
        out, final = forward_with_final(self.target, input_ids=input_ids, output_hidden_states=True, use_cache=False)
        x = out.hidden_states[self.head.exit_layer]
        mid = None if self.head.mid_layer is None else out.hidden_states[self.head.mid_layer]
        cos, sin = self.target.model.rotary_emb(x, torch.arange(x.shape[1], device=x.device)[None])
        trimmed = self.head.forward_sequence(x, cos[0], sin[0], final, mid)
        full = trimmed.new_full((*trimmed.shape[:-1], self.target.lm_head.weight.shape[0]), float("-inf"))
        full[..., self.head.vocab_map.to(full.device)] = trimmed
        return SimpleNamespace(logits=full[:, -logits_to_keep:] if logits_to_keep else full)
