"""Where fetched packages, converted models and corpora are cached.

``COMPRESS_CACHE`` overrides the location; otherwise ``$XDG_CACHE_HOME/compress``
(``~/.cache/compress``). Everything in it can be deleted and is rebuilt on demand.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = os.environ.get("COMPRESS_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compress"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
