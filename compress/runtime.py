"""Where and with what a run happens: the compute device, the versions a report records, and
running a model on the device for the length of one evaluation."""
from __future__ import annotations

import platform
from contextlib import contextmanager
from typing import Iterator

import torch

from compress import __version__
from compress.errors import CompressError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"model.device is {name!r} but CUDA is not available here; use auto or cpu")
    return torch.device(name)


def versions() -> dict:
    """What a report records about the software and the machine it ran on."""
    import transformers  # slow to import: only for a report, whose caller has loaded a model (and it)

    return {"compress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


@contextmanager
def on_device(model: torch.nn.Module, device) -> Iterator[torch.nn.Module]:
    """Run ``model`` on ``device`` in eval mode, then put it back where (and as) it was.

    Layer-wise stages keep a model on the CPU and move one block at a time; evaluation
    needs the whole model on the compute device for the duration of the call only.
    """
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    try:
        yield model
    finally:
        model.to(home).train(was_training)
