#!/usr/bin/env bash
# Reassemble a zoo model's source file on the GPU machine from chunks carried by
# successive `device run` calls (each call carries one .stage/pN folder), check
# its sha256, and place it where the zoo's fetch looks for a verified source.
#   usage: bash bench/device/stage_model.sh ZOO_ID FILENAME SHA256 NPARTS
set -euo pipefail
id=$1 name=$2 sha=$3 nparts=$4
export COMPRESS_CACHE=${COMPRESS_CACHE:-/tmp/compress-cache}
mkdir -p /tmp/stage "$COMPRESS_CACHE/sources"
cp -n .stage/p*/* /tmp/stage/ 2>/dev/null || true
have=$(ls /tmp/stage | wc -l)
echo "staged parts: $have / $nparts"
if [ "$have" -eq "$nparts" ]; then
  out="$COMPRESS_CACHE/sources/$id-$name"
  cat $(ls /tmp/stage/* | sort) > "$out.partial"
  got=$(sha256sum "$out.partial" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || { echo "sha256 mismatch: $got != $sha"; rm -f "$out.partial"; exit 1; }
  mv "$out.partial" "$out"
  echo "verified $out"
fi
