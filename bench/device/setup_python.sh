#!/usr/bin/env bash
# Install the carried wheels (.whl) that the GPU machine's image lacks into /tmp/site.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
