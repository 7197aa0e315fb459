"""How many images each forward pass may hold: the model's own batch size, and the memory budget.

Two constraints decide it, both computed once per model in ``prepare``:

* **the model's batch dimension.** A model whose input declares a fixed batch (1 is common in
  edge exports) is cleaned through a working copy whose batch dim is made dynamic, when the
  graph allows it (``load.fixed_batch`` checks the copy with shape inference and an onnxruntime run at
  batch 2 against the model itself). Where the graph hard-codes the batch (a ``Reshape`` to
  ``[1, -1]``), every pass runs at exactly the model's batch size instead: the last chunk of a
  batch is padded with copies of its last image, whose outputs are dropped (``Chunking.exact``).
* **memory.** Activation memory per image is measured with one forward pass under
  ``torch.autograd.graph.saved_tensors_hooks`` (the bytes autograd keeps for the backward pass,
  x1.5 for the gradients the backward pass allocates), and the micro-batch is the number of
  images that fit the budget left once the process's current size and a reserve for copies of
  the weights are taken off ``--max-memory``.

Results do not depend on the micro-batch where no BatchNorm runs in train mode: the scan and
probe gradients are per image, the unlearning gradient is accumulated over chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from converters.chunking import MAX_PASS, Chunking  # noqa: F401 - Chunking: still importable from here

if TYPE_CHECKING:  # torch is imported where it is used: load reads BatchPlan without it
    from torch import nn

GIB = 1024**3
DEFAULT_MAX_MEMORY = 2 * GIB
AVAILABLE_SHARE = 0.5  # of free memory (host, or CUDA device), when that is less than the default
# Copies of the weights alive beside the activations: the unlearning student, its gradients and
# its SGD momentum. (Write-back's copies come after the activations are freed.)
WEIGHT_COPIES = 3
# Share of the budget planned for: allocator slack and short-lived buffers take the rest.
HEADROOM = 0.95
# The backward pass frees saved tensors as it goes; its gradients add about half again (ResNet-50
# at 224: 42 MB saved per image, clean's peak within the 2 GiB default at the chosen micro-batch).
BACKWARD_FACTOR = 1.5
# The probes' BatchNorm prior (probes.py) takes the mean and variance of every BatchNorm input:
# the variance's backward forms (x - mean) and its gradient, each the size of that input, beside
# what autograd saved. PP-LCNet at 224 measured 1.15x its BN inputs per image above the scan.
BN_PRIOR_FACTOR = 2.0
# The scan's margin search holds, per image searched: the parameter u, its gradient, Adam's two
# moments, the best input so far and the starting draw. It may take this share of what is left
# for activations; more images are searched in blocks (detectors.margin.maximise_margins).
SEARCH_STATE_COPIES = 6
SEARCH_SHARE = 0.25


@dataclass(frozen=True)
class BatchPlan:
    """How the model's batch dimension is fed (see the module docstring)."""

    declared: int | None = None  # the batch size the input declares; None: dynamic
    path: str = "dynamic"  # "dynamic", "made dynamic" (a working copy) or "fixed" (its own size)
    reason: str | None = None  # why a fixed batch could not be made dynamic

    @property
    def exact(self) -> int | None:
        """The batch every pass must have, or None when any size runs."""
        return self.declared if self.path == "fixed" else None

    def as_dict(self) -> dict:
        return {"declared": self.declared, "path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class MemoryPlan:
    """The memory budget and the micro-batch chosen from it; reported as is."""

    max_memory: int  # bytes the process may use (host RSS, or CUDA device memory)
    source: str  # how max_memory was set
    per_sample: int  # measured activation bytes of one image, forward and backward
    activation_budget: int  # what was left for activations
    micro_batch: int  # images per forward+backward pass
    probe_per_sample: int  # per_sample plus the probes' BatchNorm prior (equal without BatchNorm)
    probe_micro_batch: int  # images per probe pass
    scan_block: int | None = None  # images the margin search holds at once; None: all of them
    forced: bool = False  # the model's own batch needs more than the budget allows

    @property
    def chunking_size(self) -> int:
        return min(self.micro_batch, MAX_PASS)

    @property
    def probe_chunking_size(self) -> int:
        return min(self.probe_micro_batch, MAX_PASS)

    def as_dict(self) -> dict:
        return {"max_memory": self.max_memory, "source": self.source, "per_sample_bytes": self.per_sample,
                "activation_budget": self.activation_budget, "micro_batch": self.micro_batch,
                "probe_per_sample_bytes": self.probe_per_sample, "probe_micro_batch": self.probe_micro_batch,
                "scan_block": self.scan_block,
                "over_budget": self.forced}


def parse_size(text: str) -> int:
    """``2G``, ``512M``, ``1.5GiB``, ``100000`` (bytes) -> bytes; ValueError when not a size."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    for suffix, factor in (("K", 1024), ("M", 1024**2), ("G", GIB), ("T", 1024**4)):
        if value.endswith(suffix):
            value, scale = value[:-1], factor
            break
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return int(number * scale)


def available_memory(device: str) -> int | None:
    """Free bytes: of the CUDA device (``torch.cuda.mem_get_info``), or the host's MemAvailable."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        return int(psutil.virtual_memory().available)  # Linux: /proc/meminfo's MemAvailable
    except (OSError, psutil.Error):
        return None


def default_budget(device: str) -> tuple[int, str]:
    """``--max-memory`` when not given: on CPU 2 GiB or half the available memory, whichever is
    less; on CUDA half the free device memory."""
    free = available_memory(device)
    if device == "cuda" and free is not None:
        return int(free * AVAILABLE_SHARE), "default: half of the free CUDA memory"
    if free is not None and free * AVAILABLE_SHARE < DEFAULT_MAX_MEMORY:
        return int(free * AVAILABLE_SHARE), "default: half of the available memory (less than 2 GiB)"
    return DEFAULT_MAX_MEMORY, "default: 2 GiB"


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so that the process's size,
    which the budget is measured against, is what it really holds."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def current_rss() -> int:
    """This process's resident set size now (0 where it cannot be read)."""
    try:
        return int(psutil.Process().memory_info().rss)  # Linux: /proc/self/statm
    except (OSError, psutil.Error):
        return 0


def per_sample_bytes(module: nn.Module, input_shape: tuple[int, ...], count: int, device: str) -> tuple[int, int]:
    """Activation bytes one image costs in a forward+backward pass of ``module``, and the bytes of
    one image's BatchNorm inputs (what the probes' BatchNorm prior reads again).

    One forward pass of ``count`` images with gradients on (eval mode, the input requiring a
    gradient as in the scan) records every tensor autograd saves for the backward pass; each
    storage is counted once, parameters and buffers not at all.
    """
    import torch

    from otbr_onnx.torch_helpers import evaluating, prior_layers

    weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen: dict[int, int] = {}
    normalised = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def count_bn_input(_layer: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        normalised[0] += inputs[0].numel() * inputs[0].element_size()

    with evaluating(module, device):
        handles = [layer.register_forward_hook(count_bn_input) for layer in prior_layers(module)]
        x = torch.rand((count,) + tuple(input_shape[1:]), device=device, requires_grad=True)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                module(x)
        finally:
            for handle in handles:
                handle.remove()
    saved = sum(seen.values()) + x.numel() * x.element_size()
    return max(int(BACKWARD_FACTOR * saved / count), 1), normalised[0] // count


def search_block(room: int, image_bytes: int, search_images: int) -> tuple[int | None, int]:
    """Images the margin search holds at once (None: all ``search_images``) within
    ``SEARCH_SHARE`` of ``room`` bytes, and the bytes that state takes."""
    state = SEARCH_STATE_COPIES * image_bytes
    block = max(int(SEARCH_SHARE * max(room, 0)) // state, 1)
    if block >= search_images:
        return None, search_images * state
    return block, block * state


def memory_plan(module: nn.Module, input_shape: tuple[int, ...], batch: BatchPlan, weight_bytes: int,
                max_memory: int | None, device: str, held_bytes: int = 0, search_images: int = 0) -> MemoryPlan:
    """The micro-batch for ``module``: as many images as the activation budget holds, once the
    process's size, three copies of the weights and what is held beside the activations are taken
    off: ``held_bytes`` (the unlearning's noise batch, held whole) or the scan's search state for
    ``search_images`` images (in blocks when it would take more than ``SEARCH_SHARE``), the
    larger of the two, as they are never alive together."""
    import torch

    budget, source = (max_memory, "--max-memory") if max_memory is not None else default_budget(device)
    count = batch.exact or 1
    per_sample, bn_inputs = per_sample_bytes(module, input_shape, count, device)
    probe_per_sample = per_sample + int(BN_PRIOR_FACTOR * bn_inputs)
    release_memory()
    used = (torch.cuda.memory_allocated() if device == "cuda" else current_rss()) + WEIGHT_COPIES * weight_bytes
    room = int(HEADROOM * budget) - used
    block, search_bytes = search_block(room, 4 * math.prod(input_shape[1:]), search_images)
    activation_budget = max(room - max(held_bytes, search_bytes), 0)
    fits = max(activation_budget // per_sample, 1)
    probe_fits = max(activation_budget // probe_per_sample, 1)
    if batch.exact:  # the model's own size, whatever the budget: one pass cannot be smaller
        return MemoryPlan(budget, source, per_sample, activation_budget, batch.exact, probe_per_sample, batch.exact,
                          block, forced=batch.exact > probe_fits)
    return MemoryPlan(budget, source, per_sample, activation_budget, int(fits), probe_per_sample, int(probe_fits),
                      block, forced=activation_budget < probe_per_sample)
