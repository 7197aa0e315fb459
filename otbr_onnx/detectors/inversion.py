"""Detection on the user's images: trigger inversion at a small fixed budget, per class and family.

For every class ``t`` and every trigger family of ``otbr_onnx.triggers`` (a masked patch, an
additive perturbation shared by all images, a smooth warp), one trigger is optimised to send the
user's images that the model does NOT put in ``t`` (labelled by the model's own answers: the images
need no labels) to ``t``, at a small fixed budget:

- patch: a mask covering at most ``patch_area`` of the pixels (BadNets-size; Neural Cleanse's
  mask and pattern, S&P 2019, with a hard area instead of a penalty);
- additive: ``|d| <= additive_eps`` of the input range (Blended, SIG, low-frequency keys);
- warp: a ``k x k`` smooth flow of at most ``warp_shift`` pixels (WaNet).

The statistic of ``(t, family)`` is the mean target margin ``z_t - max_{k != t} z_k`` the trigger
reaches on those images: a continuous number, so that classes nothing flips still differ (a flip
rate near 0 at every class makes a robust z explode on noise). A backdoor's target is reached by a
trigger far smaller than a natural class needs, so its margin stands out against the other
classes' in the leave-one-out robust z of ``detectors.margin.robust_z``. A class is suspected when its z
exceeds the family's threshold in ANY family; the threshold of each family is set from clean
models only (``THRESHOLDS``; measured in benchmarks/DETECTION.md).

Cost: ``steps`` forward+backward passes of ``classes x batch`` images per family (all classes'
triggers are searched in one batch), plus one scoring pass over the images. The search is seeded
and runs on a fixed subsample, so the same model and images give the same result: the rescan of
a cleaned model (``detect.rescan_module``) runs exactly this test with the same settings.
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

from otbr_onnx import statistics
from otbr_onnx import triggers as trigger_families
from otbr_onnx.torch_helpers import class_scores, evaluating

if TYPE_CHECKING:
    from converters.chunking import Chunking
    from otbr_onnx.options import CleanOptions
    from otbr_onnx.prepare import PreparedModel

LOG = logging.getLogger("otbr_onnx")

FAMILIES = trigger_families.FAMILIES
# Robust z (leave-one-out, over the classes of one model) above which a family flags a class.
# Set from CLEAN models only (benchmarks/detection.py --data 50 and 200 on the 11 clean models of
# DATA_MODELS: PreAct, VGG, MobileNetV2 from 3 seeds, PreAct-x2 from 2): the largest z any class of
# any clean model reached in that family (patch 3.61, additive 2.62, warp 3.12), plus 1, rounded
# up. Set for NO false alarm on those 11 models; leave-one-clean-model-out the same rule flagged 2
# of 22 clean runs (one MobileNetV2, both image counts): expect about 1 in 10 on unseen clean
# models. Never tuned on backdoored models (benchmarks/DETECTION.md, calibration section). The
# thresholds hold for the ``InversionConfig`` defaults only.
THRESHOLDS = {"patch": 4.7, "additive": 3.7, "warp": 4.2}
# Above this many classes the inversion is not run (its cost grows with the classes: each class
# searches its own trigger in every family); ``detect`` then gives the margin scan's verdict alone.
MAX_CLASSES = 100
# The smallest spread a robust z divides by, relative to the typical |margin| (as detectors.margin.MIN_SPREAD)
MIN_SPREAD = 0.05


@dataclass(frozen=True)
class InversionConfig:
    """How the inversion searches; every field changes the statistic, so the thresholds in
    ``THRESHOLDS`` hold for the defaults only."""

    families: tuple[str, ...] = FAMILIES
    images: int = 200  # at most this many of the user's images (a seeded subsample)
    steps: int = 60  # Adam steps per family (all classes at once)
    # The patch family's own step count. 150 was measured (200 images, 32 models): the patch family
    # alone then flagged 5 of 21 backdoors (3 at 60) but a clean MobileNetV2's patch z rose to 4.4,
    # so the calibration rule (largest clean z + 1) would lift the threshold to 5.4 and lose the
    # gain; combined hits stayed 14/21, at 72 s of inversion per model instead of 36. Kept at 60.
    patch_steps: int = 60
    batch: int = 16  # images per class per step
    lr: float = 0.2
    patch_area: float = 0.015  # share of the pixels a patch mask may cover (a 3x3 patch on 28x28: 0.011)
    additive_eps: float = 0.1  # |d| bound, as a share of the input range
    warp_shift: float = 0.5  # pixels
    warp_grid: int = 4  # control points per side of the warp field
    thresholds: tuple[tuple[str, float], ...] = tuple(THRESHOLDS.items())
    seed: int = 0
    chunk: int = 256  # images per forward pass
    exact: bool = False  # the model takes exactly ``chunk`` images (pad the last pass)
    device: str = "cpu"
    input_range: tuple[float, float] = (0.0, 1.0)

    def budget(self, family: str) -> dict[str, float]:
        return {"patch": {"area": self.patch_area}, "additive": {"eps": self.additive_eps},
                "warp": {"max_shift": self.warp_shift, "k": self.warp_grid}}[family]

    def steps_of(self, family: str) -> int:
        return self.patch_steps if family == "patch" else self.steps

    def threshold(self, family: str) -> float:
        return dict(self.thresholds)[family]


@dataclass
class InversionResult:
    """Per family: each class's mean target margin, share flipped and robust z; the verdict."""

    families: tuple[str, ...]
    margins: dict[str, np.ndarray]  # family -> (C,) mean target margin reached at the budget
    flipped: dict[str, np.ndarray]  # family -> (C,) share of the other classes' images sent to the class
    z: dict[str, np.ndarray]  # family -> (C,) leave-one-out robust z of the margins
    thresholds: dict[str, float]
    suspected: list[int]  # flagged by any family, by anomaly (z / threshold), largest first
    images: int  # images used
    budgets: dict[str, dict[str, float]]
    seconds: float = 0.0
    # suspected class -> {"family", and the trigger's arrays: mask/pattern, delta or flow}
    triggers: dict[int, dict[str, object]] = field(default_factory=dict)
    # the subsample the search ran on, kept so that a rescan runs the same test (not reported)
    sample: np.ndarray | None = field(default=None, repr=False)
    config: InversionConfig | None = field(default=None, repr=False)

    @property
    def anomaly(self) -> np.ndarray:
        """(C,) each class's largest z over threshold across the families (> 1: flagged)."""
        return np.max([self.z[f] / self.thresholds[f] for f in self.families], axis=0)

    @property
    def evidence(self) -> dict[int, list[str]]:
        """Suspected class -> the families that flag it."""
        return {c: [f for f in self.families if self.z[f][c] > self.thresholds[f]] for c in self.suspected}

    def cleared(self, target: int) -> bool:
        """Whether no family flags ``target`` any more."""
        return all(self.z[f][target] <= self.thresholds[f] for f in self.families)

    def statistic(self, target: int) -> float:
        """``target``'s largest z across the families."""
        return float(max(self.z[f][target] for f in self.families))

    def as_dict(self) -> dict:
        classes = len(next(iter(self.margins.values()))) if self.margins else 0
        return {
            "statistic": ("per family, the mean target margin a trigger at a fixed small budget reaches on the "
                          "user's images of the other classes; leave-one-out robust z across classes"),
            "suspected_targets": [int(c) for c in self.suspected],
            "evidence": {str(c): fams for c, fams in self.evidence.items()},
            "images": int(self.images),
            "budgets": {f: {k: float(v) for k, v in b.items()} for f, b in self.budgets.items()},
            "thresholds": {f: float(t) for f, t in self.thresholds.items()},
            "seconds": round(float(self.seconds), 2),
            "triggers": {str(c): picture(t) for c, t in self.triggers.items()},
            "classes": [
                {"class": c, **{f: {"margin": round(float(self.margins[f][c]), 4),
                                    "flipped": round(float(self.flipped[f][c]), 4),
                                    "z": round(float(self.z[f][c]), 4)} for f in self.families}}
                for c in range(classes)
            ],
        }


PICTURE_SIDE = 32  # the largest side of a trigger's picture in the report (larger ones are subsampled)
EXAMPLES = 4  # user's images shown with a suspected class's trigger applied, beside the clean ones


def picture(trigger: dict[str, object]) -> dict:
    """A suspected class's recovered trigger as one small grey picture for the report: the patch
    mask (0..1), the perturbation's |d| averaged over channels, or the warp's shift in pixels."""
    if "mask" in trigger:
        image, what = np.asarray(trigger["mask"]), "patch mask (share of the pattern per pixel)"
    elif "delta" in trigger:
        image, what = np.abs(np.asarray(trigger["delta"])).mean(axis=0), "|perturbation| (input units)"
    else:
        image, what = np.linalg.norm(np.asarray(trigger["flow"]), axis=-1), "warp shift (pixels)"
    step = max(1, -(-max(image.shape) // PICTURE_SIDE))
    image = image[::step, ::step]
    shown = {"family": trigger["family"], "shows": what, "picture": np.round(image, 3).tolist()}
    if "triggered" in trigger:
        shown["examples"] = [{"clean": np.round(clean[::step, ::step], 3).tolist(),
                              "triggered": np.round(triggered[::step, ::step], 3).tolist(), "answer": int(answer)}
                             for clean, triggered, answer in zip(trigger["clean"], trigger["triggered"],
                                                                 trigger["answers"])]
    return shown


def robust_z(values: np.ndarray) -> np.ndarray:
    """Leave-one-out robust z (median, 1.4826 MAD of the other classes), with a floor on the
    spread of ``MIN_SPREAD`` times the typical |margin| (at least ``MIN_SPREAD``), so that
    classes whose margins happen to coincide do not turn a small difference into a large z."""
    return statistics.robust_z(values, MIN_SPREAD, magnitude=True)


def _scores(module: nn.Module, x: torch.Tensor, output_index: int, is_probability: bool,
            config: InversionConfig) -> torch.Tensor:
    """Logits (log-probabilities for a Softmax output) of ``x``, ``config.chunk`` images per pass."""
    return class_scores(module, x, output_index, is_probability, config.chunk, config.exact)


def _margins(scores: torch.Tensor, target: int) -> torch.Tensor:
    others = scores.clone()
    others[:, target] = float("-inf")
    return scores[:, target] - others.max(dim=1).values


def subsample(images: np.ndarray, config: InversionConfig) -> np.ndarray:
    """The seeded subsample of at most ``config.images`` images the search runs on."""
    images = np.asarray(images, dtype=np.float32)
    if len(images) <= config.images:
        return images
    rng = np.random.default_rng(config.seed)
    return images[np.sort(rng.choice(len(images), config.images, replace=False))]


def invert_module(module: nn.Module, images: np.ndarray, num_classes: int, output_index: int = 0,
                  is_probability: bool = False, config: InversionConfig = InversionConfig(),
                  progress: Callable[[int, int], None] | None = None, sampled: bool = False) -> InversionResult:
    """Run the inversion of every family for every class on ``images`` (already in the model's
    input layout and range) and give the verdict. ``sampled``: ``images`` is already the
    subsample (a rescan passes the scan's)."""
    began = time.perf_counter()
    sample = np.asarray(images, dtype=np.float32) if sampled else subsample(images, config)
    margins, flipped, zs, recovered = {}, {}, {}, {}
    total, done = sum(config.steps_of(f) for f in config.families), [0]
    with evaluating(module, config.device):
        x = torch.from_numpy(sample).to(config.device)
        with torch.no_grad():
            answers = _scores(module, x, output_index, is_probability, config).argmax(1).cpu()
        for family in config.families:
            found = _invert_family(module, x, answers, num_classes, family, output_index, is_probability, config,
                                   lambda: _tick(done, total, progress))
            margins[family], flipped[family], recovered[family] = found
            zs[family] = robust_z(margins[family])
    thresholds = {f: config.threshold(f) for f in config.families}
    anomaly = np.max([zs[f] / thresholds[f] for f in config.families], axis=0)
    # a class every image is already answered as has no other-class images to send there: it was
    # not searched, and is never suspected on that account
    anomaly[[c for c in range(num_classes) if not bool((answers != c).any())]] = 0.0
    suspected = ([int(c) for c in np.argsort(-anomaly, kind="stable") if anomaly[c] > 1.0]
                 if num_classes >= 3 else [])
    chosen = {}
    for c in suspected:
        family = max(config.families, key=lambda f: zs[f][c] / thresholds[f])
        chosen[c] = {"family": family, **recovered[family][c]}
    return InversionResult(tuple(config.families), margins, flipped, zs, thresholds, suspected, len(sample),
                           {f: config.budget(f) for f in config.families}, time.perf_counter() - began, chosen,
                           sample, config)


def _tick(done: list[int], total: int, progress: Callable[[int, int], None] | None) -> None:
    done[0] += 1
    if progress is not None:
        progress(done[0], total)


def _invert_family(module: nn.Module, x: torch.Tensor, answers: torch.Tensor, num_classes: int, family: str,
                   output_index: int, is_probability: bool, config: InversionConfig,
                   on_step: Callable[[], None]) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, np.ndarray]]]:
    """One trigger per class, searched together: each step draws ``batch`` images of the other
    classes per class and passes each with its class's trigger, ``config.chunk // batch`` classes
    per forward pass (one pass for 10 classes at the defaults). The classes' triggers are
    independent, so each block's gradient is exactly its classes' and memory is one pass's."""
    shape = tuple(x.shape[1:])
    found = [trigger_families.make(family, shape, config.input_range, config.seed + c, **config.budget(family))
             .to(config.device) for c in range(num_classes)]
    sources = [torch.nonzero(answers != c).flatten() for c in range(num_classes)]
    optimiser = torch.optim.Adam([p for t in found for p in t.parameters()], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    active = [c for c in range(num_classes) if len(sources[c])]
    per_pass = max(1, config.chunk // config.batch)
    for _ in range(config.steps_of(family)):
        picks = {c: sources[c][torch.randint(len(sources[c]), (config.batch,), generator=generator)] for c in active}
        for first in range(0, len(active), per_pass):
            block = active[first:first + per_pass]
            triggered = torch.cat([found[c](x[picks[c]]) for c in block])
            targets = torch.cat([torch.full((config.batch,), c, dtype=torch.long) for c in block])
            scores = _scores(module, triggered, output_index, is_probability, config)
            loss = functional.cross_entropy(scores, targets.to(scores.device)) * len(block)
            # gradients of this block's triggers only: the model's weights get none (it is only read)
            parameters = [p for c in block for p in found[c].parameters()]
            for parameter, gradient in zip(parameters, torch.autograd.grad(loss, parameters)):
                parameter.grad = gradient
        optimiser.step()
        for t in found:
            t.project()
        on_step()
    margins, flipped = np.zeros(num_classes), np.zeros(num_classes)
    recovered: dict[int, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        for c in range(num_classes):
            if not len(sources[c]):
                continue
            scores = _scores(module, found[c](x[sources[c]]), output_index, is_probability, config)
            margin = _margins(scores, c)
            margins[c] = float(margin.mean())
            flipped[c] = float((scores.argmax(1) == c).float().mean())
            shown = sources[c][:EXAMPLES]
            recovered[c] = {**_arrays(found[c]), "answers": scores[:EXAMPLES].argmax(1).cpu().numpy(),
                            "clean": _visible(x[shown], config.input_range),
                            "triggered": _visible(found[c](x[shown]), config.input_range)}
    return margins, flipped, recovered


def _visible(x: torch.Tensor, input_range: tuple[float, float]) -> np.ndarray:
    """Images (N, C, H, W) in the model's range as pictures for the report: 0..1, (N, H, W) for one
    channel, (N, H, W, C) otherwise."""
    low, high = input_range
    shown = ((x.detach().float().cpu() - low) / (high - low)).clamp(0, 1).numpy()
    return shown[:, 0] if shown.shape[1] == 1 else shown.transpose(0, 2, 3, 1)


def _arrays(trigger: trigger_families.Trigger) -> dict[str, np.ndarray]:
    """The trigger's picture: mask and pattern, the perturbation, or the flow (pixels)."""
    with torch.no_grad():
        if isinstance(trigger, trigger_families.Patch):
            return {"mask": trigger.mask()[0, 0].cpu().numpy(), "pattern": trigger.pattern()[0].cpu().numpy()}
        if isinstance(trigger, trigger_families.Additive):
            return {"delta": trigger.delta[0].cpu().numpy()}
        if isinstance(trigger, trigger_families.Warp):
            return {"flow": trigger.flow()[0].cpu().numpy()}
    return {}


@dataclass(frozen=True)
class InversionDetector:
    """The inversion as a ``detectors.base.Detector``: run beside the margin scan on the user's
    images (``detect.DATA_DETECTORS``)."""

    name: str = "trigger_inversion"
    section: str = "inversion"

    def run(self, prepared: "PreparedModel", options: "CleanOptions", images: np.ndarray | None,
            progress: Callable[[str, int, int], None] | None = None) -> InversionResult | None:
        """The inversion on ``images`` (``read_data(...).x``); None without images, or where the
        model has too many classes or the images are not (N, C, H, W)."""
        if images is None:
            return None
        loaded = prepared.loaded
        if prepared.num_classes > MAX_CLASSES or np.ndim(images) != 4:
            LOG.warning("trigger inversion skipped (%d classes, images of shape %s: it needs at most %d classes and "
                        "(N, C, H, W) images); the verdict is the data-free margin scan's", prepared.num_classes,
                        tuple(np.shape(images)), MAX_CLASSES)
            return None
        on_step = (lambda done, total: progress("inversion", done, total)) if progress else None
        return invert_module(prepared.module, images, prepared.num_classes, loaded.output_index,
                             loaded.output_is_probability,
                             inversion_config(options, prepared.device, prepared.chunking), on_step)

    def rerun(self, module: nn.Module, before: InversionResult, num_classes: int, output_index: int,
              is_probability: bool) -> InversionResult | None:
        """The same images (the scan's subsample), settings and seed on a changed model, so that a
        rescan and a scan of the written file with the same ``--data`` run the same test."""
        if before.sample is None or before.config is None:
            return None
        return invert_module(module, before.sample, num_classes, output_index, is_probability, before.config,
                             sampled=True)


DETECTOR = InversionDetector()


def inversion_config(options: "CleanOptions", device: str, chunking: "Chunking") -> InversionConfig:
    """The inversion's settings: its calibrated defaults, with the options' seed, input range and
    device, and the images per pass ``prepare``'s memory plan allows."""
    return InversionConfig(seed=options.run.seed, device=device, input_range=tuple(options.interface.input_range),
                           chunk=chunking.size, exact=chunking.exact)
