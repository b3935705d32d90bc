"""Size and forward cost of a model: parameters and multiply-accumulates (MACs) per input.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which intercepts every matrix product and
convolution at the ATen level (so any module structure, including ``torch.fx`` graph modules and multi-head
wrappers, is counted as it runs) and reports 2 FLOPs per multiply-accumulate. Norms, activations, pooling and
additions are not counted, the usual convention for MACs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a tensor shared by several submodules counts once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on one input (the first of ``example``), in eval mode."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(example[:1])
    model.train(was_training)
    return counter.get_total_flops() // 2
