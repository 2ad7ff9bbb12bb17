"""Filesystem helpers shared by exports and the model zoo: folders written beside their target and
renamed into place, and JSON written atomically. Nothing here knows about models."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def temp_dir_beside(target: Path) -> Path:
    """An empty folder next to ``target`` (same filesystem, so a rename moves it into place),
    with the permissions a plain mkdir would give (mkdtemp makes 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an existing ``out``: a crash leaves
    either the old folder or the new one, never half of either."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON; tensors become lists and paths strings (the report holds both)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=json_default))
    os.replace(tmp, path)


def json_default(obj: Any) -> Any:
    # Duck-typed rather than isinstance(torch.Tensor): this module does not import torch.
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")
