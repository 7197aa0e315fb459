"""The data-free detector: does the model reach one class with an abnormally large margin?

Maximum-margin detection (MM-BD: Wang, Xiang, Miller and Kesidis, IEEE S&P 2024, arXiv
2205.06900). Training a backdoor teaches the network a shortcut from the trigger to the target
class that no natural feature of any class matches, so over the whole input box the target can be
reached with a far larger logit margin than the other classes::

    m_c = max_x  z_c(x) - max_{k != c} z_k(x),   x in [low, high]^d

For every class ``c`` the margin is maximised from ``starts`` random points with Adam, in the
unconstrained parametrisation ``x = low + (high - low) * sigmoid(3 u)`` (no projection, no
clipping, so the gradient never dies at the box's faces). The statistic of a class is its largest
margin over the starts. A class is *suspected* when its statistic stands out against the other
classes' in a robust z-score (leave-one-out median and MAD, so the suspect cannot hide in its own
null)::

    z_c = (m_c - median_{k != c} m_k) / (1.4826 * MAD_{k != c} m)

With many classes (ImageNet's 1000) every class is screened with one start and a quarter of the
steps, and only the ``refine`` classes with the largest screened margins are searched in full; the
rest keep their screened statistic, which can only understate them.

The search never changes the model: gradients are taken with respect to the inputs only, in eval
mode, and the module's train flag and device are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from converters.chunking import Chunking
from otbr_onnx import statistics as statistics_
from otbr_onnx.detectors.base import Detection, Detector
from otbr_onnx.torch_helpers import evaluating

# Robust z above which a class is suspected (the false-alarm level: see benchmarks/RESULTS.md,
# where the largest z over the clean models and the smallest over the detected backdoors are
# reported next to it). Defined in options.py, which the CLI reads without importing torch.
from otbr_onnx.options import DEFAULT_THRESHOLD  # noqa: E402
from otbr_onnx.statistics import MAD_TO_SIGMA  # noqa: E402  (re-exported: the tests read it here)
# A MAD this small (relative to the median) would turn noise into huge z-scores.
MIN_SPREAD = 1e-3
# After a cleaning, the target counts as cleared only once its maximum margin is back with the
# typical class's: within half a robust standard deviation of the other classes' median. Falling
# under the detection threshold is far from enough. Measured (rescan z -> ASR): BadNets MLP of
# tests/test_scan.py 3.5 -> 91%, 2.5 -> 55%, 0.2 -> 19%, 0.0 -> 13%, -1.1 -> 5%; the demo 7.0 -> 99%,
# 0.0 -> 2.3%, -1.1 -> 0.6%; a full-width PreAct-ResNet18 passed z <= 1 after a half-length
# rescan with 66% ASR (the rescan is now full-length).
CLEARED_Z = 0.5
# The leave-one-out statistic compares a class with the median and spread of the others: with two
# classes the reference is a single class with no spread, so any difference between the two
# margins reads as an outlier (every binary classifier came out "suspected", open_nsfw among
# them). Below this many classes the scan gives no verdict: nothing suspected, nothing ruled out.
MIN_CLASSES = 3


@dataclass(frozen=True)
class ScanConfig:
    starts: int = 8  # random starts per class
    steps: int = 100  # Adam steps per start
    lr: float = 0.1  # Adam step on the sigmoid parameter u
    threshold: float = DEFAULT_THRESHOLD
    refine: int = 32  # with more classes than this, screen all and search only the top ones in full
    batch: int = 256  # images per forward pass (the micro-batch the memory budget allows)
    exact: bool = False  # the model runs only at batch ``batch``: the last chunk is padded
    block: int | None = None  # images searched together (their state held at once); None: all
    seed: int = 0
    device: str = "cpu"
    input_range: tuple[float, float] = (0.0, 1.0)


@dataclass
class MarginSearch:
    """The largest margin each searched class reached, and the input that reached it."""

    classes: np.ndarray  # (K,) class ids searched
    margins: np.ndarray  # (K, starts) best margin of each start
    inputs: np.ndarray  # (K, starts, *input) the input that reached it

    @property
    def best(self) -> np.ndarray:
        """(K,) each class's statistic: its largest margin over the starts."""
        return self.margins.max(axis=1)


@dataclass
class ScanResult:
    """Per-class maximum margins and the verdict (a ``Detection``). ``suspected`` is sorted by z,
    largest first. The scan's result carries the tests run beside it on the user's images
    (``others``, one entry per detector of ``detect.DATA_DETECTORS``, None where it did not run),
    and then ``suspected`` and ``cleared`` are the combined verdict (``detect.combine``)."""

    margins: np.ndarray  # (C,) each class's maximum margin
    z: np.ndarray  # (C,) leave-one-out robust z-score of each class's margin
    threshold: float
    suspected: list[int]
    inputs: dict[int, np.ndarray] = field(default_factory=dict)  # refined class -> (starts, *input) reached
    start_margins: dict[int, np.ndarray] = field(default_factory=dict)  # refined class -> (starts,) margins
    refined: list[int] = field(default_factory=list)  # classes searched in full
    steps: int = 0  # forward+backward passes (batches) spent
    # the detectors run beside the scan (``scan --data``), in registry order; empty: the margin scan alone
    others: dict[Detector, Detection | None] = field(default_factory=dict)

    name = "max_margin"  # this test's key in the report's evidence

    @property
    def backdoor_suspected(self) -> bool:
        return bool(self.suspected)

    @property
    def ran(self) -> dict[Detector, Detection]:
        """The detectors beside the scan that ran on this model."""
        return {detector: found for detector, found in self.others.items() if found is not None}

    def part(self, name: str) -> Detection | None:
        """The detection of the detector called ``name`` (None: not registered or not run)."""
        return next((found for detector, found in self.others.items() if detector.name == name), None)

    @property
    def inversion(self):
        """The trigger inversion's detection, if it ran (the benchmarks read it by this name)."""
        return self.part("trigger_inversion")

    @property
    def margin_suspected(self) -> list[int]:
        """The classes the maximum-margin statistic alone flags (z above its threshold)."""
        if self.inconclusive:
            return []
        return [int(c) for c in np.argsort(-self.z, kind="stable") if self.z[c] > self.threshold]

    @property
    def anomaly(self) -> np.ndarray:
        """(C,) each class's margin z over the threshold."""
        return self.z / self.threshold

    @property
    def evidence(self) -> dict[int, list[str]]:
        """Suspected class -> the tests that flag it (this one and those run beside it)."""
        flagged = {self.name: set(self.margin_suspected),
                   **{d.name: set(found.suspected) for d, found in self.ran.items()}}
        return {c: [test for test, classes in flagged.items() if c in classes] for c in self.suspected}

    @property
    def inconclusive(self) -> str | None:
        """Why the scan cannot judge this model, or None when it can."""
        if len(self.margins) >= MIN_CLASSES:
            return None
        return (f"{len(self.margins)} classes: the margin test compares each class with the others, and needs "
                f"at least {MIN_CLASSES}")

    @property
    def top_class(self) -> int:
        return int(np.argmax(self.z))

    def statistic(self, target: int) -> float:
        """``target``'s margin z."""
        return float(self.z[target])

    def cleared(self, target: int) -> bool:
        """Whether ``target``'s maximum margin is no larger than the typical class's (z <= CLEARED_Z)
        and no test run beside the scan flags it any more."""
        return bool(self.z[target] <= CLEARED_Z) and all(found.cleared(target) for found in self.ran.values())

    def holding(self, target: int) -> str:
        """The tests that do not clear ``target``, each with its z: what a refusal names, so that a
        class held by the trigger inversion is not reported with its (low) margin z alone."""
        held = [f"maximum margin z {self.z[target]:.1f} above {CLEARED_Z:g}"] if self.z[target] > CLEARED_Z else []
        held += [f"{detector.name.replace('_', ' ')} z {found.statistic(target):.1f}"
                 for detector, found in self.ran.items() if not found.cleared(target)]
        return "; ".join(held)

    def as_dict(self) -> dict:
        return {
            "verdict": ("inconclusive" if self.inconclusive else
                        "backdoor suspected" if self.suspected else "no backdoor found"),
            "inconclusive": self.inconclusive,
            "suspected_targets": [int(c) for c in self.suspected],
            "threshold": self.threshold,
            "statistic": "leave-one-out robust z of the per-class maximum margin",
            "evidence": {
                self.name: [int(c) for c in self.margin_suspected],
                **{d.name: None if found is None else [int(c) for c in found.suspected]
                   for d, found in self.others.items()},
            },
            "sees": SEES_WITH_DATA if self.ran else SEES_DATA_FREE,
            "classes": [
                {"class": c, "max_margin": round(float(self.margins[c]), 6), "z": round(float(self.z[c]), 4),
                 "refined": c in self.refined}
                for c in range(len(self.margins))
            ],
            **{d.section: None if found is None else found.as_dict() for d, found in self.others.items()},
        }


# What each test sees, measured on benchmarks/DETECTION.md (28 Fashion-MNIST models): said in the
# JSON, text and SARIF so that "no backdoor found" is read for what it is.
SEES_DATA_FREE = ("data-free maximum-margin scan: finds most patch (BadNets) and some low-frequency triggers; "
                  "misses most global triggers (Blended, SIG, WaNet); give --data for trigger inversion")
SEES_WITH_DATA = ("maximum-margin scan plus trigger inversion on the user's images (patch, additive, warp "
                  "families); a class flagged by either is suspected")


# With the user's images the margin test's threshold is raised to this calibrated value (never
# lowered): on the 11 clean models of benchmarks/DETECTION.md the margin's robust z reached 17.8
# (a PreAct from seed 1), 11.3 and 7.7, so the data-free 3.5 flags 3 of 11 clean models; 18.8 is

def class_margins(scores: torch.Tensor, classes: torch.Tensor, is_probability: bool) -> torch.Tensor:
    """``z_c - max_{k != c} z_k`` for row ``i`` and class ``classes[i]``; on log-probabilities for
    a Softmax output, which gives the same differences as the logits."""
    scores = scores.reshape(scores.shape[0], -1)
    if is_probability:
        scores = torch.log(scores.clamp_min(1e-30))
    own = scores.gather(1, classes[:, None]).squeeze(1)
    others = scores.scatter(1, classes[:, None], float("-inf"))
    return own - others.max(dim=1).values


def robust_z(statistics: np.ndarray) -> np.ndarray:
    """Leave-one-out robust z-score of each entry against the others (median, 1.4826 MAD)."""
    return statistics_.robust_z(statistics, MIN_SPREAD)


def verdict(margins: np.ndarray, threshold: float) -> tuple[np.ndarray, list[int]]:
    """Robust z of every class and the suspected classes (z above ``threshold``, largest first)."""
    z = robust_z(margins)
    if len(margins) < MIN_CLASSES:  # no reference to be an outlier against: no verdict
        return z, []
    suspected = [int(c) for c in np.argsort(-z, kind="stable") if z[c] > threshold]
    return z, suspected


def maximise_margins(
    module: nn.Module,
    input_shape: tuple[int, ...],
    classes: np.ndarray,
    starts: int,
    steps: int,
    config: ScanConfig,
    output_index: int,
    is_probability: bool,
    init: np.ndarray | None = None,
    on_step: Callable[[], None] | None = None,
    keep_inputs: bool = True,
) -> MarginSearch:
    """Maximise each class's margin from ``starts`` points (random, or ``init``: (K, starts, *input)).

    Every (class, start) pair is one image, so the cost is ``steps`` forward and backward passes
    over ``len(classes) * starts`` images. They are searched ``config.block`` at a time: an
    image's margin, gradient and Adam moments are its own (eval mode), so a block gives its images
    the trajectories they have in one batch, and only one block's state (about six copies of the
    images) is held; 1000 classes at 224x224 would need 3 GB at once. ``on_step`` is called after
    each step of each block. ``keep_inputs=False`` returns no inputs (screening needs the margins).
    """
    image = tuple(input_shape[1:])
    count = len(classes) * starts
    block = config.block or count
    generator = torch.Generator().manual_seed(config.seed)
    starting = None if init is None else np.asarray(init, dtype=np.float32).reshape((count,) + image)
    target = np.repeat(np.asarray(classes, dtype=np.int64), starts)
    best, found = [], []
    for first in range(0, count, block):
        last = min(first + block, count)
        # drawn block after block from one generator: the same numbers as one draw of all images
        unit = (torch.rand((last - first,) + image, generator=generator) if starting is None else
                (torch.from_numpy(starting[first:last]) - config.input_range[0])
                / (config.input_range[1] - config.input_range[0]))
        margins, inputs = _search_block(module, unit.clamp(1e-4, 1 - 1e-4), torch.from_numpy(target[first:last]),
                                        steps, config, output_index, is_probability, on_step)
        best.append(margins)
        if keep_inputs:
            found.append(inputs)
    margins = np.concatenate(best).reshape(len(classes), starts).astype(np.float64)
    inputs = (np.concatenate(found).reshape((len(classes), starts) + image) if keep_inputs
              else np.zeros((len(classes), 0) + image, np.float32))
    return MarginSearch(np.asarray(classes), margins, inputs)


def search_images(num_classes: int, config: ScanConfig) -> int:
    """The most images one margin search holds (what ``sizing.search_block`` sizes): the
    screening of every class (one start each) where there are more classes than ``refine``, or
    the full search of the refined classes; the rescan searches 2 starts of them."""
    screened = num_classes if num_classes > config.refine else 0
    return max(screened, min(num_classes, config.refine) * max(config.starts, 2))


def search_blocks(count: int, config: ScanConfig) -> int:
    """How many blocks ``maximise_margins`` searches ``count`` images in."""
    return -(-count // (config.block or count)) if count else 0


def _search_block(module: nn.Module, unit: torch.Tensor, target: torch.Tensor, steps: int, config: ScanConfig,
                  output_index: int, is_probability: bool, on_step: Callable[[], None] | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Adam on ``u = logit(unit) / 3`` for ``steps`` steps; each image's best margin and the
    input that reached it."""
    low, high = config.input_range
    u = (torch.logit(unit) / 3.0).to(config.device)
    target = target.to(config.device)
    u.requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=config.lr)
    best = torch.full((len(target),), float("-inf"), device=config.device)
    best_x = torch.zeros_like(u)
    chunking = Chunking(config.batch, config.exact)
    for step in range(steps + 1):  # the last pass only scores the final step
        scoring_only = step == steps
        gradient = None if scoring_only else torch.zeros_like(u)
        for start, stop in chunking.spans(len(u)):
            # one chunk's graph at a time: each image's margin depends on its own input only (eval
            # mode), so the chunked gradients are the whole batch's and memory is one chunk's
            part = u[start:stop].detach().requires_grad_(not scoring_only)
            with torch.set_grad_enabled(not scoring_only):
                x = low + (high - low) * torch.sigmoid(3.0 * part)
                scores = _output(module, chunking.pad(x), output_index)[:stop - start]
                margin = class_margins(scores, target[start:stop], is_probability)
            with torch.no_grad():
                better = margin.detach() > best[start:stop]
                best[start:stop] = torch.where(better, margin.detach(), best[start:stop])
                best_x[start:stop][better] = x.detach()[better]
            if gradient is not None:
                (gradient[start:stop],) = torch.autograd.grad(-margin.sum(), [part])
        if gradient is None:
            break
        u.grad = gradient
        optimizer.step()
        if on_step is not None:
            on_step()
    return best.cpu().numpy(), best_x.cpu().numpy().astype(np.float32)


def scan_module(
    module: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    output_index: int,
    is_probability: bool,
    config: ScanConfig = ScanConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Search every class's maximum margin and give the verdict (see the module docstring)."""
    classes = np.arange(num_classes)
    screen_steps = max(config.steps // 4, 1)
    refine = num_classes > config.refine
    searched = min(num_classes, config.refine) * config.starts
    total = search_blocks(searched, config) * config.steps
    if refine:
        total += search_blocks(num_classes, config) * screen_steps
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    with evaluating(module, config.device):
        if refine:
            screened = maximise_margins(module, input_shape, classes, 1, screen_steps, config, output_index,
                                        is_probability, on_step=tick, keep_inputs=False)
            margins = screened.best
            chosen = np.sort(np.argsort(-margins, kind="stable")[: config.refine])
        else:
            margins, chosen = np.zeros(num_classes), classes
        search = maximise_margins(module, input_shape, chosen, config.starts, config.steps, config, output_index,
                                  is_probability, on_step=tick)
    margins = margins.copy()
    margins[chosen] = np.maximum(margins[chosen], search.best) if refine else search.best
    z, suspected = verdict(margins, config.threshold)
    return ScanResult(margins, z, config.threshold, suspected, dict(zip(chosen.tolist(), search.inputs)),
                      dict(zip(chosen.tolist(), search.margins)), [int(c) for c in chosen], done[0])



def rescan_margins(
    module: nn.Module,
    input_shape: tuple[int, ...],
    before: ScanResult,
    output_index: int,
    is_probability: bool,
    config: ScanConfig = ScanConfig(),
) -> ScanResult:
    """The scan again on a changed model, warm: every refined class restarts from the input that
    reached its largest margin on the model before (where a trigger would sit), plus one fresh
    random start, for the scan's full steps. Classes that were only screened keep their statistic.

    Starting from the old maximiser makes the check conservative: a backdoor that survived the
    change is found again at once, so a class that is no longer flagged has really lost its margin.
    The margin test alone: ``detect.rescan_module`` reruns the tests beside it too.
    """
    classes = np.asarray(before.refined, dtype=np.int64)
    generator = torch.Generator().manual_seed(config.seed + 1)
    low, high = config.input_range
    init = np.stack([
        np.stack([before.inputs[c][int(np.argmax(before.start_margins[c]))],
                  (torch.rand(before.inputs[c].shape[1:], generator=generator) * (high - low) + low).numpy()])
        for c in classes.tolist()
    ])
    with evaluating(module, config.device):
        search = maximise_margins(module, input_shape, classes, 2, config.steps, config, output_index,
                                  is_probability, init=init)
    margins = before.margins.copy()
    margins[classes] = search.best
    z, suspected = verdict(margins, config.threshold)
    return ScanResult(margins, z, config.threshold, suspected, dict(zip(classes.tolist(), search.inputs)),
                      dict(zip(classes.tolist(), search.margins)), before.refined, config.steps)


def _output(module: nn.Module, x: torch.Tensor, output_index: int) -> torch.Tensor:
    out = module(x)
    return out[output_index] if isinstance(out, (tuple, list)) else out


def scan_config(options, device: str, chunking: Chunking = Chunking(), block: int | None = None) -> ScanConfig:
    """The scan's settings from ``CleanOptions``, and the images per pass and per search block
    from ``prepare``'s memory plan."""
    scan = options.scan
    return ScanConfig(starts=scan.starts, steps=scan.steps, threshold=scan.threshold,
                      batch=chunking.size, exact=chunking.exact, block=block, seed=options.run.seed, device=device,
                      input_range=tuple(options.interface.input_range))


