"""Small PyTorch helpers shared by the scan, the probes, the unlearning and the memory plan: the
cross-entropy of a converted module's class output, the BatchNorm layers the probes' prior reads,
and a module borrowed in eval mode on a device (train flag and device restored afterwards).

It imports nothing of the project, so that ``detect``, ``probes``, ``unlearn`` and ``sizing`` can
all use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def cross_entropy(out, y: torch.Tensor, output_index: int, is_probability: bool) -> torch.Tensor:
    """Cross-entropy of a converted module's class output (logits, or probabilities after Softmax)
    on the first ``len(y)`` rows (the rest pad a chunk to a fixed batch size)."""
    if isinstance(out, (tuple, list)):
        out = out[output_index]
    out = out.reshape(out.shape[0], -1)[:len(y)]
    if is_probability:  # a trailing Softmax: cross-entropy on its log
        return nn.functional.nll_loss(torch.log(out.clamp_min(1e-12)), y)
    return nn.functional.cross_entropy(out, y)


def prior_layers(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers the probes' prior compares with their running statistics."""
    return [layer for layer in module.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None]


@contextmanager
def evaluating(module: nn.Module, device: str) -> Iterator[nn.Module]:
    """``module`` in eval mode on ``device`` with gradients on, then its train flag and device back
    (also when the body raises). Its weights are never changed here."""
    was_training = module.training
    original_device = next((p.device for p in module.parameters()), torch.device("cpu"))
    module.eval().to(device)
    try:
        with torch.enable_grad():
            yield module
    finally:
        module.to(original_device).train(was_training)
