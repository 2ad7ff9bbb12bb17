"""Mixtures of experts as linears the layer-wise runner can calibrate one expert at a time.

transformers 5 stores a block's experts as two 3-D parameters (``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]) and runs them with ``F.linear`` on slices: no ``nn.Linear`` a hook could
see, so no per-expert statistics. ``split_experts`` replaces each such module with an
``ExpertList``: a ``ModuleList`` of ``Expert`` modules (``gate_proj``, ``up_proj``, ``down_proj``
linears), so expert E's projections are ``...mlp.experts.E.gate_proj`` — the names GPTQModel and
vLLM give per-expert GPTQ checkpoints — and the forward is the same routed loop.

Calibration statistics per expert:

- ``routed`` (default): each expert's linears see the tokens the router sends it, nothing else —
  its Hessian is that of the inputs it will serve.
- ``all``: every calibration token also goes through every expert *for statistics only*: the
  linears see all tokens, the block's output is still the routed one (computed by the same
  arithmetic without the hooks, so it does not change at all).
- an expert that receives fewer than ``min_tokens`` routed tokens in a block takes its statistics
  from all tokens instead (the runner re-runs the pass for those experts alone and reports them).

Routers stay in float: transformers' routers are not ``nn.Linear`` (``TopKRouter``), and the linear
gates beside the experts (Qwen2-MoE's ``shared_expert_gate``, a router written as a linear) become
``RouterLinear``, which a ``targets: [Linear]`` does not select.

``fused_experts(model)`` puts transformers' own modules back for the time a float checkpoint is
written, so that ``save_pretrained`` writes the layout transformers loads.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import CompressError

ROUTING_MODES = ("routed", "all")


class RouterLinear(nn.Linear):
    """A linear that scores experts (a router or a shared-expert gate): kept in float."""


class Expert(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module,
                 requires_grad: bool = False):
        super().__init__()
        self.gate_proj = _linear(gate, requires_grad)
        self.up_proj = _linear(up, requires_grad)
        self.down_proj = _linear(down, requires_grad)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def forward_unobserved(self, x: torch.Tensor) -> torch.Tensor:
        """The same arithmetic as ``forward`` (``nn.Linear.forward`` is ``F.linear``) without calling
        the linears as modules, so no statistics hook sees these tokens."""
        gate = F.linear(x, self.gate_proj.weight, self.gate_proj.bias)
        up = F.linear(x, self.up_proj.weight, self.up_proj.bias)
        return F.linear(self.act_fn(gate) * up, self.down_proj.weight, self.down_proj.bias)


def _linear(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    return layer


class ExpertList(nn.ModuleList):
    """Experts as linears, with transformers' routed forward ``(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``; see the module docstring for ``routing`` and ``min_tokens``."""

    def __init__(self, experts: list[Expert], fused_class: type, fused_config):
        super().__init__(experts)
        self.fused_class = fused_class  # transformers' module, to write float checkpoints in its layout
        self.fused_config = fused_config
        self.routing = "routed"
        self.min_tokens = 0
        self.observe_all: frozenset[int] | None = None  # experts that see every token now (runner-set)
        self.routed_counts: torch.Tensor | None = None  # routed tokens per expert, while counting

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        n = len(self)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # n + 1 classes, as transformers: an index of n (a masked slot) is dropped below.
            mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)  # [experts, k, tokens]
            per_expert = mask.sum(dim=(1, 2))[:n]
        if self.routed_counts is not None:
            self.routed_counts += per_expert.cpu()
        hit = set(per_expert.nonzero().flatten().tolist())  # one device sync for the whole block
        watch = self.observe_all if self.observe_all is not None else (
            frozenset(range(n)) if self.routing == "all" else frozenset())
        for e in range(n):
            if e in watch:
                self[e](hidden_states)  # statistics only: every token; the result is not used
            if e not in hit:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]
            y = self[e].forward_unobserved(x) if e in watch else self[e](x)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """transformers' module with this list's weights stacked back into 3-D parameters."""
        with torch.device("meta"):
            module = self.fused_class(self.fused_config)
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self])
        module.gate_up_proj = nn.Parameter(gate_up.detach(), requires_grad=False)
        module.down_proj = nn.Parameter(torch.stack([e.down_proj.weight for e in self]).detach(), requires_grad=False)
        return module


def _splittable(module: nn.Module) -> bool:
    """transformers' fused experts in the layout ``ExpertList`` reproduces: gate and up concatenated
    (not interleaved, not transposed), no biases, the default gate (act(gate) * up)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "act_fn"):
        return False
    if (getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True)
            or getattr(module, "has_bias", False) or not getattr(module, "has_gate", True)
            or getattr(module, "has_post_expert_norm", False)):
        return False
    from transformers.integrations.moe import _default_apply_gate  # only a model with experts gets here

    return getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate


def split_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by an ``ExpertList`` (in place, on whatever
    device the weights are, the meta device included); the gates beside them become
    ``RouterLinear``. Returns the fqns of the expert lists (empty for a dense model)."""
    done = []
    for name, module in list(model.named_modules()):
        if not _splittable(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        inter = gate_up.shape[1] // 2
        copy = (lambda t: t) if gate_up.is_meta else (lambda t: t.clone())  # own storage: the 3-D tensors go
        grad = module.gate_up_proj.requires_grad
        experts = [Expert(copy(gate_up[e, :inter]), copy(gate_up[e, inter:]), copy(down[e]), module.act_fn, grad)
                   for e in range(gate_up.shape[0])]
        setattr(parent, attr, ExpertList(experts, type(module), module.config))
        for child in parent.children():
            if type(child) is nn.Linear:
                child.__class__ = RouterLinear
        done.append(name)
    return done


def expert_lists(module: nn.Module) -> Iterator[tuple[str, ExpertList]]:
    for name, m in module.named_modules():
        if isinstance(m, ExpertList):
            yield name, m


def set_routing(model: nn.Module, routing: str, min_tokens: int) -> None:
    """How every expert list of ``model`` feeds its experts' statistics (module docstring)."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"expert routing {routing!r}: allowed {', '.join(ROUTING_MODES)}")
    for _, experts in expert_lists(model):
        experts.routing, experts.min_tokens = routing, min_tokens


@contextmanager
def observing(module: nn.Module, which: dict[str, frozenset[int]] | None = None):
    """Let experts see every token for statistics: ``which`` maps an expert list's name (relative to
    ``module``) to its experts; None means every expert of every list (the layout trace)."""
    lists = dict(expert_lists(module))
    try:
        for name, experts in lists.items():
            experts.observe_all = frozenset(range(len(experts))) if which is None else which.get(name, frozenset())
        yield
    finally:
        for experts in lists.values():
            experts.observe_all = None


@contextmanager
def counting(module: nn.Module):
    """Count routed tokens per expert while inside; yields {list name: counts tensor}."""
    lists = dict(expert_lists(module))
    counts = {name: torch.zeros(len(experts), dtype=torch.long) for name, experts in lists.items()}
    try:
        for name, experts in lists.items():
            experts.routed_counts = counts[name]
        yield counts
    finally:
        for experts in lists.values():
            experts.routed_counts = None


def expert_of(block: nn.Module) -> dict[str, tuple[str, int]]:
    """Block-relative linear name -> (its expert list's name, expert index)."""
    out = {}
    for name, experts in expert_lists(block):
        for e, expert in enumerate(experts):
            for leaf, m in expert.named_modules():
                if isinstance(m, nn.Linear):
                    out[f"{name}.{e}.{leaf}"] = (name, e)
    return out


@contextmanager
def fused_experts(model: nn.Module):
    """transformers' fused expert modules in place of the expert lists while inside (for
    ``save_pretrained``), the lists back afterwards."""
    swapped = []
    for name, experts in list(expert_lists(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, experts.fused())
        swapped.append((parent, attr, experts))
    try:
        yield
    finally:
        for parent, attr, experts in swapped:
            setattr(parent, attr, experts)


# The layer-wise runner's checks and reports on experts (compress/runner.py).


def check_fed(subset, accs, alias, prefix) -> None:
    """Refuse to solve a module whose statistics saw no token (an expert the router never chose)."""
    empty = [prefix + s for s in subset if getattr(accs[alias.get(s, s)], "count", None) == 0]
    if empty:
        raise CompressError(
            f"{empty[0]} received no calibration token{f' (and {len(empty) - 1} more modules)' if len(empty) > 1 else ''}"
            f": nothing to calibrate it on. For an expert the router never chose, set calibration.expert_min_tokens "
            f">= 1 (it then takes its statistics from every token) or calibration.expert_routing: all")


def expert_report(block: nn.Module, prefix: str, routed: dict, starved: dict) -> dict[str, Any]:
    report = {}
    for name, experts in expert_lists(block):
        tokens = routed[name].tolist()
        every = list(range(len(experts))) if experts.routing == "all" else sorted(starved.get(name, ()))
        report[prefix + name] = {"routed_tokens": tokens, "min_routed": min(tokens), "routing": experts.routing,
                                 "min_tokens": experts.min_tokens, "all_token_statistics": every}
    return report
