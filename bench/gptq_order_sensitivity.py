"""Sensitivity of GPTQ W3 g128 (SmolLM2, BBC-train seed 0) to the Hessian's summation order only:
the same 32 windows, fed in calibration batches of BATCH (8 is the benches' setting), prose
perplexity on 16 x 512 BBC-test tokens.

    python bench/gptq_order_sensitivity.py BATCH   # prints one JSON line
"""
import json
import sys
import time

from compress.pipeline import run_recipe

bs = int(sys.argv[1])
recipe = {"model": {"id": "smollm2-135m", "device": "cpu"},
          "calibration": {"corpus": "bbc", "num_samples": 32, "seq_len": 512, "seed": 0, "batch_size": bs},
          "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "bits": 3, "group_size": 128}]}],
          "verify": {"corpus": "bbc", "split": "test", "seq_len": 512, "max_windows": 16, "baseline": False}}
t = time.time()
r = run_recipe(recipe, progress=False, log=lambda *a: None)
print(json.dumps({"batch_size": bs, "perplexity": r.report["verify"]["perplexity"], "seconds": time.time() - t}), flush=True)
