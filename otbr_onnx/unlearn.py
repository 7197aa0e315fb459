"""Stage 3 (rank), ``nwc`` score: random unlearning, gradient ascent of cross-entropy on pure noise.

No data is used: inputs are uniform noise over the model's input range and labels are drawn
uniformly over all classes. The weights that move most are the ones the ranking stage calls
backdoor-related. Ascent is unbounded, so every step checks the loss: a non-finite loss, or one
past ``max_loss`` (100 nats by default), stops the ascent before that step is taken. Gradient
clipping (``max_grad_norm``) is off by default; the loss cap is what bounds the ascent.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from converters.chunking import Chunking
from converters.to_torch import TorchTensorRef
from otbr_onnx.errors import UsageError
from otbr_onnx.torch_helpers import cross_entropy


@dataclass(frozen=True)
class UnlearnConfig:
    iterations: int = 20
    batch_size: int = 256
    lr: float = 1e-4
    momentum: float = 0.9
    seed: int = 0
    device: str = "cpu"
    input_range: tuple[float, float] = (0.0, 1.0)
    # Ascent on cross-entropy has no maximum; an optional gradient-norm bound on each step
    # (None, the default: no clipping, ``max_loss`` bounds the ascent instead).
    max_grad_norm: float | None = None
    # Stop ascending once noise cross-entropy passes this many nats: by then the logits have
    # blown up and further steps only push weights towards inf (seen at lr 1e-2, 50 steps).
    max_loss: float | None = 100.0
    micro_batch: int | None = None  # split each batch to bound memory (see _ascent_gradients)
    exact: bool = False  # the model runs only at batch ``micro_batch``: the last chunk is padded
    train_mode: bool = True  # the reference unlearns with BatchNorm in train mode


@dataclass
class UnlearnLog:
    losses: list[float] = field(default_factory=list)
    stopped_early: str | None = None


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but torch sees no CUDA device")
    return requested


def random_unlearning(
    module: nn.Module,
    refs: dict[str, TorchTensorRef],
    input_shape: tuple[int, ...],
    num_classes: int,
    output_index: int,
    output_is_probability: bool,
    config: UnlearnConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, np.ndarray], UnlearnLog]:
    """Unlearn a copy of ``module``; return the weights named in ``refs`` afterwards (ONNX layout)."""
    torch.manual_seed(config.seed)
    student = copy.deepcopy(module).to(config.device)
    student.train(config.train_mode)
    params = _trainable(student, refs)
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    generator = torch.Generator().manual_seed(config.seed)
    low, high = config.input_range
    log = UnlearnLog()
    for step in range(config.iterations):
        x = torch.rand((config.batch_size,) + tuple(input_shape[1:]), generator=generator) * (high - low) + low
        y = torch.randint(0, num_classes, (config.batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        value = _ascent_gradients(student, x, y, config, output_index, output_is_probability)
        if not math.isfinite(value):
            log.stopped_early = f"loss became non-finite at step {step}"
            break
        if config.max_loss is not None and value > config.max_loss:
            log.stopped_early = f"loss {value:.1f} passed the cap of {config.max_loss} at step {step}"
            break
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        log.losses.append(value)
        if on_step is not None:
            on_step(step, value)
    student = student.cpu()
    return {name: ref.read(student) for name, ref in refs.items()}, log


def _ascent_gradients(student: nn.Module, x: torch.Tensor, y: torch.Tensor, config: UnlearnConfig,
                      output_index: int, output_is_probability: bool) -> float:
    """Accumulate the gradient of -CE over the batch, ``micro_batch`` images at a time.

    Chunking bounds activation memory (the batch's activations are most of the peak); in train
    mode BatchNorm then normalises each chunk with its own statistics, so it is opt-in.
    """
    chunking = Chunking(config.micro_batch or len(x), config.exact)
    total = 0.0
    for start, stop in chunking.spans(len(x)):
        xs, ys = chunking.pad(x[start:stop]).to(config.device), y[start:stop].to(config.device)
        loss = cross_entropy(student(xs), ys, output_index, output_is_probability) * ((stop - start) / len(x))
        (-loss).backward()  # ascent: maximise the loss on noise
        total += float(loss.detach())
    return total


def _trainable(student: nn.Module, refs: dict[str, TorchTensorRef]) -> list[torch.Tensor]:
    """All parameters, plus weight buffers (onnx2torch keeps MatMul weights as buffers)."""
    params = [p for p in student.parameters() if p.dtype.is_floating_point]
    seen = {id(p) for p in params}
    for ref in refs.values():
        tensor = ref.tensor(student)
        if id(tensor) not in seen:
            tensor.requires_grad_(True)
            params.append(tensor)
            seen.add(id(tensor))
    for p in params:
        p.requires_grad_(True)
    return params

