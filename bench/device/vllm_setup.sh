#!/usr/bin/env bash
# The GPU machine's side of bringing vLLM 0.26.0 (what bench/device/vllm_prepare.sh made here).
# Every staging call runs, with the carry list the plan printed:
#   bash bench/device/vllm_setup.sh stage
# which copies carried wheel folders (.whl-vllm/gNN/) into /tmp/vllm-wheels, adds carried chunk folders
# of large wheels (.stage/wheel-*/pNN, sha256 checked: bench/device/stage.py) to /tmp/vstage and joins
# every complete one into /tmp/vllm-wheels (size and sha256 checked). Then, once all are there:
#   bash bench/device/vllm_setup.sh install   # pip install --no-deps into /tmp/vsite, then vllm_check.py
# Use: PYTHONPATH=/tmp/vsite:/tmp/site:$PWD (vllm_window.sh sets it). /tmp lasts while the machine is
# warm (30 s after a call): make the calls back to back; `status` says what a cold machine lost.
set -euo pipefail
W=/tmp/vllm-wheels VS=/tmp/vstage SITE=/tmp/vsite
mkdir -p $W $VS
case ${1:-} in
  stage)
    shopt -s nullglob
    for d in .whl-vllm/g*/; do cp -n "$d"*.whl $W/ && echo "wheels: $(ls "$d" | wc -l) from $d"; done
    chunks=(.stage/wheel-*/p*/)
    [ ${#chunks[@]} -eq 0 ] || python3 bench/device/stage.py add "${chunks[@]%/}" --stage $VS
    python3 bench/device/stage.py join --pending --stage $VS --dest $W
    python3 bench/device/stage.py status --stage $VS
    echo "$(ls $W | wc -l) wheels in $W";;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $W/*.whl
    PYTHONPATH=$SITE:/tmp/site:$PWD python3 bench/device/vllm_check.py --site $SITE;;
  status) python3 bench/device/stage.py status --stage $VS; ls $W | wc -l;;
  *) sed -n 2,11p "$0" >&2; exit 2;;
esac
