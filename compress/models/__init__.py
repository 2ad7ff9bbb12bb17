"""Model zoo and loading: zoo ids, local Hugging Face directories, toolkit exports, hub ids.

``load_model(source)`` is the one entry point. A *source* is
  - a zoo id (``smollm2-135m``; see ``ZOO``): fetched, verified and converted once;
  - a local directory: a Hugging Face model or an export of this toolkit (whose
    ``compress_export.json`` names a format with its own loader, ``compress.formats``);
  - a hub id (``org/name``), for users with network access.

The zoo table and the source check (``zoo.py``) are plain Python; loading (``load.py``) imports
torch, so its names are bound on first use: validating a recipe does not import torch.
"""
from compress.deferred import deferred_names
from compress.models.zoo import DEFAULT_MODEL, ZOO, ZooEntry, check_model_source

__all__ = ["ZOO", "DEFAULT_MODEL", "ZooEntry", "LoadedModel", "load_model", "load_tokenizer", "resolve_model_dir",
           "fetch_model", "check_model_source", "parse_dtype", "zoo_rows"]

__getattr__ = deferred_names(__name__, {name: "compress.models.load" for name in (
    "LoadedModel", "load_model", "load_tokenizer", "resolve_model_dir", "fetch_model", "parse_dtype", "zoo_rows")})
