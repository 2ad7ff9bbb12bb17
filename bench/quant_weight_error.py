"""Data-free proxy for the issue-16 grid and rotation options: the relative weight error
sum ||W − Ŵ||² / sum ||W||² of round-to-nearest over every linear of a decoder, for the min/max and
MSE grids, on the weights as they are, with the RMSNorm weights folded in, and folded + rotated
(a rotation preserves the Frobenius norm, so folded vs folded + rotated is a like-for-like
comparison of the basis). Seconds of CPU, no forward pass: a proxy, not a perplexity.

    python bench/quant_weight_error.py --model smollm2-135m --out bench/results/quant/weight-error-smollm2-135m.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from compress.models import load_model
from compress.quantize.grid import QuantSpec
from compress.quantize.solvers import rtn_solve
from compress.rotate.config import RotateConfig
from compress.rotate.step import rotate_model

SETTINGS = {"w3g128": (3, 128)}  # add "w2g64": (2, 64) when the CPU allows


def errors(model) -> dict:
    lins = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    out = {}
    for name, (bits, group) in SETTINGS.items():
        for grid in ("minmax", "mse"):
            num = den = 0.0
            for m in lins:
                w = m.weight.data.float()
                num += float((rtn_solve(w, QuantSpec(bits, group, False, grid)).weight - w).pow(2).sum())
                den += float(w.pow(2).sum())
            out[f"{name}-{grid}"] = num / den
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model, progress=False).model
    rows = {"as is": errors(model)}
    rotate_model(model, RotateConfig(values=False, check=False))
    rows["folded + rotated (hadamard)"] = errors(model)
    model = load_model(args.model, progress=False).model
    for block in model.model.layers:  # fold only: the rotation with Q = I
        for norm, names in ((block.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                            (block.post_attention_layernorm, ("gate_proj", "up_proj"))):
            for n in names:
                lin = getattr(block.self_attn if n[0] in "qkv" else block.mlp, n)
                lin.weight.data *= norm.weight.data[None, :]
    rows["folded"] = errors(model)
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, CPU", "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "relative_weight_error": rows}, f, indent=2)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
