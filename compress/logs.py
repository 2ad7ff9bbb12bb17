"""What the command line prints besides its results: this toolkit's own messages, and not the
warnings a library prints as it is imported that no user of the toolkit can act on.

``--verbose`` shows those too; ``--log-file PATH`` keeps every record, theirs included, in a file.

Why there are such warnings at all (the cause, found before silencing anything): transformers
imports torchao on every model load whenever torchao is installed (``transformers.modeling_utils``
-> ``quantizers.auto`` -> ``quantizer_torchao``, for any torchao >= 0.15), and torchao is installed
because gptqmodel 7.6 — the ``interop`` extra, which loads our GPTQ exports the way serving stacks
do — requires ``torchao>=0.18`` (it uses it only for FP4 checkpoints). No torchao version satisfies
gptqmodel and stays unimported, so the import cannot be pinned away; what torchao says on import is
silenced here, in one place, logger by logger. Nothing in this toolkit uses torchao.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

# The loggers silenced below ERROR, and what each says that a user cannot act on.
QUIET_LOGGERS = {
    # "Failed to load .../torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so": PyPI's torchao wheel
    # carries CUDA kernels built for CPython 3.10, which a CPU build of torch (or another Python)
    # cannot load.
    "torchao": "CUDA kernels of the torchao wheel that this torch or Python cannot load",
    # "Warning: Detected no triton, ...": a CPU build of torch has no triton.
    "torchao.kernel.intmm": "no triton in a CPU build of torch",
    # "<enum 'KernelPreference'> is an Enum subclass ... register_constant() ... deprecated": torchao
    # 0.18 registers its enums as pytree constants, which torch 2.13 deprecates; once per enum.
    "torch.utils._pytree": "torchao's enums registered the way torch deprecates",
}

_OURS = "compress"  # the toolkit's own loggers (compress.*): their INFO lines are progress a user reads
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Quiet(logging.Filter):
    """On a quieted logger: a record below ERROR is dropped unless ``show``; the log file, if any,
    gets it either way (records of torch's loggers do not propagate to the root's handlers, so the
    filter hands them to the file itself)."""

    def __init__(self, show: bool, log_file: logging.Handler | None):
        super().__init__()
        self.show, self.log_file = show, log_file

    def filter(self, record: logging.LogRecord) -> bool:
        shown = self.show or record.levelno >= logging.ERROR
        if self.log_file is not None and not (shown and _reaches_root(record.name)):
            self.log_file.handle(record)
        return shown


def _reaches_root(name: str) -> bool:
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None:
        if not logger.propagate:
            return False
        logger = logger.parent  # type: ignore[assignment]
    return True


class _ConsoleLevels(logging.Filter):
    """The console: INFO and above; DEBUG lines of the toolkit's own loggers with --verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        return self.verbose and (record.name == _OURS or record.name.startswith(_OURS + "."))


def configure_logging(*, verbose: bool = False, log_file: str | Path | None = None) -> None:
    """Set up the command line's logging: messages on stderr as plain lines, the quieted libraries'
    warnings dropped (``verbose`` keeps them), and with ``log_file`` every record of every logger at
    DEBUG with its time, level and logger name. Calling it again replaces what an earlier call set."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_compress_cli", False)]:
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(_ConsoleLevels(verbose))
    handlers: list[logging.Handler] = [console]
    file_handler = None
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler._compress_cli = True  # type: ignore[attr-defined]  # ours to replace on a later call
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if (verbose or log_file is not None) else logging.INFO)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _Quiet)]:
            logger.removeFilter(old)
        if not verbose or file_handler is not None:
            logger.addFilter(_Quiet(verbose, file_handler))
