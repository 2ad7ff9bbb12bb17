#!/usr/bin/env bash
# GPU machine side of staging a zoo model that is too big for one call's 64 MiB:
# each `device run` carries one chunk folder (.stage/<model>/pNN) and calls
#   bash bench/device/stage_parts.sh add .stage/<model>/pNN
# which copies it to /tmp/stage/<model>/; the last call runs
#   bash bench/device/stage_parts.sh join <model> <zoo-id> <sha256> [<source file name>]
# which concatenates the chunks in name order, checks the sha256 and puts the file
# where the zoo's fetch looks for a verified source ($COMPRESS_CACHE/sources/<id>-<name>).
set -euo pipefail
export COMPRESS_CACHE=${COMPRESS_CACHE:-/tmp/compress-cache}
case $1 in
  add)
    model=$(basename "$(dirname "$2")")
    mkdir -p "/tmp/stage/$model"
    cp "$2"/* "/tmp/stage/$model/"
    echo "$model: $(ls /tmp/stage/$model | wc -l) chunks staged";;
  join)
    model=$2 id=$3 sha=$4 name=${5:-part.bin}
    mkdir -p "$COMPRESS_CACHE/sources"
    out="$COMPRESS_CACHE/sources/$id-$name"
    cat $(ls /tmp/stage/$model/* | sort) > "$out.partial"
    got=$(sha256sum "$out.partial" | cut -d' ' -f1)
    [ "$got" = "$sha" ] || { echo "$id: sha256 mismatch: $got != $sha"; rm -f "$out.partial"; exit 1; }
    mv "$out.partial" "$out"
    echo "$id: verified $out";;
  *) echo "usage: stage_parts.sh add DIR | join MODEL ZOO_ID SHA256 [NAME]" >&2; exit 2;;
esac
