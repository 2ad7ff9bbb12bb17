#!/usr/bin/env bash
# Issue 19 on a multi-GPU H200 (nvidia-h200-x2 / -x4 / -x8): `compress run` under torchrun, NCCL.
#   bash bench/device/dist_window.sh PHASE
# Before the first phase, the staging call(s) that `bash bench/device/prepare.sh smollm2-135m` printed
# (only its wheels are needed: the models here are random-weight llamas built there, and the
# calibration text is this repository's own files), each running `bash bench/device/gpu_setup.sh stage`.
# Results go to $OUT (the device returns them). Not yet run: no multi-GPU machine has been lent.
set -uo pipefail
export COMPRESS_CACHE=/tmp/compress-cache PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
T=${PHASE_TIMEOUT:-560}  # seconds a phase may run (the call's limit is 600)
G=$(nvidia-smi -L | wc -l)
ranks() { local r="1"; for n in 2 4 8; do [ $n -le $G ] && r="$r,$n"; done; echo $r; }
scale() {  # scale SHAPE LAYERS: GPTQ w4g128 on 1, 2, 4 (8) GPUs, 128 x 2048 calibration tokens
  timeout $T python3 bench/dist_gptq.py --shape $1 --layers $2 --ranks $(ranks) --device cuda --dtype bfloat16 \
    --num-samples 128 --seq-len 2048 --batch-size 8 --out $OUT/scale-$1-L$2-h200x$G.json 2>&1 | grep -v Warning | tail -12
}
case $1 in
  tests)  # the CPU tests of compress/distributed.py, and the equality of 2 NCCL ranks with 1 GPU
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpus.txt
    timeout 300 python3 -m pytest -q tests/test_distributed.py -p no:cacheprovider 2>&1 | tail -5 | tee $OUT/tests.txt
    timeout 240 python3 bench/dist_gptq.py --shape small --layers 2 --ranks 1,2 --device cuda --num-samples 16 \
      --seq-len 512 --out $OUT/equal-small-h200.json 2>&1 | tail -3;;
  8b) scale 8b ${LAYERS:-8};;     # 8B-shaped, the first LAYERS of 32 blocks
  14b) scale 14b ${LAYERS:-8};;   # 14B-shaped, the first LAYERS of 48 blocks
  *) echo "usage: dist_window.sh tests|8b|14b" >&2; exit 2;;
esac
