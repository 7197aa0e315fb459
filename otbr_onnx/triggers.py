"""Trigger families a backdoor can use, as small trainable PyTorch modules on a batch of images.

Both trigger inversion (detection: the smallest trigger that sends other classes' images to a
class) and adversarial unlearning (removal: the trigger the model still obeys, which it is then
trained to ignore) search over the same three parametrisations, the ones the attack literature
covers:

- ``Patch``: ``x' = (1 - m) x + m p``, a mask ``m`` in [0, 1] per pixel and a pattern ``p`` in
  the input range (BadNets-style patches; Neural Cleanse's parametrisation).
- ``Additive``: ``x' = clip(x + d)``, one perturbation ``d`` shared by every image, each value
  within ``+-eps`` of the input range's width (Blended, SIG, low-frequency; I-BAU's universal
  perturbation).
- ``Warp``: ``x' = grid_sample(x, identity + flow)``, a smooth flow upsampled from a ``k x k``
  grid, at most ``max_shift`` pixels per direction (WaNet).

Each trigger has ``size()``: a differentiable number in [0, 1] that says how much of the image it
changes (mask area; mean |d| over the range; mean shift over ``max_shift``), which an inversion
penalises and a report prints. ``optimise`` runs the search for any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

FAMILIES = ("patch", "additive", "warp")


class Trigger(nn.Module):
    """A trigger applied to a batch ``(N, C, H, W)`` inside the input range ``[low, high]``."""

    family = ""

    def __init__(self, shape: tuple[int, int, int], input_range: tuple[float, float]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.low, self.high = float(input_range[0]), float(input_range[1])

    def size(self) -> torch.Tensor:
        raise NotImplementedError

    def project(self) -> None:
        """Bring the parameters back inside the trigger's budget after an optimiser step."""


class Patch(Trigger):
    """Mask and pattern; the mask starts nearly empty so that the search grows it where it pays.

    ``area`` (optional): a hard budget, the mask's mean at most ``area`` (a share of the pixels):
    the sigmoid mask is scaled down whenever its mean exceeds it, differentiably, so a search at a
    fixed budget needs no size penalty. None: no bound (the size penalty alone limits it)."""

    family = "patch"

    def __init__(self, shape: tuple[int, int, int], input_range: tuple[float, float], seed: int = 0,
                 area: float | None = None) -> None:
        super().__init__(shape, input_range)
        self.area = None if area is None else float(area)
        generator = torch.Generator().manual_seed(seed)
        channels, height, width = self.shape
        self.mask_logit = nn.Parameter(torch.full((1, 1, height, width), -3.0))
        self.pattern_logit = nn.Parameter(torch.randn((1, channels, height, width), generator=generator))

    def mask(self) -> torch.Tensor:
        mask = torch.sigmoid(self.mask_logit)
        if self.area is not None:
            mask = mask * torch.clamp(self.area / mask.mean().clamp_min(1e-12), max=1.0)
        return mask

    def pattern(self) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(self.pattern_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask()
        return (1 - mask) * x + mask * self.pattern()

    def size(self) -> torch.Tensor:
        return self.mask().mean()


class Additive(Trigger):
    """One perturbation shared by all images, ``|d| <= eps * (high - low)`` everywhere."""

    family = "additive"

    def __init__(self, shape: tuple[int, int, int], input_range: tuple[float, float], eps: float = 0.2,
                 seed: int = 0) -> None:
        super().__init__(shape, input_range)
        generator = torch.Generator().manual_seed(seed)
        self.bound = eps * (self.high - self.low)
        start = (torch.rand((1, *self.shape), generator=generator) * 2 - 1) * self.bound * 0.1
        self.delta = nn.Parameter(start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + self.delta, self.low, self.high)

    def size(self) -> torch.Tensor:
        return self.delta.abs().mean() / (self.high - self.low)

    def project(self) -> None:
        with torch.no_grad():
            self.delta.clamp_(-self.bound, self.bound)


class Warp(Trigger):
    """A smooth displacement field: ``k x k`` control points, bilinearly upsampled, each
    displacement at most ``max_shift`` pixels (tanh-bounded)."""

    family = "warp"

    def __init__(self, shape: tuple[int, int, int], input_range: tuple[float, float], k: int = 4,
                 max_shift: float = 1.0, seed: int = 0) -> None:
        super().__init__(shape, input_range)
        generator = torch.Generator().manual_seed(seed)
        _, height, width = self.shape
        self.max_shift = float(max_shift)
        self.control = nn.Parameter(torch.randn((1, 2, k, k), generator=generator) * 0.1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("identity", torch.stack((xs, ys), dim=-1)[None], persistent=False)
        # one pixel in grid_sample's [-1, 1] coordinates, per direction (x, y)
        self.register_buffer("pixel", torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)]),
                             persistent=False)

    def flow(self) -> torch.Tensor:
        """Displacement in pixels, ``(1, H, W, 2)``."""
        _, height, width = self.shape
        field = functional.interpolate(torch.tanh(self.control), size=(height, width), mode="bicubic",
                                       align_corners=True)
        return self.max_shift * torch.clamp(field, -1, 1).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.identity + self.flow() * self.pixel
        warped = functional.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear",
                                        padding_mode="border", align_corners=True)
        return torch.clamp(warped, self.low, self.high)

    def size(self) -> torch.Tensor:
        return self.flow().abs().mean() / self.max_shift


def make(family: str, shape: tuple[int, int, int], input_range: tuple[float, float], seed: int = 0,
         **budget: float) -> Trigger:
    """A fresh trigger of ``family`` (one of ``FAMILIES``) for images of ``shape`` (C, H, W)."""
    if family == "patch":
        return Patch(shape, input_range, seed, budget.get("area"))
    if family == "additive":
        return Additive(shape, input_range, budget.get("eps", 0.2), seed)
    if family == "warp":
        return Warp(shape, input_range, int(budget.get("k", 4)), budget.get("max_shift", 1.0), seed)
    raise ValueError(f"unknown trigger family {family!r}; expected one of {', '.join(FAMILIES)}")


@dataclass(frozen=True)
class Search:
    """How a trigger is searched: Adam on its parameters, ``steps`` of ``batch`` images each."""

    steps: int = 60
    batch: int = 64
    lr: float = 0.1
    size_weight: float = 0.0  # weight of ``trigger.size()`` in the loss (patch: Neural Cleanse's lambda)
    seed: int = 0


# the loss of a batch of logits against the search's goal, e.g. cross-entropy towards a class
Goal = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def optimise(trigger: Trigger, logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             labels: torch.Tensor, goal: Goal, search: Search = Search()) -> Trigger:
    """Minimise ``goal(logits_of(trigger(x_b)), labels_b) + size_weight * trigger.size()`` over the
    trigger's parameters, on random batches of ``x`` (the model's weights are not touched, only
    read). Returns ``trigger``, optimised in place."""
    generator = torch.Generator().manual_seed(search.seed)
    optimiser = torch.optim.Adam(trigger.parameters(), lr=search.lr)
    for _ in range(search.steps):
        index = torch.randperm(len(x), generator=generator)[:search.batch]
        loss = goal(logits_of(trigger(x[index])), labels[index]) + search.size_weight * trigger.size()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        trigger.project()
    return trigger


def towards(target: int) -> Goal:
    """Cross-entropy towards ``target`` (a targeted trigger)."""
    def goal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(logits, torch.full_like(labels, target))
    return goal


def away(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the cross-entropy of the given labels, bounded (an untargeted trigger, I-BAU's goal):
    the clamp keeps images already flipped from dominating the gradient."""
    return -functional.cross_entropy(logits, labels, reduction="none").clamp(max=10.0).mean()


def flipped(trigger: Trigger, logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            labels: torch.Tensor, target: int | None = None, batch: int = 256) -> float:
    """Share of ``x`` whose answer the trigger changes from ``labels`` (to ``target`` when given)."""
    hits = 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            answers = logits_of(trigger(x[start:start + batch])).argmax(1)
            wanted = labels[start:start + batch]
            hits += int(((answers == target) if target is not None else (answers != wanted)).sum())
    return hits / max(len(x), 1)
