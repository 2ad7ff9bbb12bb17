"""Data-free steps (RTN) over a model in memory or streamed: one module at a time, or block by block
through the streamed model's block source (``compress.runner.BLOCK_SOURCE``, ``compress.stream``)."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from tqdm.auto import tqdm

from compress.errors import CompressError
from compress.runner import BLOCK_SOURCE, block_layout


def per_block(model: nn.Module, modules: dict[str, nn.Module], solve: Callable[[str, nn.Module], Any], *,
              device, progress: bool, desc: str) -> dict[str, Any]:
    """``solve(name, module)`` for each module: in model order for a model in memory; block by
    block through the source for a streamed one (a data-free step such as ``rtn``: one pass)."""
    source = model.__dict__.get(BLOCK_SOURCE)
    if source is None:
        return {n: solve(n, m) for n, m in tqdm(modules.items(), desc=desc, unit="linear", disable=not progress)}
    layout = block_layout(model).blocks
    outside = [n for n in modules if not n.startswith(layout + ".")]
    if outside:
        raise CompressError(f"a streamed model is compressed block by block; these targets lie outside "
                            f"{layout}: {outside[:5]} (add them to `ignore`)")
    source.begin_pass()
    reports: dict[str, Any] = {}
    for i in tqdm(range(source.n_blocks), desc=desc, unit="block", disable=not progress):
        if source.finished(i):
            reports.update(source.reports(i))
            continue
        prefix = f"{layout}.{i}."
        block = source.acquire(i, device)
        try:
            mine = {n: solve(n, m) for n, m in modules.items() if n.startswith(prefix)}
            reports.update(mine)
            source.done(i, block, mine)
        finally:
            source.release(i, block)
    return reports
