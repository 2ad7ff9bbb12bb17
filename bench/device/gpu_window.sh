#!/usr/bin/env bash
# One GPU window, in phases (each phase is one `device run`, under its 10-minute limit):
#   bash bench/device/gpu_window.sh PHASE
# Results go to $OUT/<phase>.tar.gz (the device returns at most 8 files per call).
set -uo pipefail
export COMPRESS_CACHE=/tmp/compress-cache PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
R=/tmp/results; mkdir -p $R
py() { python3 "$@"; }
case $1 in
  prep)
    bash bench/device/stage_parts.sh join smol smollm2-135m b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 SmolLM2-135M-Instruct.Q4_1.gguf
    bash bench/device/stage_parts.sh join q05 qwen2.5-coder-0.5b 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    bash bench/device/stage_parts.sh join q15 qwen2.5-coder-1.5b cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    for m in smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do py -m compress models fetch $m 2>&1 | tail -2; done
    py -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -5 | tee $R/gpu-tests.txt;;
  drafters)  # the self-drafter (1.5B -> NIRVANA 50% + GPTQ W4) and the stock 0.5B at W4
    py -m compress run recipes/qwen-coder-1.5b-self-drafter.yaml --out /tmp/out/self-drafter --force 2>&1 | grep -v "it/s" | tail -30 | tee $R/self-drafter.log
    py -m compress run recipes/qwen-coder-0.5b-gptq-w3g128-code.yaml --set stages[0].steps[0].bits=4 --out /tmp/out/q05-w4 --force 2>&1 | grep -v "it/s" | tail -20 | tee $R/q05-w4.log
    cp /tmp/out/self-drafter/report.json $R/self-drafter-report.json; cp /tmp/out/q05-w4/report.json $R/q05-w4-report.json;;
  bench-code|bench-prose)  # draft-bench: the 1.5B target with each drafter
    P=${1#bench-}
    for d in "qwen2.5-coder-0.5b" "/tmp/out/q05-w4 --int4-drafter" "/tmp/out/self-drafter --int4-drafter"; do
      name=$(echo $d | cut -d' ' -f1 | xargs basename)
      py -m compress draft-bench --target qwen2.5-coder-1.5b --drafter $d --prompts bench/draft_bench_prompts/$P.txt \
        --gamma 4 --max-new-tokens 128 --device cuda --dtype bfloat16 --compile --out $R/draft-$name-$P 2>&1 | tail -4
    done;;
  prune)  # pruning quality on both models, then speed on the 0.5B
    py bench/prune_quality.py --model qwen2.5-coder-0.5b --calib-corpus stdlib --device cuda \
      --out $R/prune-qwen2.5-coder-0.5b.json --plot $R/prune-qwen2.5-coder-0.5b.png 2>&1 | grep '^{' | cut -c1-200
    py bench/prune_quality.py --model smollm2-135m --calib-corpus bbc --device cuda \
      --out $R/prune-smollm2-135m.json --plot $R/prune-smollm2-135m.png 2>&1 | grep '^{' | cut -c1-200;;
  speed)
    py bench/prune_speed.py --model qwen2.5-coder-0.5b --device cuda --calib-corpus stdlib --sparsities 0.2,0.5 \
      --out $R/prune-speed-qwen2.5-coder-0.5b-gpu.json 2>&1 | grep '^{'
    py bench/prune_speed.py --model qwen2.5-coder-0.5b --device cuda --calib-corpus stdlib --sparsities 0.5 \
      --allocation uniform --out $R/prune-speed-qwen2.5-coder-0.5b-gpu-uniform.json 2>&1 | grep '^{';;
  *) py "$@";;
esac
tar czf $OUT/$1.tar.gz -C $R . 2>/dev/null; ls -la $OUT
