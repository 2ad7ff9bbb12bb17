#!/usr/bin/env bash
# The GPU machine's side of staging (what bench/device/prepare.sh made here). Every staging call
# runs the same command with its plan's carry list:
#   bash bench/device/gpu_setup.sh stage
# which installs carried wheels (.whl/, .whl-arrow/, .whl-peer/: GPTQModel's, its sdist-only PyPcre built
# here; .whl-lmeval/: lm-evaluation-harness's) into /tmp/site, copies carried corpus
# packages (.stage/pkgs/), lm-eval task data (.stage/lm_eval/) and an earlier window's greedy continuations
# (.stage/generations/, the self_spec step's generation cache) into the cache, adds every carried chunk folder (.stage/<id>/pNN) to
# /tmp/stage with its sha256 checked, and joins every model whose chunks are all there into
# $COMPRESS_CACHE/sources/<id>-<file> (size and sha256 checked against the manifest), where
# `python -m compress models fetch ID` finds it. Then, in a call of its own or in `prep`:
#   bash bench/device/gpu_setup.sh convert ID...   # GGUF -> safetensors in $COMPRESS_CACHE/models
# Single steps: install | add DIR... | join ID... | status.
# /tmp persists only while the machine stays warm: make the calls back to back; `status` says
# which chunks a cold machine lost.
set -euo pipefail
export COMPRESS_CACHE=${COMPRESS_CACHE:-/tmp/compress-cache} STAGE=${STAGE:-/tmp/stage}
export SITE=${SITE:-/tmp/site}  # where carried wheels go (a test points it elsewhere)
export PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1
stage_py() { python3 bench/device/stage.py "$@"; }
carried_chunks() { find .stage -mindepth 3 -maxdepth 3 -path '.stage/*/p[0-9]*/manifest.json' -not -path '.stage/wheel-*' 2>/dev/null | sort | xargs -r -n1 dirname; }
install() {
  shopt -s nullglob; local wheels=(.whl/*.whl .whl-arrow/*.whl .whl-peer/*.whl .whl-lmeval/*.whl) sdists=(.whl-peer/*.tar.gz); shopt -u nullglob
  [ $((${#wheels[@]} + ${#sdists[@]})) -gt 0 ] || { echo "install: no carried wheels"; return 0; }
  local carried have built s; carried=$(basename -a "${wheels[@]}" "${sdists[@]}")
  have=$(cat "$SITE/.carried" 2>/dev/null || true)
  [ "$have" != "$carried" ] || { echo "install: ${#wheels[@]} wheels already in $SITE"; return 0; }
  # An sdist carried in .whl-peer/ has a C extension this side could not build for Python 3.12 (PyPcre):
  # built here, with this image's compiler, headers and setuptools, and no registry.
  built=$(mktemp -d)
  for s in "${sdists[@]}"; do
    python3 -m pip wheel -q --no-index --no-deps --no-build-isolation --no-cache-dir -w "$built" "$s" \
      || { echo "install: building $(basename "$s") here failed (it needs gcc, Python.h and libpcre2-8)" >&2; return 1; }
  done
  shopt -s nullglob; wheels+=("$built"/*.whl); shopt -u nullglob
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  rm -rf "$built"
  echo "$carried" > "$SITE/.carried"
  [ ! -d .whl ] || python3 -c "import datasets, gguf, pydantic; print('install: datasets', datasets.__version__, 'gguf ok, pydantic', pydantic.VERSION)"
  # Not fatal: gptqmodel also needs .whl/'s datasets, which another call of the plan may carry; staging goes on.
  if [ -d .whl-lmeval ]; then  # not fatal: lm-eval needs .whl/'s datasets, which another call of the plan may carry
    local lerr; lerr=$(mktemp)
    if python3 -c "import lm_eval, lm_eval.models.huggingface; print('install: lm_eval', lm_eval.__version__, 'imports')" \
        2>"$lerr"; then :; else echo "install: lm_eval does not import yet (is .whl/ installed too?): $(tail -1 "$lerr")"; fi
    rm -f "$lerr"
  fi
  [ -d .whl-peer ] || return 0
  local v err; err=$(mktemp)  # gptqmodel prints a banner: its version comes back on fd 3
  if v=$(python3 -c "import gptqmodel, os; os.write(3, gptqmodel.__version__.encode())" 3>&1 1>/dev/null 2>"$err"); then
    echo "install: gptqmodel $v imports"
  else echo "install: gptqmodel does not import yet (is .whl/ installed too?): $(tail -1 "$err")"; fi
  rm -f "$err"
}
packages() {
  if [ -d .stage/lm_eval ]; then  # extracted task data, where compress/harness/data.py looks before any download
    mkdir -p "$COMPRESS_CACHE/lm_eval" && cp -r .stage/lm_eval/. "$COMPRESS_CACHE/lm_eval/"
    echo "lm_eval data: $(cd .stage/lm_eval && find . -name state.json | wc -l) task folders -> $COMPRESS_CACHE/lm_eval"
  fi
  if compgen -G ".stage/generations/*.safetensors" > /dev/null; then  # an earlier window's greedy continuations
    mkdir -p "$COMPRESS_CACHE/generations" && cp .stage/generations/*.safetensors "$COMPRESS_CACHE/generations/"
    echo "generations: $(ls .stage/generations/*.safetensors | wc -l) cached continuation files -> $COMPRESS_CACHE/generations"
  fi
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
