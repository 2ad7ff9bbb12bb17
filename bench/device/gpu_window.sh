#!/usr/bin/env bash
# One GPU window, in phases (each phase is one `device run`, under its 10-minute limit):
#   bash bench/device/gpu_window.sh PHASE
# Results accumulate in /tmp/results and go back as $OUT/<phase>.tar.gz after every phase (the
# device returns at most 8 files per call; a phase cut off by its limit keeps what it wrote).
# Before `prep`: the staging calls that bench/device/prepare.sh printed (each runs
# `bash bench/device/gpu_setup.sh stage`: wheels into /tmp/site, model chunks joined and verified).
set -uo pipefail
export COMPRESS_CACHE=/tmp/compress-cache PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
R=/tmp/results; mkdir -p $R
py() { python3 "$@"; }
T=${PHASE_TIMEOUT:-560}  # seconds a phase may run before its commands are cut (the call's limit is 600)
draft() {  # draft-bench of the 1.5B target with drafter $1 on prompt set $2 into $R/draft-$3-$2
  timeout $T python3 -m compress draft-bench --target qwen2.5-coder-1.5b --drafter $1 \
    --prompts bench/draft_bench_prompts/$2.txt --gamma ${GAMMA:-4} --max-new-tokens 128 --device cuda \
    --dtype bfloat16 --compile ${@:4} --out $R/draft-$3-$2 2>&1 | grep -v "it/s" | tail -3 | cut -c1-600
}
case $1 in
  prep)
    bash bench/device/gpu_setup.sh stage  # whatever this call carries; joins complete models
    bash bench/device/gpu_setup.sh convert smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee $R/gpu.txt
    [ -n "${SKIP_TESTS:-}" ] || timeout 300 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -8 | tee $R/gpu-tests.txt;;
  tests)
    timeout 300 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -8 | tee $R/gpu-tests.txt;;
  recal)  # issue 6: the compression-calibration study on the Coder model
    timeout $T python3 bench/recalibration_study.py --model qwen2.5-coder-0.5b --device cuda --fit-windows 12 --minilm-train 0 \
      --test-windows 16 --topics-fit 60 --topics-test 120 --topic-chars 400 \
      --out $R/study-qwen2.5-coder-0.5b-h100.json --plot $R/study-qwen2.5-coder-0.5b-reliability.png --resume \
      2>&1 | grep -v "it/s" | tail -12 | cut -c1-300;;
  quant-smol)  # issue 3: ours vs GPTQModel vs RTN, SmolLM2, three settings (resumes a carried partial run)
    [ -f $R/quant-smollm2-135m-h100.json ] || cp bench/results/quant/smollm2-135m-h100.json $R/quant-smollm2-135m-h100.json
    timeout $T python3 bench/quant_quality.py all --model smollm2-135m --settings w4g128,w3g128,w2g64 \
      --methods float,rtn,gptq,gptqmodel,gptqmodel-matched,gptq-kl-adaquant --device cuda \
      --out $R/quant-smollm2-135m-h100.json --resume 2>&1 | grep -v "^>>" | cut -c1-300;;
  quant-qwen)
    timeout $T python3 bench/quant_quality.py all --model qwen2.5-coder-0.5b --calib-corpus stdlib \
      --settings w4g128,w3g128,w2g64 --methods float,rtn,gptq,gptqmodel,gptq-kl-adaquant,gptqmodel-matched \
      --device cuda --out $R/quant-qwen2.5-coder-0.5b-h100.json --resume 2>&1 | grep -v "^>>" | cut -c1-300;;
  quant-options)  # issue 16: the option rows (MSE grid, GPTAQ, rotation); MODEL=smollm2-135m for SmolLM2; SEED=0,1,2;
    # SETTINGS=, METHODS= (comma lists) narrow a call; CALIB= calibration samples (else the script's default); --resume keeps what
    # an earlier call measured (a different CALIB needs its own file: CALIB is in the name when it is set); TAG= names
    # a job's own file, so that jobs run at once under bg.sh (one per setting and seed) do not write one file
    M=${MODEL:-qwen2.5-coder-0.5b}; C=$([ $M = smollm2-135m ] && echo bbc || echo stdlib)
    timeout $T python3 bench/quant_quality.py all --model $M --calib-corpus $C --settings ${SETTINGS:-w3g128,w2g64} \
      --methods ${METHODS:-gptq,rotate+gptq+mse+gptaq,rotate+gptq,gptq+mse,gptq+gptaq,float,rtn,gptqmodel,gptqmodel-matched} \
      --device cuda --seed ${SEED:-0} ${CALIB:+--calib-samples $CALIB} \
      --out $R/quant-options-$M${CALIB:+-c$CALIB}-seed${SEED:-0}${TAG:+-$TAG}.json --resume 2>&1 | grep -v "^>>" | cut -c1-300;;
  select-qwen)
    timeout $T python3 bench/quant_selection.py --model qwen2.5-coder-0.5b --device cuda \
      --out $R/selection-qwen2.5-coder-0.5b-h100.json --resume 2>&1 | grep '^{';;
  select-smol)
    timeout $T python3 bench/quant_selection.py --model smollm2-135m --device cuda \
      --out $R/selection-smollm2-135m-h100.json --resume 2>&1 | grep '^{';;
  drafters)  # issue 7: the self-drafter recipe and the stock 0.5B at W4
    timeout 420 python3 -m compress run recipes/qwen-coder-1.5b-self-drafter.yaml --out /tmp/out/self-drafter --force \
      2>&1 | grep -v "it/s" | tail -25 | tee $R/self-drafter.log
    cp /tmp/out/self-drafter/report.json $R/self-drafter-report.json
    [ -d /tmp/out/q05-w4 ] || timeout 150 python3 -m compress run recipes/qwen-coder-0.5b-gptq-w3g128-code.yaml \
      --set stages[0].steps[0].bits=4 --out /tmp/out/q05-w4 --force 2>&1 | grep -v "it/s" | tail -5
    cp /tmp/out/q05-w4/report.json $R/q05-w4-report.json;;
  bench-code|bench-prose)  # the 1.5B target with each drafter, fixed gamma
    P=${1#bench-}
    draft qwen2.5-coder-0.5b $P q05
    draft /tmp/out/q05-w4 $P q05-w4 --int4-drafter
    draft /tmp/out/self-drafter $P self --int4-drafter;;
  bench1)  # one drafter on one prompt set: bench1 q05|q05-w4|self code|prose [draft-bench args]
    case $2 in q05) d=qwen2.5-coder-0.5b;; q05-w4) d="/tmp/out/q05-w4";; self) d=/tmp/out/self-drafter;; esac
    [ $2 = q05 ] || set -- "$@" --int4-drafter
    draft $d $3 $2 "${@:4}";;
  bench-extra)  # gamma 2 and confidence-stopped drafting with the best drafters, on code
    GAMMA=2 draft /tmp/out/q05-w4 code q05-w4-g2 --int4-drafter
    GAMMA=2 draft /tmp/out/self-drafter code self-g2 --int4-drafter
    draft /tmp/out/self-drafter code self-conf0.5 --int4-drafter --confidence-threshold 0.5;;
  lm-eval)  # the lm-eval table (bench/lm_eval_table.py) on cuda with many documents; needs the staging calls of
    # `prepare.sh --lm-eval 0.4.13 smollm2-135m` and `prep`. Resumable: one task at a time, saved after each, the
    # exports kept in /tmp/out; call the phase again until every model prints "every task measured" (a cold machine
    # goes on from a committed bench/results/serving/lm-eval-smollm2-h200.json). MODELS= narrows a call.
    J=lm-eval-smollm2-h200.json
    [ -f $R/$J ] || [ ! -f bench/results/serving/$J ] || cp bench/results/serving/$J $R/$J
    HF_DATASETS_OFFLINE=1 timeout $T python3 bench/lm_eval_table.py --device cuda --batch-size ${BATCH:-64} --calib-samples ${CALIB:-0} --resume \
      --work /tmp/out/lm-eval-table --models ${MODELS:-float,gptq-w4g128,nirvana-20,gptq-w3g128} \
      --limits ${LIMITS:-arc_easy=all,hellaswag=1000,piqa=all,winogrande=all,bbc_topics=all,stdlib_completion=all} \
      --out $R/$J 2>&1 | grep -E "^(float|gptq|nirvana)|Error|error:" | cut -c1-300
    python3 bench/lm_eval_table.py --table $R/$J 2>&1 | tail -12;;
  speed)  # compress eval --speed rows (issue 7, deliverable 1)
    for m in "qwen2.5-coder-1.5b" "qwen2.5-coder-0.5b" "/tmp/out/q05-w4 --int4" "/tmp/out/self-drafter --int4"; do
      name=$(echo $m | cut -d' ' -f1 | xargs basename)
      timeout 150 python3 -m compress eval $m --corpus stdlib --seq-len 512 --max-windows 8 --device cuda --dtype bfloat16 \
        --speed --compile --new-tokens 128 > $R/eval-speed-$name.json 2> $R/eval-speed-$name.err; tail -c 400 $R/eval-speed-$name.json
    done;;
  *) py "$@";;
esac
tar czf $OUT/$1.tar.gz -C $R . 2>/dev/null; ls -la $OUT
