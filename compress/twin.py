"""The float model run beside the one being calibrated, block by block (for GPTAQ).

The layer-wise runner changes each block in place as it solves it, so the float model's inputs
to a linear are gone by then. A ``FloatTwin`` keeps them: at each block it copies the block
before anything in it is solved, runs the copy on the float hidden states of each batch just
before the runner feeds that batch to the block being quantized (capturing the float inputs of
the linears being accumulated), and at the end of the block replays the copy to get the next
block's float hidden states. Tokens pair one to one, so a mixture of experts (whose routing
differs between the float and the quantized model) is refused.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from compress import moe
from compress.errors import CompressError


class FloatTwin:
    def __init__(self):
        self.hidden: list[torch.Tensor] | None = None  # float inputs of the current block, per batch
        self.copy: nn.Module | None = None
        self.twin_of: dict[int, nn.Module] = {}  # id(module of the live block) -> its float copy
        self.captured: dict[int, torch.Tensor] = {}  # id(module of the live block) -> this batch's float input

    def begin(self, block: nn.Module, inputs: list) -> None:
        """Called by the runner before block ``block`` is solved; ``inputs`` its (quantized) inputs."""
        if moe.expert_of(block):
            raise CompressError("gptq asymmetric (GPTAQ) pairs float and quantized tokens one to one; a mixture "
                                "of experts routes them differently: use asymmetric: false on this model")
        if self.hidden is None:  # block 0: the embeddings are not quantized, so both models agree
            self.hidden = [x.hidden for x in inputs]
        self.inputs = inputs
        self.copy = copy.deepcopy(block)
        live = dict(block.named_modules())
        self.twin_of = {id(live[n]): m for n, m in self.copy.named_modules()}

    def input_of(self, module: nn.Module):
        """A callable giving ``module``'s float input for the batch being fed (for an accumulator)."""
        return lambda: self.captured[id(module)]

    @torch.no_grad()
    def feed(self, j: int, modules: list[nn.Module], device) -> None:
        """Run the float copy on batch ``j``, keeping the inputs of (the copies of) ``modules``."""
        from compress.runner import StopForward, _to  # the runner imports nothing of this module
        self.captured.clear()
        left = {id(m) for m in modules}

        def keep(orig_id):
            def hook(_m, args, _out):
                self.captured[orig_id] = args[0].detach()
                left.discard(orig_id)
                if not left:
                    raise StopForward
            return hook
        hooks = [self.twin_of[id(m)].register_forward_hook(keep(id(m))) for m in modules]
        try:
            self.copy(self.hidden[j].to(device), **_to(self.inputs[j].kwargs, device))
        except StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def end(self, device, offload) -> None:
        """The block is solved: replay the float copy for the next block's float inputs."""
        from compress.runner import _block_output, _to
        self.hidden = [_block_output(self.copy(h.to(device), **_to(x.kwargs, device))).to(offload)
                       for h, x in zip(self.hidden, self.inputs)]
        self.copy, self.twin_of, self.captured = None, {}, {}
