"""Apply S2FT to a model, and S2FT adapters: save, load, fuse, unfuse, switch.

``apply_s2ft(model, config, batches)`` selects units, co-permutes the blocks,
freezes every parameter and wraps the sliced linears in ``S2FTLinear``; the
returned ``S2FTHandle`` lists the trainable deltas (give ``handle.parameters()``
to the optimizer). The model stays permuted while S2FT is on; ``handle.remove()``
restores plain linears and the original order (with the deltas merged in when
``merge=True``).

An adapter is a folder with ``adapter_model.safetensors`` (the deltas, keyed
``<linear fqn>.delta``) and ``adapter_config.json`` (the S2FT config, the
selection — the permutation is "selected units first, then the rest, both
ascending", per block — and a fingerprint of the base model). The fingerprint
holds the architecture and, per coupled linear, its weight shape, RMS and four
sums over the axis S2FT permutes. These do not change under the permutation and
barely under dtype casts (they are compared with tolerances), so they recognise
the base model whether or not it is currently permuted, and reject another
checkpoint of the same shape. They cannot tell apart bases that differ by less
than the tolerance (e.g. a base with another small adapter merged in).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compress.errors import CompressError
from compress.finetune.partial import S2FTLinear
from compress.finetune.permute import apply_orders, orders_for
from compress.finetune.select import Block, S2FTConfig, Selection, check_ratio, decoder_blocks, select_units

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "compress-s2ft"
ADAPTER_VERSION = 1
RMS_RTOL = 1e-3
PROBES = 4  # sums per linear kept in the fingerprint
SUMS_TOL = 1e-2  # x RMS x sqrt(terms): well above bf16 rounding, far below another checkpoint's spread


def s2ft_config(config: S2FTConfig | dict | None) -> S2FTConfig:
    """Validate a config (object or dict); every problem is a CompressError naming the field."""
    if config is None:
        config = S2FTConfig()
    elif isinstance(config, dict):
        try:
            config = S2FTConfig.model_validate(config)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
                + ("" if isinstance(e.get("input"), (dict, list)) else f" (got {e.get('input')!r})")
                for e in exc.errors(include_url=False))
            raise CompressError(f"S2FT config: {problems}") from None
    elif not isinstance(config, S2FTConfig):
        raise CompressError(f"S2FT config must be an S2FTConfig or a dict, got {type(config).__name__}")
    for name in ("attention_ratio", "mlp_ratio"):  # again: model_construct skips validation
        try:
            check_ratio(name, getattr(config, name))
        except ValueError as exc:
            raise CompressError(f"S2FT config: {exc}") from None
    if config.attention_ratio == 0 and config.mlp_ratio == 0:
        raise CompressError("S2FT config: attention_ratio and mlp_ratio are both 0: nothing to train")
    if config.attention_ratio > 0 and not config.attention_modules:
        raise CompressError(f"S2FT config: attention_ratio={config.attention_ratio} but attention_modules "
                            f"is empty; list v_proj and/or o_proj (or set attention_ratio: 0)")
    if config.mlp_ratio > 0 and not config.mlp_modules:
        raise CompressError(f"S2FT config: mlp_ratio={config.mlp_ratio} but mlp_modules is empty; "
                            f"list gate_proj, up_proj and/or down_proj (or set mlp_ratio: 0)")
    return config


def trainable_slices(block: Block, num_kv_selected: int, num_channels_selected: int,
                     config: S2FTConfig) -> dict[str, tuple[str, int]]:
    """linear name -> (side, leading slice size) for one permuted block."""
    out = {}
    if num_kv_selected:
        for name in config.attention_modules:
            out[name] = (("rows", num_kv_selected * block.head_dim) if name == "v_proj"
                         else ("cols", num_kv_selected * block.group_size * block.head_dim))
    if num_channels_selected:
        for name in config.mlp_modules:
            out[name] = ("cols" if name == "down_proj" else "rows", num_channels_selected)
    return out


def base_fingerprint(model: nn.Module, blocks: list[Block]) -> dict:
    cfg = model.config
    b0 = blocks[0]
    modules = {}
    for b in blocks:
        for name, linear in b.linears.items():
            w = linear.weight.detach()
            rms = float(torch.linalg.vector_norm(w, dtype=torch.float32)) / math.sqrt(w.numel())
            # Sums over the axis S2FT permutes (rows of producers, columns of o/down_proj) do not
            # change with the permutation; a few of them tell checkpoints of one shape apart.
            axis = 1 if name in ("o_proj", "down_proj") else 0
            sums = w[:, :PROBES] if axis == 0 else w[:PROBES]
            sums = sums.sum(dim=axis, dtype=torch.float32).tolist()
            modules[b.fqn(name)] = {"shape": list(w.shape), "rms": float(f"{rms:.7g}"),
                                    "sums": [float(f"{x:.7g}") for x in sums]}
    return {"model_type": getattr(cfg, "model_type", None), "num_layers": len(blocks),
            "num_heads": b0.num_heads, "num_kv_heads": b0.num_kv_heads, "head_dim": b0.head_dim,
            "intermediate": b0.intermediate, "modules": modules}


def check_fingerprint(adapter: dict, model: dict, where: str) -> None:
    for key in ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate"):
        if adapter.get(key) != model.get(key):
            raise CompressError(f"{where}: the adapter's base model has {key}={adapter.get(key)!r}, "
                                f"this model {model.get(key)!r}")
    for fqn, want in adapter.get("modules", {}).items():
        have = model["modules"].get(fqn)
        if have is None:
            raise CompressError(f"{where}: this model has no {fqn}, which the adapter's base model has")
        if have["shape"] != want["shape"]:
            raise CompressError(f"{where}: {fqn} has weight shape {have['shape']}, the adapter's base "
                                f"model {want['shape']}")
        summed = want["shape"][1 if fqn.endswith(("o_proj", "down_proj")) else 0]
        sums_tol = SUMS_TOL * want["rms"] * math.sqrt(summed) + 1e-12
        if abs(have["rms"] - want["rms"]) > RMS_RTOL * abs(want["rms"]) + 1e-12 or any(
                abs(a - b) > sums_tol for a, b in zip(have["sums"], want.get("sums", have["sums"]))):
            raise CompressError(
                f"{where}: {fqn} weights differ from the adapter's base model (RMS {have['rms']:.6g} vs "
                f"{want['rms']:.6g}, probe sums {have['sums']} vs {want.get('sums')}): the adapter was "
                f"trained on another base model")


class S2FTHandle:
    """S2FT installed on a model: the selection, the permutation and the wrapped linears."""

    def __init__(self, model: nn.Module, blocks: list[Block], config: S2FTConfig, selection: Selection,
                 fingerprint: dict):
        self.model, self.blocks, self.config = model, blocks, config
        self.selection, self.fingerprint = selection, fingerprint
        self.kv_orders, self.channel_orders = orders_for(selection, blocks)
        self.modules: dict[str, S2FTLinear] = {}
        self._originals: dict[str, nn.Linear] = {}
        self._requires_grad: dict[nn.Parameter, bool] = {}
        self.removed = False

    def parameters(self) -> list[nn.Parameter]:
        """The trainable deltas (all an optimizer needs)."""
        return [m.delta for m in self.modules.values()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{fqn}.delta", m.delta) for fqn, m in self.modules.items()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    @property
    def fused(self) -> bool:
        return all(m.fused for m in self.modules.values())

    def fuse(self) -> None:
        """W[slice] += Δ in every wrapped linear (inference at plain-linear cost)."""
        self._check_live()
        for m in self.modules.values():
            m.fuse()

    def unfuse(self) -> None:
        """W[slice] -= Δ: back to the base weights (up to rounding)."""
        self._check_live()
        for m in self.modules.values():
            m.unfuse()

    def load_deltas(self, tensors: dict[str, torch.Tensor], where: str = "S2FT adapter") -> None:
        self._check_live()
        want = dict(self.named_parameters())
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want))
        if missing or extra:
            raise CompressError(f"{where}: tensors do not match the selection "
                                f"(missing {missing[:3]}, unexpected {extra[:3]})")
        was_fused = self.fused
        self.unfuse()
        with torch.no_grad():
            for name, p in want.items():
                if tuple(tensors[name].shape) != tuple(p.shape):
                    raise CompressError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, "
                                        f"expected {tuple(p.shape)}")
                p.copy_(tensors[name].to(p.device, p.dtype))
        if was_fused:
            self.fuse()

    def remove(self, merge: bool = False) -> None:
        """Put the plain linears back and undo the permutation; ``merge`` keeps Δ in the weights."""
        self._check_live()
        if merge:
            self.fuse()
        else:
            self.unfuse()
        for fqn, original in self._originals.items():
            parent, child = fqn.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), child, original)
        apply_orders(self.blocks, self.kv_orders, self.channel_orders, undo=True)
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        self.modules.clear()
        self.removed = True
        if getattr(self.model, "_s2ft_handle", None) is self:
            del self.model._s2ft_handle

    def _check_live(self) -> None:
        if self.removed:
            raise CompressError("S2FT: this handle was removed from its model")


def _install(model: nn.Module, blocks: list[Block], config: S2FTConfig, selection: Selection,
             fingerprint: dict) -> S2FTHandle:
    handle = S2FTHandle(model, blocks, config, selection, fingerprint)
    handle._requires_grad = {p: p.requires_grad for p in model.parameters()}
    apply_orders(blocks, handle.kv_orders, handle.channel_orders)
    for p in model.parameters():
        p.requires_grad_(False)
    delta_dtype = torch.float32 if config.delta_dtype == "float32" else None
    for b, kv_sel, ch_sel in zip(blocks, selection.attention, selection.mlp):
        for name, (side, size) in trainable_slices(b, len(kv_sel), len(ch_sel), config).items():
            fqn = b.fqn(name)
            parent, child = fqn.rsplit(".", 1)
            handle._originals[fqn] = b.linears[name]
            wrapped = S2FTLinear(b.linears[name], side, size, delta_dtype)
            setattr(model.get_submodule(parent), child, wrapped)
            handle.modules[fqn] = wrapped
    model._s2ft_handle = handle
    return handle


def _refuse_if_installed(model: nn.Module) -> None:
    if getattr(model, "_s2ft_handle", None) is not None or any(
            isinstance(m, S2FTLinear) for m in model.modules()):
        raise CompressError("S2FT is already applied to this model; call handle.remove() first "
                            "(or switch_adapter to change adapters)")


def apply_s2ft(model: nn.Module, config: S2FTConfig | dict | None = None,
               batches: Iterable[Any] | None = None) -> S2FTHandle:
    """Select, co-permute, freeze and wrap; returns the handle whose deltas are to be trained.

    ``batches`` (input-id tensors, or dicts of model inputs) are used by the
    ``activation`` and ``gradient`` strategies only.
    """
    config = s2ft_config(config)
    _refuse_if_installed(model)
    blocks = decoder_blocks(model)
    fingerprint = base_fingerprint(model, blocks)
    selection = select_units(model, blocks, config, batches)
    if not any(selection.attention) and not any(selection.mlp):  # unreachable with unit_count's check
        raise CompressError("S2FT: the selection is empty")
    return _install(model, blocks, config, selection, fingerprint)


def save_adapter(handle: S2FTHandle, folder: str | Path) -> Path:
    """Write the deltas and the adapter config into ``folder``; returns the folder."""
    handle._check_live()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to("cpu").contiguous() for name, t in handle.state_dict().items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt", "adapter": ADAPTER_FORMAT})
    meta = {
        "format": ADAPTER_FORMAT, "version": ADAPTER_VERSION,
        "s2ft": handle.config.model_dump(),
        "selection": handle.selection.to_json(),
        "permutation": "per block: selected units first, then the rest, both ascending",
        "modules": {fqn: {"side": m.side, "size": m.size, "delta_shape": list(m.delta.shape)}
                    for fqn, m in handle.modules.items()},
        "num_trainable": handle.num_trainable(),
        "base_fingerprint": handle.fingerprint,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise CompressError(f"S2FT adapter: {path} not found")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"S2FT adapter: {cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CompressError(f"S2FT adapter: {cfg_path} is not an S2FT adapter config "
                            f"(format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                            f"expected {ADAPTER_FORMAT!r})")
    if meta.get("version") != ADAPTER_VERSION:
        raise CompressError(f"S2FT adapter: {cfg_path} has version {meta.get('version')!r}; "
                            f"this toolkit reads version {ADAPTER_VERSION}")
    for key in ("s2ft", "selection", "base_fingerprint"):
        if key not in meta:
            raise CompressError(f"S2FT adapter: {cfg_path} has no {key!r}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CompressError(f"S2FT adapter: cannot read {weights_path}: {exc}") from None
    return meta, tensors


def load_adapter(model: nn.Module, folder: str | Path, *, fuse: bool = False) -> S2FTHandle:
    """Install a saved adapter on its base model (checked by fingerprint); ``fuse`` merges it.

    On a model that already has S2FT on, this switches adapters (see ``switch_adapter``).
    """
    existing = getattr(model, "_s2ft_handle", None)
    if existing is not None and not existing.removed:
        return switch_adapter(existing, folder, fuse=fuse)
    meta, tensors = read_adapter(folder)
    where = f"S2FT adapter {folder}"
    _refuse_if_installed(model)
    blocks = decoder_blocks(model)
    check_fingerprint(meta["base_fingerprint"], base_fingerprint(model, blocks), where)
    config = s2ft_config(meta["s2ft"])
    selection = Selection.from_json(meta["selection"], blocks)
    handle = _install(model, blocks, config, selection, meta["base_fingerprint"])
    try:
        handle.load_deltas(tensors, where)
    except CompressError:
        handle.remove()
        raise
    if fuse:
        handle.fuse()
    return handle


def switch_adapter(handle: S2FTHandle, folder: str | Path, *, fuse: bool | None = None) -> S2FTHandle:
    """Replace the handle's adapter by the one in ``folder``, in place.

    Same selection and slices: unfuse the current deltas, copy the new ones in,
    fuse them (when ``fuse``, default: as the current adapter was). Otherwise the
    current adapter is removed (its permutation undone) and the new one installed.
    """
    handle._check_live()
    meta, tensors = read_adapter(folder)
    where = f"S2FT adapter {folder}"
    check_fingerprint(meta["base_fingerprint"], handle.fingerprint, where)
    fuse = handle.fused if fuse is None else fuse
    config = s2ft_config(meta["s2ft"])
    selection = Selection.from_json(meta["selection"], handle.blocks)
    same_layout = (selection == handle.selection and config.attention_modules == handle.config.attention_modules
                   and config.mlp_modules == handle.config.mlp_modules
                   and config.delta_dtype == handle.config.delta_dtype)
    if same_layout:
        handle.unfuse()
        handle.load_deltas(tensors, where)
        handle.config = config
        if fuse:
            handle.fuse()
        return handle
    model = handle.model
    handle.remove()
    return load_adapter(model, folder, fuse=fuse)
