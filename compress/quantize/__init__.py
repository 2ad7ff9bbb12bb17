"""Weight-only post-training quantization: grids, solvers, recipe steps and quantized exports.

Importing this package registers its recipe steps (rtn, gptq, gptq_mixed, adaquant,
bias_correction). The quantized exports (gptq, compressed-tensors) are formats: compress/formats/.
"""
from compress.quantize import mixed_steps, refine_steps, steps  # noqa: F401
