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


def class_scores(module: nn.Module, x: torch.Tensor, output_index: int, is_probability: bool, chunk: int,
                 exact: bool = False) -> torch.Tensor:
    """Logits (log-probabilities for a Softmax output) of ``x``, ``chunk`` images per pass.
    ``exact``: every pass gets exactly ``chunk`` images (the last one padded with copies of its last
    image), so the result does not depend on how the images were split into passes."""
    parts = []
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        missing = chunk - len(part) if exact else 0
        if missing > 0:
            part = torch.cat([part, part[-1:].expand(missing, *part.shape[1:])])
        out = module(part)
        out = out[output_index] if isinstance(out, (tuple, list)) else out
        out = out.reshape(out.shape[0], -1)[:len(part) - missing]
        parts.append(torch.log(out.clamp_min(1e-30)) if is_probability else out)
    return torch.cat(parts)
