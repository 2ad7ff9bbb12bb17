"""Weight-only post-training quantization: grids, solvers, recipe steps and quantized exports.

Importing this package registers its recipe steps (rtn, gptq, gptq_mixed, adaquant,
bias_correction) and its export writers/loaders (gptq, compressed-tensors).
"""
from compress.quantize import export_ct, export_gptq, mixed_steps, refine_steps, steps  # noqa: F401
