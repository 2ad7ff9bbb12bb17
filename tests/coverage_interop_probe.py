"""Run by tests/test_coverage_interop.py in a process of its own: GPTQModel.load and defuser patch
transformers' MoE and Phi-3 classes for the whole process, which must not leak into other tests.

For each architecture of the coverage table: GPTQ W4 g32 (sym) through run_recipe, exported as
gptq and compressed-tensors, loaded by transformers (MoE: after ``defuser.replace_fused_blocks``,
which gptqmodel ships), by GPTQModel.load (torch kernel, float16), and by our loader; prints one
JSON object: arch -> loader -> {"rel": max|Δlogits| / max|logits|} or {"error": "..."}.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def main(archs: list[str]) -> dict:
    import torch
    import torch._dynamo

    torch._dynamo.config.disable = True  # gptqmodel compiles its dequantize: minutes on a CPU, same maths
    from compress.export import write_export
    from compress.models import load_model
    from compress.pipeline import run_recipe
    from compress.recipe import ExportSpec
    from tests.tiny import TEXT
    from tests.tiny_archs import MOE_ARCHS, arch_model_dir

    ids = torch.tensor([list(b"The quick brown fox jumps over")])
    work = Path(tempfile.mkdtemp())
    (work / "corpus.txt").write_text(TEXT)
    results: dict = {}
    # our exports first: once a loader has patched transformers, building these models changes
    exports = {}
    for arch in archs:
        model_dir = arch_model_dir(work / arch, arch)
        run = run_recipe({"model": {"id": model_dir, "device": "cpu"},
                          "calibration": {"corpus": str(work / "corpus.txt"), "num_samples": 4, "seq_len": 32,
                                          "batch_size": 2},
                          "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "bits": 4, "group_size": 32,
                                                              "sym": True, "ignore": ["lm_head"]}]}]},
                         progress=False, log=lambda *_: None)
        for fmt in ("gptq", "compressed-tensors"):
            out = write_export(run.model, run.tokenizer, work / f"{arch}-{fmt}", spec=ExportSpec(format=fmt),
                               recipe_yaml="", report={}, state=run.state)
            with torch.no_grad():
                exports[arch, fmt] = (out, load_model(str(out)).model(ids).logits.float())

    def rel(model, ref):
        with torch.no_grad():
            got = model(ids).logits.float()
        return {"rel": float((got - ref).abs().max() / ref.abs().max())}

    import defuser
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    for arch in archs:
        results[arch] = {}
        for loader, fmt in (("transformers", "gptq"), ("gptqmodel", "gptq"), ("transformers", "compressed-tensors")):
            out, ref = exports[arch, fmt]
            try:
                if loader == "gptqmodel":
                    model = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
                else:
                    if arch in MOE_ARCHS and fmt == "gptq":
                        defuser.replace_fused_blocks(arch)  # per-expert linears for optimum to quantize
                    model = AutoModelForCausalLM.from_pretrained(out)
                results[arch][f"{loader}:{fmt}"] = rel(model, ref)
            except Exception as exc:  # the test names what failed and why
                results[arch][f"{loader}:{fmt}"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    return results


if __name__ == "__main__":
    print("RESULTS " + json.dumps(main(sys.argv[1:])))
