#!/usr/bin/env bash
# The GPU machine's side of staging (what bench/device/prepare.sh made here). Every staging call
# runs the same command with its plan's carry list:
#   bash bench/device/gpu_setup.sh stage
# which installs carried wheels (.whl/, .whl-arrow/) into /tmp/site, copies carried corpus
# packages (.stage/pkgs/) into the cache, adds every carried chunk folder (.stage/<id>/pNN) to
# /tmp/stage with its sha256 checked, and joins every model whose chunks are all there into
# $COMPRESS_CACHE/sources/<id>-<file> (size and sha256 checked against the manifest), where
# `python -m compress models fetch ID` finds it. Then, in a call of its own or in `prep`:
#   bash bench/device/gpu_setup.sh convert ID...   # GGUF -> safetensors in $COMPRESS_CACHE/models
# Single steps: install | add DIR... | join ID... | status.
# /tmp persists only while the machine stays warm: make the calls back to back; `status` says
# which chunks a cold machine lost.
set -euo pipefail
export COMPRESS_CACHE=${COMPRESS_CACHE:-/tmp/compress-cache} STAGE=${STAGE:-/tmp/stage}
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
stage_py() { python3 bench/device/stage.py "$@"; }
carried_chunks() { find .stage -mindepth 3 -maxdepth 3 -path '.stage/*/p[0-9]*/manifest.json' -not -path '.stage/wheel-*' 2>/dev/null | sort | xargs -r -n1 dirname; }
install() {
  shopt -s nullglob; local wheels=(.whl/*.whl .whl-arrow/*.whl); shopt -u nullglob
  [ ${#wheels[@]} -gt 0 ] || { echo "install: no carried wheels"; return 0; }
  local have; have=$(cat /tmp/site/.carried 2>/dev/null || true)
  [ "$have" != "$(basename -a "${wheels[@]}")" ] || { echo "install: ${#wheels[@]} wheels already in /tmp/site"; return 0; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
  basename -a "${wheels[@]}" > /tmp/site/.carried
  python3 -c "import datasets, gguf, pydantic; print('install: datasets', datasets.__version__, 'gguf ok, pydantic', pydantic.VERSION)"
}
packages() {
  [ -d .stage/pkgs ] || return 0
  mkdir -p "$COMPRESS_CACHE/packages" && cp -r .stage/pkgs/. "$COMPRESS_CACHE/packages/"
  echo "packages: $(ls .stage/pkgs | tr '\n' ' ')-> $COMPRESS_CACHE/packages"
}
case ${1:-} in
  stage)
    install; packages
    chunks=$(carried_chunks)
    [ -z "$chunks" ] || stage_py add $chunks --stage "$STAGE"
    stage_py join --pending --stage "$STAGE" --dest "$COMPRESS_CACHE/sources"
    stage_py status --stage "$STAGE";;
  install) install;;
  add) shift; stage_py add "$@" --stage "$STAGE";;
  join) shift; stage_py join "$@" --stage "$STAGE" --dest "$COMPRESS_CACHE/sources";;
  status) stage_py status --stage "$STAGE"; ls -la "$COMPRESS_CACHE/sources" 2>/dev/null || true;;
  convert) shift; for id in "$@"; do python3 -m compress models fetch "$id" 2>&1 | grep -v "it/s" | tail -2 || echo "convert $id: failed (staged? see status)"; done;;
  *) sed -n 2,15p "$0" >&2; exit 2;;
esac
