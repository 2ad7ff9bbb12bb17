#!/usr/bin/env bash
# Install the carried wheels that the GPU machine's image lacks into /tmp/site: .whl/ and, in a
# call of its own (pyarrow alone is ~55 MB of the 64 MiB a call carries), .whl-arrow/.
shopt -s nullglob
wheels=(.whl/*.whl .whl-arrow/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "no carried wheels"; exit 0; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
echo "installed ${#wheels[@]} wheels into /tmp/site"
