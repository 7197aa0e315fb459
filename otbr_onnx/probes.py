"""Data-free probe images: inputs synthesised from the model itself, one target class each.

Used to choose the pruning ratio without data (``ratio.py``): a probe set on which the original
model is confident, so that a cleaning which changes the model's answers on many probes is
visibly changing its behaviour. Synthesis is model inversion (as in DAFL/DeepInversion): start
from uniform noise over the input range and descend cross-entropy towards the probe's class with
Adam, clamping to the range. Where the graph keeps BatchNorm layers (not folded into convs), the
DeepInversion feature prior is added: the batch statistics at each BatchNorm input are pulled
towards its running statistics, which keeps probes in the region the model was trained on.
Exports that fold BN have no statistics to read; probes are then class impressions only.

The original model's weights are read, never changed: gradients are taken w.r.t. the inputs only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from converters.chunking import Chunking
from otbr_onnx.torch_helpers import cross_entropy, evaluating, prior_layers


@dataclass(frozen=True)
class ProbeConfig:
    count: int = 64  # probes; classes are spread over them (round robin, or a seeded sample if more)
    steps: int = 20  # Adam reaches the class within ~10 steps on the benchmark models; 20 keeps the cost near 15% of unlearning
    lr: float = 0.1  # Adam step, as a share of the input range
    bn_prior: float = 1.0  # weight of the BatchNorm-statistics prior (0: class impressions only)
    seed: int = 0
    device: str = "cpu"
    input_range: tuple[float, float] = (0.0, 1.0)
    chunking: Chunking = Chunking()  # images per forward+backward pass (memory budget, fixed batch)


def probe_classes(count: int, num_classes: int, seed: int) -> np.ndarray:
    """The class each probe is synthesised for: every class in turn, or a seeded sample of
    ``count`` distinct classes when there are more classes than probes."""
    if num_classes <= count:
        return np.arange(count) % num_classes
    return np.sort(np.random.default_rng(seed).choice(num_classes, count, replace=False))


def synthesise_probes(
    module: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    output_index: int,
    output_is_probability: bool,
    config: ProbeConfig,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``config.count`` float32 inputs shaped like ``input_shape[1:]`` (no data read)."""
    low, high = config.input_range
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.count,) + tuple(input_shape[1:])
    x = (torch.rand(shape, generator=generator) * (high - low) + low).to(config.device)
    target = torch.from_numpy(probe_classes(config.count, num_classes, config.seed)).long().to(config.device)
    # eval: running statistics stay untouched; BN uses them, as at deployment
    with evaluating(module, config.device):
        statistics = _BatchNormStatistics(module) if config.bn_prior > 0 else None
        x.requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=config.lr * (high - low))
        try:
            for step in range(config.steps):
                x.grad = _gradient(module, x, target, output_index, output_is_probability, statistics, config)
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(low, high)
                if on_step is not None:
                    on_step(step)
        finally:
            if statistics is not None:
                statistics.remove()
    return x.detach().cpu().numpy().astype(np.float32)


def _gradient(module: nn.Module, x: torch.Tensor, target: torch.Tensor, output_index: int,
              output_is_probability: bool, statistics: "_BatchNormStatistics | None",
              config: ProbeConfig) -> torch.Tensor:
    """The loss's gradient w.r.t. the probes (never the weights), one chunk's graph at a time.

    Cross-entropy is a mean over images, so each chunk's share is weighted by its size and the
    sum is the whole batch's gradient. The BatchNorm prior compares batch statistics: chunked,
    each chunk is compared on its own (only graphs that keep BatchNorm have a prior).
    """
    chunking, gradient = config.chunking, torch.zeros_like(x)
    for start, stop in chunking.spans(len(x)):
        part = x[start:stop].detach().requires_grad_(True)
        share = (stop - start) / len(x)
        loss = cross_entropy(module(chunking.pad(part)), target[start:stop], output_index, output_is_probability)
        if statistics is not None:
            loss = loss + config.bn_prior * statistics.distance(stop - start)
        (gradient[start:stop],) = torch.autograd.grad(loss * share, [part])
    return gradient


class _BatchNormStatistics:
    """Records each BatchNorm's input during a forward pass, to compare with its running stats."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[tuple[nn.modules.batchnorm._BatchNorm, torch.Tensor]] = []
        self.handles = [layer.register_forward_hook(self._record) for layer in prior_layers(module)]

    def _record(self, layer: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        self.inputs.append((layer, inputs[0]))

    def distance(self, rows: int | None = None) -> torch.Tensor:
        """Mean over BN layers of the RMS gap between batch and running mean and variance; the
        per-channel RMS keeps wide and narrow layers on one scale. Over the first ``rows``
        images of the batch (the rest pad it to a fixed size). Clears the record."""
        terms = []
        for layer, value in self.inputs:
            value = value[:rows]
            dims = [d for d in range(value.dim()) if d != 1]
            mean, var = value.mean(dims), value.var(dims, unbiased=False)
            gap = (mean - layer.running_mean).pow(2).mean().sqrt() + (var - layer.running_var).pow(2).mean().sqrt()
            terms.append(gap)
        self.inputs.clear()
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
