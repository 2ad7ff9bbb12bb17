"""Filesystem helpers shared by exports and the model zoo: folders written beside their target and
renamed into place, and JSON written atomically. Nothing here knows about models."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask


def temp_dir_beside(target: Path) -> Path:
    """An empty folder next to ``target`` (same filesystem, so a rename moves it into place),
    with the permissions a plain mkdir would give (mkdtemp makes 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def make_readable(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open()`` would (0644 under a 022 umask),
    and every folder that of a plain mkdir.

    Some writers make their output private: safetensors' ``save_file`` writes through a temporary
    file and renames it, which leaves it 0600, while the rest of an export is 0644. A serving process
    running as another user could then read the config but not the weights."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


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


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary name beside ``path`` (this process's own: two may write the same
    file), then renamed over it: a reader or a crash sees the old file or the new one, never half of
    one. A failed ``write`` leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON; tensors become lists and paths strings (the report holds both)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=json_default))


def json_default(obj: Any) -> Any:
    # Duck-typed rather than isinstance(torch.Tensor): this module does not import torch.
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")
