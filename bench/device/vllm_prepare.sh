#!/usr/bin/env bash
# This machine's side of bringing vLLM to the GPU machine (issue 18 part 1):
#   [LEAN=1] bash bench/device/vllm_prepare.sh [--vllm 0.26.0]   # LEAN=1: pack --lean (vllm_wheels.py LEAN_SKIP)
# vLLM 0.26.0 is the release whose wheel pins the GPU image's torch (Requires-Dist: torch==2.11.0,
# torchvision==0.26.0, torchaudio==2.11.0; 0.27.0 moved to torch 2.13). It downloads vllm and, read
# from the wheels' own metadata, every requirement the GPU image lacks (bench/device/vllm_wheels.py,
# bench/device/gpu_image_packages.txt) into .whl-vllm/all/, packs them into carry folders .whl-vllm/gNN/
# and .stage/wheel-<name>/pNN/ chunks (stage.py's manifest), and prints each call's carry list; every
# such call runs `bash bench/device/vllm_setup.sh stage` there, then one `vllm_setup.sh install`.
# The models and the toolkit's own wheels come from bench/device/prepare.sh as before (their own plan).
set -euo pipefail
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
version=0.26.0
[ "${1:-}" != "--vllm" ] || version=$2
{ git check-ignore -q .whl-vllm/x && git check-ignore -q .stage/x; } || { echo "vllm_prepare.sh: .whl-vllm/ and .stage/ must be git-ignored" >&2; exit 2; }
$PY bench/device/vllm_wheels.py resolve --vllm "$version" --out .whl-vllm
$PY bench/device/vllm_wheels.py pack --out .whl-vllm ${LEAN:+--lean}
