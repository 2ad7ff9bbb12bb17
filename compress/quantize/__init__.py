"""Weight-only post-training quantization: grids, solvers and recipe steps.

Importing this package registers its recipe steps (rtn, gptq, gptq_mixed, adaquant, bias_correction;
``config.py``); their code is imported when a step first runs. The quantized exports (gptq,
compressed-tensors) are formats: ``compress/formats/``.
"""
from compress.quantize import config  # noqa: F401  (registers the steps)
