"""Weight-only post-training quantization: grids, solvers (RTN, GPTQ), packing, recipe steps."""
from compress.quantize import steps  # noqa: F401  (registers the recipe steps)
from compress.quantize import mixed_steps  # noqa: F401
from compress.quantize import export_ct, export_gptq  # noqa: F401,E402  (register the gptq / compressed-tensors writers and loaders)
from compress.quantize import refine_steps  # noqa: F401
