"""What a user does to a cleaned model after ``clean``, replayed on a copy: re-estimating its
BatchNorm statistics on clean images (quantisation calibration does the same), and a short
fine-tuning on clean labelled images.

A removal that only masks a backdoor (Min et al., NeurIPS 2024: "superficial safety") comes back
under either; ``clean`` replays the recalibration on the user's images and rescans, and the
benchmarks replay both. Every function here works on a deep copy and leaves its input untouched.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from otbr_onnx.torch_helpers import cross_entropy


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (the ones a recalibration rewrites)."""
    return [layer for layer in module.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
            and layer.running_mean is not None]


def recalibrate(module: nn.Module, images: np.ndarray, batch: int = 50) -> nn.Module:
    """A copy of ``module`` whose BatchNorm running statistics are re-estimated from ``images``
    (``recalibrate_in_place``), in eval mode. A module without BatchNorm comes back as an
    unchanged copy."""
    copied = copy.deepcopy(module).eval()
    recalibrate_in_place(copied, images, batch)
    return copied


def recalibrate_in_place(module: nn.Module, images: np.ndarray | torch.Tensor, batch: int = 50) -> None:
    """Re-estimate ``module``'s BatchNorm running statistics from ``images`` (a cumulative average
    over batches of ``batch`` images, which weighs every image the same when the batches are equal;
    weights unchanged); the BatchNorm layers end in eval mode with their momentum as it was."""
    layers = batchnorm_layers(module)
    if not layers:
        return
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: every image counts the same
        layer.train()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            module(torch.as_tensor(images[start:start + batch], dtype=torch.float32, device=device))
    for layer, momentum in zip(layers, saved):
        layer.momentum = momentum
        layer.eval()


def finetune(module: nn.Module, images: np.ndarray, labels: np.ndarray, steps: int = 100, batch: int = 50,
             lr: float = 1e-3, momentum: float = 0.9, seed: int = 0, output_index: int = 0,
             is_probability: bool = False) -> nn.Module:
    """A copy of ``module`` after ``steps`` of SGD on cross-entropy over random batches of
    (``images``, ``labels``), in train mode (BatchNorm statistics move as in any fine-tuning),
    returned in eval mode. The benchmark's robustness check (b)."""
    copied = copy.deepcopy(module).train()
    device = next((p.device for p in copied.parameters()), torch.device("cpu"))
    params = [p for p in copied.parameters() if p.dtype.is_floating_point]
    for p in params:  # a copy of a frozen module still fine-tunes, as the user's would
        p.requires_grad_(True)
    optimiser = torch.optim.SGD(params, lr=lr, momentum=momentum)
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(images, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.as_tensor(rng.choice(len(x), size=min(batch, len(x)), replace=False), device=device)
            loss = cross_entropy(copied(x[index]), y[index], output_index, is_probability)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return copied.eval()
