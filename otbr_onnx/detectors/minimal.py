"""Detection on the user's images: the SMALLEST trigger that sends the other classes to each class.

For every class ``t`` and every trigger family, the search looks for the smallest trigger that
sends at least ``success`` (99 %: every image of a step's batch) of the user's images the model does NOT put in ``t`` (labelled
by the model's own answers: the images need no labels) to ``t``. A backdoor's target is reached by
a trigger far smaller than a natural class needs, so within ONE model its norm stands out below
the other classes'; the statistic compares classes of the same model, never models, so it needs
no per-architecture calibration.

Families (``x`` an image in ``[low, high]``, ``w = high - low``):

- ``patch`` (BadNets; Neural Cleanse, Wang et al., S&P 2019): ``x' = (1 - m) x + m p`` with a
  mask ``m = sigmoid(a)`` (H x W, shared by the channels) and a pattern ``p = low + w sigmoid(b)``;
  its norm is ``|m|_1`` (in pixels).
- ``additive`` (Blended, SIG, low-frequency keys): ``x' = clip(x + d, low, high)``, one ``d``
  shared by every image; its norm is ``|d|_2 / w``.

Per class the search minimises ``CE(f(x'), t) + lambda_t * norm`` with Adam over ``steps`` steps of
``batch`` images of the other classes each. ``lambda_t`` adapts every step: multiplied by
``cost_up`` when the step's images flip at ``>= success`` (the trigger can shrink) and divided by
``cost_down`` when they do not (it must grow back), so the search hovers at the boundary where
the trigger still just works. The class's norm is the smallest norm of any step whose images
flipped at ``>= success`` (the largest possible norm, ``H W`` or ``sqrt(C H W)``, where none did).

Anomaly index, per family, over the searched classes' ``v_c = ln n_c`` (``log_norms``; natural
classes' norms differ by factors, so one large natural norm would otherwise inflate the MAD):
``median = med(v)``, ``spread = max(1.4826 med|v - median|, min_spread)`` and
``index_c = (median - v_c) / spread`` (positive below the median; on raw norms the floor is
``min_spread * median``). A class is suspected when its
index exceeds its family's threshold in ANY family (``THRESHOLDS``; Neural Cleanse flags at 2);
``anomaly`` is the largest index over threshold. The floor on the spread keeps a model whose classes' norms nearly coincide
from turning a small difference into a large index.

Cost: ``steps`` forward+backward passes of ``classes x batch`` images per family (every class's
trigger is searched in the same pass), plus one verifying pass over the images. Seeded, on a fixed
subsample: the same model and images give the same result, and a rescan (``rerun``) runs exactly
this test with the same settings and images. ``history`` keeps each class's best norm at every
``checkpoint`` steps, so one run also shows what fewer steps would have given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from otbr_onnx.statistics import MAD_TO_SIGMA
from otbr_onnx.torch_helpers import class_scores, evaluating

if TYPE_CHECKING:
    from converters.chunking import Chunking
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel

LOG = logging.getLogger("otbr_onnx")

FAMILIES = ("patch", "additive")
MAX_CLASSES = 100  # as the inversion: above this the search is not run
# The anomaly index above which each family flags a class, chosen on the development split of
# benchmarks/split.py only (benchmarks/DETECTION_SPLIT.md): above every index any class of a model
# without a working backdoor reached there at the defaults (3 clean models and the failed
# MobileNetV2 attack: patch 2.2, additive 3.1), below most backdoor targets' (patch 2.6-5.1 on 5 of
# 7, additive 4.3-8.4 on 5 of 7). The patch margin is thin (0.3): expect false alarms on unseen
# models. Neural Cleanse's 2 would flag 2 of those 4 models.
THRESHOLDS = {"patch": 2.5, "additive": 4.0}


@dataclass(frozen=True)
class MinimalConfig:
    """How the search runs and judges; chosen on the development split (benchmarks/DETECTION_SPLIT.md)."""

    families: tuple[str, ...] = FAMILIES
    images: int = 200  # at most this many of the user's images (a seeded subsample)
    steps: int = 200  # Adam steps per family (all classes at once)
    batch: int = 16  # images of the other classes per class per step
    lr: float = 0.1
    # share of a step's images that must reach the class: 0.99, i.e. every one of the batch (0.9 gave
    # the same hits on the development split but clean classes' additive indices up to 5.6, not 3.1)
    success: float = 0.99
    patch_cost: float = 1e-3  # the starting lambda of the patch family (per pixel of mask)
    additive_cost: float = 1e-2  # the starting lambda of the additive family (per unit of |d|_2 / w)
    cost_up: float = 1.2
    cost_down: float = 1.2 ** 1.5
    mask_init: float = -2.0  # the mask's starting logit (sigmoid: 0.12 everywhere)
    # anomaly index above which a family flags a class (see THRESHOLDS)
    thresholds: tuple[tuple[str, float], ...] = tuple(THRESHOLDS.items())
    log_norms: bool = True  # the index on log norms (natural classes' norms spread by factors, not offsets)
    min_spread: float = 0.05  # the spread's floor: a share of the median norm (on log norms: of 1)
    checkpoint: int = 25  # history every this many steps
    seed: int = 0
    chunk: int = 256  # images per forward pass
    exact: bool = False  # the model takes exactly ``chunk`` images (pad the last pass)
    device: str = "cpu"
    input_range: tuple[float, float] = (0.0, 1.0)


def anomaly_index(norms: np.ndarray, min_spread: float = 0.05, log: bool = False) -> np.ndarray:
    """``(median - n_c) / max(1.4826 MAD, min_spread * median)`` over the finite entries (NaN: a
    class not searched, index 0): positive below the median. ``log``: of ``ln n`` instead, with
    the floor ``min_spread`` itself (a relative difference)."""
    values = np.asarray(norms, dtype=np.float64)
    index = np.zeros_like(values)
    finite = np.isfinite(values)
    if finite.sum() < 3:
        return index
    if log:
        values = np.where(finite, np.log(np.maximum(np.where(finite, values, 1.0), 1e-6)), np.nan)
    median = np.median(values[finite])
    floor = min_spread if log else min_spread * abs(median)
    spread = max(MAD_TO_SIGMA * np.median(np.abs(values[finite] - median)), floor, 1e-12)
    index[finite] = (median - values[finite]) / spread
    return index


def verdict(norms: dict[str, np.ndarray], thresholds: float | dict[str, float], searched: list[int] | None = None,
            min_spread: float = 0.05, log: bool = False) -> tuple[list[int], dict[str, np.ndarray]]:
    """The suspected classes (largest index over its family's threshold first) and each family's
    index. ``thresholds``: per family, or one for all."""
    if not isinstance(thresholds, dict):
        thresholds = {family: float(thresholds) for family in norms}
    index = {}
    for family, values in norms.items():
        values = np.asarray(values, dtype=np.float64).copy()
        if searched is not None:
            values[[c for c in range(len(values)) if c not in searched]] = np.nan
        index[family] = anomaly_index(values, min_spread, log)
    if not index:
        return [], index
    strongest = np.max([index[f] / thresholds[f] for f in index], axis=0)
    classes = len(strongest)
    suspected = ([int(c) for c in np.argsort(-strongest, kind="stable") if strongest[c] > 1.0]
                 if classes >= 3 else [])
    return suspected, index


@dataclass
class MinimalResult:
    """Per family each class's smallest working trigger norm, its anomaly index; the verdict."""

    families: tuple[str, ...]
    norms: dict[str, np.ndarray]  # family -> (C,) smallest norm that flipped >= success (NaN: not searched)
    reached: dict[str, np.ndarray]  # family -> (C,) whether any step flipped >= success
    flipped: dict[str, np.ndarray]  # family -> (C,) share of all the other classes' images the best trigger sends
    index: dict[str, np.ndarray]  # family -> (C,) anomaly index (positive below the median)
    thresholds: dict[str, float]
    suspected: list[int]
    searched: list[int]
    images: int
    seconds: float = 0.0
    history: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    triggers: dict[int, dict[str, object]] = field(default_factory=dict)
    sample: np.ndarray | None = field(default=None, repr=False)
    config: MinimalConfig | None = field(default=None, repr=False)

    @property
    def anomaly(self) -> np.ndarray:
        """(C,) each class's largest index over threshold across the families (> 1: flagged)."""
        return np.max([np.clip(self.index[f], 0.0, None) / self.thresholds[f] for f in self.families], axis=0)

    @property
    def evidence(self) -> dict[int, list[str]]:
        return {c: [f for f in self.families if self.index[f][c] > self.thresholds[f]] for c in self.suspected}

    def cleared(self, target: int) -> bool:
        return all(self.index[f][target] <= self.thresholds[f] for f in self.families)

    def statistic(self, target: int) -> float:
        return float(max(self.index[f][target] for f in self.families))

    def as_dict(self, pictures: bool = True) -> dict:
        def numbers(values: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else round(float(v), 4) for v in values]

        found = {
            "statistic": ("per family, the smallest trigger norm (patch: mask L1 in pixels; additive: |d|_2 over the "
                          "input range) sending >= success of the user's other-class images to the class; anomaly "
                          "index (median - norm) / (1.4826 MAD) over the classes"),
            "suspected_targets": [int(c) for c in self.suspected],
            "evidence": {str(c): fams for c, fams in self.evidence.items()},
            "thresholds": {f: float(t) for f, t in self.thresholds.items()},
            "log_norms": bool(self.config.log_norms if self.config else False),
            "min_spread": float(self.config.min_spread if self.config else 0.05),
            "images": int(self.images),
            "searched": [int(c) for c in self.searched],
            "seconds": round(float(self.seconds), 2),
            "norms": {f: numbers(v) for f, v in self.norms.items()},
            "index": {f: numbers(v) for f, v in self.index.items()},
            "reached": {f: [bool(b) for b in v] for f, v in self.reached.items()},
            "flipped": {f: numbers(v) for f, v in self.flipped.items()},
            "history": {f: [{"step": s, "norms": numbers(v)} for s, v in h] for f, h in self.history.items()},
        }
        if pictures:
            from otbr_onnx.detectors.inversion import picture
            found["triggers"] = {str(c): picture(t) for c, t in self.triggers.items()}
        return found


def subsample(images: np.ndarray, config: MinimalConfig) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if len(images) <= config.images:
        return images
    rng = np.random.default_rng(config.seed)
    return images[np.sort(rng.choice(len(images), config.images, replace=False))]


def _scores(module: nn.Module, x: torch.Tensor, output_index: int, is_probability: bool,
            config: MinimalConfig) -> torch.Tensor:
    """Logits (log-probabilities for a Softmax output) of ``x``, ``config.chunk`` images per pass."""
    return class_scores(module, x, output_index, is_probability, config.chunk, config.exact)


class _Family:
    """The stacked triggers of one family, one per class: ``apply`` to (K, B, C, H, W) images of
    classes ``rows``, ``norm`` per class."""

    def __init__(self, family: str, classes: int, shape: tuple[int, ...], config: MinimalConfig) -> None:
        self.family = family
        self.low, self.high = config.input_range
        self.width = self.high - self.low
        channels, height, width = shape
        generator = torch.Generator().manual_seed(config.seed)
        if family == "patch":
            self.parameters = [
                torch.full((classes, 1, 1, height, width), config.mask_init).requires_grad_(),
                torch.randn((classes, 1, channels, height, width), generator=generator).requires_grad_()]
            self.cost = config.patch_cost
            self.largest = float(height * width)
        elif family == "additive":
            start = (torch.rand((classes, 1, channels, height, width), generator=generator) * 2 - 1) * 0.01
            self.parameters = [(start * self.width).requires_grad_()]
            self.cost = config.additive_cost
            self.largest = float(np.sqrt(channels * height * width))
        else:
            raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
        self.parameters = [p.to(config.device).detach().requires_grad_() for p in self.parameters]

    def apply(self, x: torch.Tensor, rows: list[int], parameters: list[torch.Tensor] | None = None) -> torch.Tensor:
        parameters = self.parameters if parameters is None else parameters
        if self.family == "patch":
            mask = torch.sigmoid(parameters[0][rows])
            pattern = self.low + self.width * torch.sigmoid(parameters[1][rows])
            return (1 - mask) * x + mask * pattern
        return torch.clamp(x + parameters[0][rows], self.low, self.high)

    def norm(self, rows: list[int], parameters: list[torch.Tensor] | None = None) -> torch.Tensor:
        parameters = self.parameters if parameters is None else parameters
        if self.family == "patch":
            return torch.sigmoid(parameters[0][rows]).flatten(1).sum(1)
        return parameters[0][rows].flatten(1).norm(dim=1) / self.width

    def arrays(self, row: int, parameters: list[torch.Tensor]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            if self.family == "patch":
                return {"mask": torch.sigmoid(parameters[0][row, 0, 0]).cpu().numpy(),
                        "pattern": (self.low + self.width * torch.sigmoid(parameters[1][row, 0])).cpu().numpy()}
            return {"delta": parameters[0][row, 0].cpu().numpy()}


def search(module: nn.Module, images: np.ndarray, num_classes: int, output_index: int = 0,
           is_probability: bool = False, config: MinimalConfig = MinimalConfig(),
           progress: Callable[[int, int], None] | None = None, sampled: bool = False) -> MinimalResult:
    """The smallest-trigger search of every family for every class on ``images`` (the model's
    input layout and range) and its verdict. ``sampled``: ``images`` is already the subsample."""
    began = time.perf_counter()
    sample = np.asarray(images, dtype=np.float32) if sampled else subsample(images, config)
    norms, reached, flipped, history, best_arrays = {}, {}, {}, {}, {}
    total, done = len(config.families) * config.steps, [0]
    with evaluating(module, config.device):
        x = torch.from_numpy(sample).to(config.device)
        with torch.no_grad():
            answers = _scores(module, x, output_index, is_probability, config).argmax(1).cpu()
        sources = [torch.nonzero(answers != c).flatten() for c in range(num_classes)]
        searched = [c for c in range(num_classes) if len(sources[c])]
        for family in config.families:
            found = _search_family(module, x, sources, searched, num_classes, family, output_index,
                                   is_probability, config, lambda: _tick(done, total, progress))
            norms[family], reached[family], flipped[family], history[family], best_arrays[family] = found
    thresholds = {f: dict(config.thresholds)[f] for f in config.families}
    suspected, index = verdict(norms, thresholds, searched, config.min_spread, config.log_norms)
    chosen = {}
    for c in suspected:
        family = max(config.families, key=lambda f: index[f][c])
        chosen[c] = {"family": family, **best_arrays[family][c]}
    return MinimalResult(tuple(config.families), norms, reached, flipped, index, thresholds, suspected,
                         searched, len(sample), time.perf_counter() - began, history, chosen, sample, config)


def _tick(done: list[int], total: int, progress: Callable[[int, int], None] | None) -> None:
    done[0] += 1
    if progress is not None:
        progress(done[0], total)


def _search_family(module, x, sources, searched, num_classes, family, output_index, is_probability,
                   config: MinimalConfig, on_step):
    """Every searched class's trigger at once: per step ``batch`` other-class images per class,
    ``chunk // batch`` classes per forward pass; lambda adapted per class after each step."""
    shape = tuple(x.shape[1:])
    triggers = _Family(family, num_classes, shape, config)
    optimiser = torch.optim.Adam(triggers.parameters, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 1)
    cost = torch.full((num_classes,), float(triggers.cost))
    best = np.full(num_classes, np.inf)
    best_parameters = [p.detach().clone() for p in triggers.parameters]
    history: list[tuple[int, np.ndarray]] = []
    per_pass = max(1, config.chunk // config.batch)
    for step in range(1, config.steps + 1):
        picks = {c: sources[c][torch.randint(len(sources[c]), (config.batch,), generator=generator)] for c in searched}
        for parameter in triggers.parameters:
            parameter.grad = torch.zeros_like(parameter)
        step_flip, step_norm = {}, {}
        for first in range(0, len(searched), per_pass):
            block = searched[first:first + per_pass]
            images = torch.stack([x[picks[c]] for c in block])  # (K, B, C, H, W)
            triggered = triggers.apply(images, block)
            scores = _scores(module, triggered.reshape(-1, *shape), output_index, is_probability, config)
            targets = torch.tensor(block, device=scores.device).repeat_interleave(config.batch)
            ce = functional.cross_entropy(scores, targets, reduction="none").reshape(len(block), -1).mean(1)
            size = triggers.norm(block)
            loss = (ce + cost[block].to(size.device) * size).sum()
            for parameter, gradient in zip(triggers.parameters, torch.autograd.grad(loss, triggers.parameters)):
                parameter.grad += gradient
            with torch.no_grad():
                hits = (scores.argmax(1) == targets).float().reshape(len(block), -1).mean(1).cpu()
            for k, c in enumerate(block):
                step_flip[c], step_norm[c] = float(hits[k]), float(size[k].detach())
        # the norm and flip rate are those of the triggers before this step's update
        for c in searched:
            if step_flip[c] >= config.success:
                if step_norm[c] < best[c]:
                    best[c] = step_norm[c]
                    for saved, parameter in zip(best_parameters, triggers.parameters):
                        saved[c] = parameter.detach()[c]
                cost[c] *= config.cost_up
            else:
                cost[c] /= config.cost_down
        cost.clamp_(1e-8, 1e4)
        optimiser.step()
        if step % config.checkpoint == 0 or step == config.steps:
            history.append((step, _finished(best, triggers.largest, searched)))
        on_step()
    norms = _finished(best, triggers.largest, searched)
    reached = np.isfinite(best)
    flipped = np.zeros(num_classes)
    arrays: dict[int, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        final = [torch.where(_row_mask(p, reached), saved, p.detach()) for saved, p in
                 zip(best_parameters, triggers.parameters)]
        for c in searched:
            scores = _scores(module, triggers.apply(x[sources[c]][None], [c], final)[0], output_index,
                             is_probability, config)
            flipped[c] = float((scores.argmax(1) == c).float().mean())
            arrays[c] = triggers.arrays(c, final)
    return norms, reached, flipped, history, arrays


def _row_mask(parameter: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows).to(parameter.device).reshape(-1, *([1] * (parameter.dim() - 1)))


def _finished(best: np.ndarray, largest: float, searched: list[int]) -> np.ndarray:
    """Norms as reported: the best working norm, the largest possible where none worked, NaN where
    the class was not searched."""
    out = np.full(len(best), np.nan)
    for c in searched:
        out[c] = best[c] if np.isfinite(best[c]) else largest
    return out


@dataclass(frozen=True)
class MinimalDetector:
    """The minimal-trigger search as a ``detectors.base.Detector``."""

    name: str = "minimal_trigger"
    section: str = "minimal_trigger"
    config: MinimalConfig = MinimalConfig()

    def run(self, prepared: "PreparedModel", options: "CleanOptions", images: np.ndarray | None,
            progress: Callable[[str, int, int], None] | None = None) -> MinimalResult | None:
        if images is None:
            return None
        if prepared.num_classes > MAX_CLASSES or np.ndim(images) != 4:
            LOG.warning("minimal-trigger search skipped (%d classes, images of shape %s: it needs at most %d "
                        "classes and (N, C, H, W) images)", prepared.num_classes, tuple(np.shape(images)),
                        MAX_CLASSES)
            return None
        loaded = prepared.loaded
        on_step = (lambda done, total: progress("minimal", done, total)) if progress else None
        return search(prepared.module, images, prepared.num_classes, loaded.output_index,
                      loaded.output_is_probability, minimal_config(options, prepared.device, prepared.chunking,
                                                                   self.config), on_step)

    def rerun(self, module: nn.Module, before: MinimalResult, num_classes: int, output_index: int,
              is_probability: bool) -> MinimalResult | None:
        if before.sample is None or before.config is None:
            return None
        return search(module, before.sample, num_classes, output_index, is_probability, before.config, sampled=True)


DETECTOR = MinimalDetector()


def minimal_config(options: "CleanOptions", device: str, chunking: "Chunking",
                   base: MinimalConfig = MinimalConfig()) -> MinimalConfig:
    """``base`` with the options' seed, input range and device, and the memory plan's pass size."""
    from dataclasses import replace
    return replace(base, seed=options.run.seed, device=device, input_range=tuple(options.interface.input_range),
                   chunk=chunking.size, exact=chunking.exact)
