#!/usr/bin/env bash
# Issue 16's Qwen2.5-Coder-0.5B matrix at three seeds, 128 calibration samples, on one GPU: the option rows that
# earlier holds measured at one seed only, as six background jobs at once (bench/device/bg.sh; one per setting
# and seed, each into its own file quant-options-qwen2.5-coder-0.5b-c128-seedS-TAG.json). Quality only: the jobs
# share the GPU and the 16 cores, so their quantize seconds are not comparable with a job run alone.
#   bash bench/device/quant_options_jobs.sh start    # after the staging calls of prepare.sh --peer 7.6.0 qwen2.5-coder-0.5b
#   bash bench/device/bg.sh wait q-s2-w2 540; bash bench/device/bg.sh status; bash bench/device/bg.sh collect
set -uo pipefail
[ "${1:-}" = start ] || { sed -n 2,7p "$0" >&2; exit 2; }
ALL=rtn,gptq,gptq+mse,gptq+gptaq,rotate+gptq
job() {  # job NAME SEED SETTING TAG METHODS
  mkdir -p /tmp/bgout-$1
  bash bench/device/bg.sh start $1 "OUT=/tmp/bgout-$1 OMP_NUM_THREADS=2 PHASE_TIMEOUT=1700 CALIB=128 SEED=$2 \
SETTINGS=$3 TAG=$4 METHODS=$5 bash bench/device/gpu_window.sh quant-options"
}
job q-s0-w3 0 w3g128 w3 $ALL
job q-s1-w3 1 w3g128 w3 $ALL,rotate+gptq+mse+gptaq
job q-s2-w3 2 w3g128 w3 $ALL,rotate+gptq+mse+gptaq
job q-s0-w2 0 w2g64 w2 $ALL,rotate+gptq+gptaq,gptqmodel-matched
job q-s1-w2 1 w2g64 w2 rotate+gptq+mse+gptaq,gptqmodel,gptqmodel-matched,$ALL,rotate+gptq+gptaq
job q-s2-w2 2 w2g64 w2 rotate+gptq+mse+gptaq,gptqmodel,gptqmodel-matched,$ALL,rotate+gptq+gptaq
