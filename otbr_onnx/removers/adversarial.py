"""Adversarial unlearning on the user's images: find the triggers the model still obeys, then
fine-tune its weight layers to ignore them while keeping the original's answers.

A min-max in the spirit of I-BAU (Zeng et al., ICLR 2022) and SAU (Wei et al., NeurIPS 2023),
with no labels: the original model's own answers ``y0`` on the user's clean images label them
(it is right on most clean images; the backdoor only fires on triggered ones). Each round:

1. inner max: for each trigger family of ``otbr_onnx.triggers`` (patch, additive, warp), a trigger
   shared by all images that sends the student's answers to the suspected target (or, with no
   suspect, away from ``y0``), searched on the current student;
2. outer min, on random batches of the training split::

       CE(f(T(x)), y0)                      the triggered image keeps its clean answer
     + kd * KL(p0(x) || f(x))              the clean image keeps the original's soft answer
     + anchor * sum_BN stats_gap(x)        BatchNorm inputs keep the stored running statistics

The weight layers' weights and biases train. Where every BatchNorm's statistics can be written
back (float32 initializers of their own: ``converters.storage.resolve_statistics``), BatchNorm
trains too, in train mode: each update normalises by its batch's statistics, so the weights learn
to resist the triggers whatever statistics a user later sets, and after every round the running
statistics are re-estimated on the clean training images, as a user's recalibration would (the
model handed back is its own recalibration). Otherwise BatchNorm runs in eval mode with its stored
statistics, and the anchor keeps the activations each BatchNorm normalises where those say they
are. Measured with the benchmark's true BadNets trigger on 200 images (an oracle for the search):
eval mode left ASR 3.3 that a recalibration raised to 12.0, train mode 4.0 -> 5.1 (the
"superficial safety" of Min et al., NeurIPS 2024: a removal a recalibration re-opens).

After every round the held-out split measures fidelity and the share of held-out images a fresh
trigger search still flips (the backdoor's reach); the round kept is the one with the lowest reach
whose fidelity stays within the budget. Fidelity is the accuracy the changed answers are expected
to cost, taking the original's own probabilities for the truth (``expected_accuracy_drop``), not
the share of answers that changed: a model right on 85 % of images answers the other 15 %
near chance, and a repair that changes some of those costs little. Agreement is reported beside
it. Strength and
stopping come from the user's images only, never from test data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from otbr_onnx import triggers
from otbr_onnx.removers.base import changed_weights
from otbr_onnx.errors import FidelityBudgetError
from otbr_onnx.robustness import batchnorm_layers, recalibrate, recalibrate_in_place


# A patch budget never smaller than a 3x3 patch, whatever the image size (1.5 % of an 8x8 image
# is one pixel).
MIN_PATCH_PIXELS = 9


@dataclass(frozen=True)
class AdversarialConfig:
    rounds: int = 6
    train_steps: int = 30  # weight updates per round
    batch: int = 64
    lr: float = 1e-3  # Adam on the weight layers
    kd_weight: float = 3.0
    anchor_weight: float = 1.0
    holdout: float = 0.25  # share of the images kept aside to judge each round
    families: tuple[str, ...] = triggers.FAMILIES
    # Trigger budgets. Measured on PreAct models of the benchmark (200 images, targeted at the true
    # class): at the detector's small budgets (patch 1.5 % of the pixels, |d| <= 0.06, warp 0.5 px)
    # the triggers found are too weak to unlearn a BadNets backdoor (ASR 99.7 -> 65, back to 91
    # after recalibration); with a hard 3 % patch area, 49 -> 81. An unbounded mask under an area
    # penalty with |d| <= 0.1 and a one-pixel warp did best (16.5, 39 after recalibration, at
    # -2.3 points). Larger budgets turn unlearning into adversarial training against features
    # clean models have too, which costs accuracy without lowering the reach (Blended).
    # patch: a hard bound on the mask's mean (None: the penalty alone). With 100-step searches an
    # unbounded mask grows over the objects themselves, and unlearning "a covered object keeps its
    # answer" costs accuracy (the tests' MLP: 84-94 % of held-out answers kept, refused; with the
    # bound, 100 %). 6 % holds the patch triggers of the literature (BadNets' 3x3 on 28x28 is 1.1 %,
    # a 7x7 square 6 %); MIN_PATCH_PIXELS still applies on small images.
    area: float | None = 0.06
    eps: float = 0.1  # additive: at most 10 % of the input range per pixel
    max_shift: float = 1.0  # warp: at most one pixel
    patch_size_weight: float = 0.5  # patch: penalty on the mask's area (Neural Cleanse's lambda)
    # 100 steps: at 30 the searched patch was rarely the planted one (PreAct BadNets, round 2:
    # ASR 32.7 at 30 steps, 4.7 at 100)
    search: triggers.Search = triggers.Search(steps=100, batch=64, lr=0.1)
    # The judge's patch (a fresh search on the held-out images after every round) has a hard area:
    # without one a 100-step search grows a mask that sends any image anywhere, and the reach of
    # every round reads 100 %. The detector's patch budget (detectors/inversion.py).
    judge_area: float = 0.015
    # BatchNorm during the updates: "train" where every BatchNorm's statistics can be written back
    # (see the module docstring), else "eval"; "eval" forces the stored statistics.
    batchnorm: str = "train"
    # Triggers of earlier rounds replayed in each update (besides the current round's): a trigger
    # unlearnt once and then forgotten would come back in a later round.
    replay: int = 3
    # Distil the original's soft answers on mixtures of two user images as well as on the images:
    # two hundred images are few for keeping a function, their mixtures are many.
    mixup: bool = True
    # Before unlearning, zero the channels that respond to the triggers found on the original far
    # more than to the clean images: a robust z of the response above ``prune_z`` among all
    # channels of the non-head weight layers, at most ``prune_max`` of them. The idea: a zeroed
    # trigger detector cannot be re-opened by recalibrating BatchNorm or by clean fine-tuning.
    # Off by default: on the benchmark's BadNets PreAct no channel passed z 4 or 6 (the triggers
    # found are not the real one), and on its Blended PreAct the 8 channels zeroed cost 8 points
    # of held-out agreement that the rounds never won back.
    prune_max: float = 0.0
    prune_z: float = 6.0
    seed: int = 0
    device: str = "cpu"


@dataclass
class Round:
    """What one round measured on the held-out images."""

    index: int
    agreement: float  # % of held-out images answered as the original does
    reach: dict[str, float]  # family -> % of held-out images its fresh trigger sends to the target
    loss: float
    expected_drop: float = 0.0  # accuracy points the changed answers are expected to cost

    @property
    def worst_reach(self) -> float:
        return max(self.reach.values(), default=0.0)

    def as_dict(self) -> dict:
        return {"round": self.index, "agreement": round(self.agreement, 2),
                "expected_accuracy_drop": round(self.expected_drop, 2),
                "reach": {k: round(v, 2) for k, v in self.reach.items()}, "loss": round(self.loss, 4)}


@dataclass
class UnlearningLog:
    rounds: list[Round] = field(default_factory=list)
    chosen: int = -1  # the round kept (-1: round 0, the original)
    targets: list[int] = field(default_factory=list)
    images: tuple[int, int] = (0, 0)  # (training, held-out)
    frozen: list[str] = field(default_factory=list)  # weight tensors that could not train (buffers)
    pruned: dict[str, int] = field(default_factory=dict)  # layer -> channels zeroed before unlearning
    batchnorm: str = "none"  # "train", "eval", or "none" (no BatchNorm layer)
    original: Round | None = None  # the same judge on the original model (round 0)

    @property
    def kept(self) -> Round | None:
        return self.rounds[self.chosen - 1] if self.chosen > 0 else None

    def as_dict(self) -> dict:
        return {"targets": self.targets, "images": {"train": self.images[0], "holdout": self.images[1]},
                "original": self.original.as_dict() if self.original is not None else None,
                "chosen_round": self.chosen, "rounds": [r.as_dict() for r in self.rounds],
                "not_trained": self.frozen, "pruned_channels": self.pruned, "batchnorm": self.batchnorm}


Logits = Callable[[torch.Tensor], torch.Tensor]


def unlearn(module: nn.Module, trainable: list[torch.Tensor], images: np.ndarray, targets: list[int],
            logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor], input_range: tuple[float, float],
            max_drop: float, config: AdversarialConfig = AdversarialConfig(),
            on_round: Callable[[Round], None] | None = None,
            writable_batchnorm: bool = False) -> tuple[nn.Module, UnlearningLog]:
    """Adversarially unlearn a copy of ``module`` on ``images`` (N, C, H, W, in the model's input
    space). ``trainable`` lists the tensors OF ``module`` that may change (found again in the copy
    by position); ``writable_batchnorm``: every BatchNorm's affine parameters and statistics may
    change too (BatchNorm then trains in train mode, ``AdversarialConfig.batchnorm``);
    ``targets`` the suspected classes (empty: untargeted triggers);
    ``logits_of(m, x)`` the class scores of module ``m``. The round kept is the one whose
    expected accuracy drop on the held-out images is at most ``max_drop`` points and whose
    triggers reach the fewest held-out images. Returns the student (eval mode) and the log."""
    torch.manual_seed(config.seed)
    x = torch.as_tensor(images, dtype=torch.float32, device=config.device)
    reference = copy.deepcopy(module).to(config.device).eval()
    _freeze(reference)
    with torch.no_grad():
        soft = functional.softmax(logits_of(reference, x), dim=1)
    labels = soft.argmax(1)
    train, held = _split(len(x), config.holdout, config.seed)
    student, params, frozen = _student(module, trainable, config.device)
    norms = batchnorm_layers(student)
    mode = "none" if not norms else "train" if writable_batchnorm and config.batchnorm == "train" else "eval"
    log = UnlearningLog(targets=list(targets), images=(len(train), len(held)), frozen=frozen, batchnorm=mode)
    statistics: list[torch.Tensor] = []
    if mode == "train":
        params += _batchnorm_trainable(norms)
        statistics = [t for layer in norms for t in (layer.running_mean, layer.running_var)]
        recalibrate_in_place(student, x[train], config.batch)
    anchor = _Anchor(student) if config.anchor_weight > 0 else None
    optimiser = torch.optim.Adam(params, lr=config.lr)
    best_state, best_key = None, None
    generator = torch.Generator().manual_seed(config.seed)

    def logits(xb: torch.Tensor) -> torch.Tensor:
        return logits_of(student, xb)

    # the judge on the original (round 0): the reach the kept round must lower (``reach_fell``).
    # Its searches seed their own generators, so the rounds are the same with or without it.
    log.original = _judge(lambda xb: logits_of(reference, xb), x[held], labels[held], targets, input_range, config,
                          0, 0.0, soft[held])
    masks = _prune_responders(student, reference, logits_of, x[train], labels[train], targets, input_range, config)
    log.pruned = {name: int(mask.sum()) for name, (_, mask) in masks.items()}
    pool: list[triggers.Trigger] = []
    for index in range(1, config.rounds + 1):
        found = _search(logits, x[train], labels[train], targets, input_range, config, seed=index)
        loss = 0.0
        for _ in range(config.train_steps):
            batch = train[torch.randperm(len(train), generator=generator)[:config.batch]]
            replayed = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:config.replay].tolist()]
            xb, pb = x[batch], soft[batch]
            if config.mixup:
                xb, pb = _with_mixtures(xb, pb, reference, logits_of, generator)
            with _batch_statistics(norms if mode == "train" else []):
                loss = _step(student, logits, optimiser, xb, labels[batch], pb, found + replayed, anchor, config)
            _apply_masks(masks)
        if mode == "train":  # what a user's recalibration on these images would set
            recalibrate_in_place(student, x[train], config.batch)
        pool.extend(found)
        measured = _judge(logits, x[held], labels[held], targets, input_range, config, index, loss, soft[held])
        log.rounds.append(measured)
        if on_round is not None:
            on_round(measured)
        key = (measured.worst_reach, -measured.agreement)
        if measured.expected_drop <= max_drop and (best_key is None or key < best_key):
            best_key, best_state = key, _snapshot(params + statistics)
            log.chosen = index
    if anchor is not None:
        anchor.close()
    if best_state is None:
        return reference, log  # no round kept the original's answers: nothing is changed
    _restore(params + statistics, best_state)
    return student.eval(), log


def expected_accuracy_drop(reference: torch.Tensor, answers: torch.Tensor) -> float:
    """Accuracy points a change of answers is expected to cost if the original's probabilities
    ``reference`` (N, C) were the truth: the mean over images of ``p0(original answer) - p0(new
    answer)`` (0 where the answer is unchanged). Flipping an image the original gave 0.9 costs
    0.8 if the new answer had 0.1; flipping one it was unsure of (0.4 vs 0.35) costs 0.05. An
    overconfident original makes the estimate larger, never smaller, than a calibrated one would."""
    rows = torch.arange(len(answers), device=answers.device)
    original = reference.argmax(1)
    cost = reference[rows, original] - reference[rows, answers]
    return 100.0 * float(cost.mean()) if len(answers) else 0.0


def _split(count: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out indices (at least one of each)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 1))
    held = min(max(1, int(round(count * holdout))), count - 1)
    return order[held:], order[:held]


def _freeze(module: nn.Module) -> None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor.requires_grad_(False)


def _student(module: nn.Module, trainable: list[torch.Tensor], device: str
             ) -> tuple[nn.Module, list[torch.Tensor], list[str]]:
    """A copy of ``module`` in eval mode in which only the copies of ``trainable`` take
    gradients. Buffers (onnx2torch keeps MatMul weights as buffers) cannot be promoted in
    place; they stay as they are and are named in the log."""
    names = {id(t): name for name, t in list(module.named_parameters()) + list(module.named_buffers())}
    student = copy.deepcopy(module).to(device).eval()
    _freeze(student)
    copies = dict(list(student.named_parameters()) + list(student.named_buffers()))
    params, frozen = [], []
    for original in trainable:
        name = names.get(id(original))
        tensor = copies.get(name) if name is not None else None
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(True)
            params.append(tensor)
        else:
            frozen.append(name or "?")
    return student, params, frozen


def _batchnorm_trainable(norms: list[nn.Module]) -> list[torch.Tensor]:
    """The BatchNorm affine parameters, made trainable (they are written back with the statistics)."""
    params = []
    for layer in norms:
        for tensor in (layer.weight, layer.bias):
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(True)
                params.append(tensor)
    return params


@contextmanager
def _batch_statistics(norms: list[nn.Module]) -> Iterator[None]:
    """BatchNorm layers normalise by each batch's own statistics while their running statistics stay
    as they are (momentum 0: the triggered batches must not move them)."""
    saved = [(layer.training, layer.momentum) for layer in norms]
    for layer in norms:
        layer.train()
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, (training, momentum) in zip(norms, saved):
            layer.train(training)
            layer.momentum = momentum


def _search(logits: Logits, x: torch.Tensor, labels: torch.Tensor, targets: list[int],
            input_range: tuple[float, float], config: AdversarialConfig, seed: int) -> list[triggers.Trigger]:
    """One trigger per family (and per target), searched on the student as it is now."""
    found = []
    for family in config.families:
        for target in targets or [None]:
            keep = labels != target if target is not None else torch.ones_like(labels, dtype=torch.bool)
            if int(keep.sum()) == 0:
                continue
            trigger = _fresh(family, x, input_range, config, seed)
            goal = triggers.towards(target) if target is not None else triggers.away
            search = _search_settings(family, config, seed)
            found.append(triggers.optimise(trigger, logits, x[keep], labels[keep], goal, search))
    for trigger in found:
        trigger.requires_grad_(False)
    return found


def _fresh(family: str, x: torch.Tensor, input_range: tuple[float, float], config: AdversarialConfig,
           seed: int, area: float | None = None) -> triggers.Trigger:
    """A new trigger of ``family`` at the config's budgets (``area``: a hard patch area instead of
    ``config.area``), never smaller than a 3x3 patch."""
    pixels = int(np.prod(x.shape[2:]))
    area = config.area if area is None else area
    area = None if area is None else max(area, MIN_PATCH_PIXELS / pixels)
    return triggers.make(family, tuple(x.shape[1:]), input_range, seed=seed, eps=config.eps,
                         max_shift=config.max_shift, area=area).to(x.device)


def _search_settings(family: str, config: AdversarialConfig, seed: int) -> triggers.Search:
    weight = config.patch_size_weight if family == "patch" else 0.0
    return triggers.Search(config.search.steps, config.search.batch, config.search.lr, weight, seed)


def _prune_responders(student: nn.Module, reference: nn.Module,
                      logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor,
                      labels: torch.Tensor, targets: list[int], input_range: tuple[float, float],
                      config: AdversarialConfig) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
    """Zero (in ``student``) the channels of the trainable layers that respond most to triggers
    found on the original, by a robust z over all channels; returns layer -> (tensors, mask)."""
    if config.prune_max <= 0:
        return {}
    layers = _trainable_layers(student)[:-1]  # never the head: its rows are the classes
    if not layers:
        return {}
    found = _search(lambda xb: logits_of(reference, xb), x, labels, targets, input_range, config, seed=0)
    clean = _channel_means(reference, [name for name, _ in layers], x)
    response = None
    for trigger in found:
        with torch.no_grad():
            triggered = _channel_means(reference, [name for name, _ in layers], trigger(x))
        scores = torch.cat([((t - c).mean(0) / (c.std(0) + 1e-6)) for t, c in zip(triggered, clean)])
        response = scores if response is None else torch.maximum(response, scores)
    median = response.median()
    spread = 1.4826 * (response - median).abs().median() + 1e-6
    z = (response - median) / spread
    limit = int(config.prune_max * len(z))
    chosen = torch.zeros_like(z, dtype=torch.bool)
    order = torch.argsort(z, descending=True)[:limit]
    chosen[order[z[order] > config.prune_z]] = True
    masks, start = {}, 0
    for name, module in layers:
        count = module.weight.shape[0]
        mask = chosen[start:start + count]
        start += count
        if mask.any():
            tensors = [module.weight] + ([module.bias] if module.bias is not None else [])
            masks[name] = (tensors, mask)
    _apply_masks(masks)
    return masks


def _trainable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and Linear submodules whose weight trains, in registration order (the head last)."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.weight.requires_grad]


def _channel_means(module: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Each named layer's output, averaged over positions: (N, channels) per layer."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [module.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach())) for name in names]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[n].reshape(len(x), outputs[n].shape[1], -1).mean(2) for n in names]


def _apply_masks(masks: dict[str, tuple[list[torch.Tensor], torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensors, mask in masks.values():
            for tensor in tensors:
                tensor[mask] = 0


def _with_mixtures(xb: torch.Tensor, pb: torch.Tensor, reference: nn.Module,
                   logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch and as many mixtures of two of its images, with the original's soft answers."""
    share = torch.rand((len(xb),) + (1,) * (xb.dim() - 1), generator=generator).to(xb.device)
    mixed = share * xb + (1 - share) * xb[torch.randperm(len(xb), generator=generator).to(xb.device)]
    with torch.no_grad():
        soft = functional.softmax(logits_of(reference, mixed), dim=1)
    return torch.cat([xb, mixed]), torch.cat([pb, soft])


def _step(student: nn.Module, logits: Logits, optimiser: torch.optim.Optimizer, xb: torch.Tensor,
          yb: torch.Tensor, pb: torch.Tensor, found: list[triggers.Trigger], anchor: "_Anchor | None",
          config: AdversarialConfig) -> float:
    """One weight update: triggered images keep ``y0``, clean ones the original's soft answers."""
    real = xb[:len(yb)]  # the user's images; any rows after them are mixtures, distilled only
    triggered = torch.cat([trigger(real) for trigger in found]) if found else real[:0]
    if anchor is not None:
        anchor.reset()
        anchor.recording = True  # the real images only: mixtures have other statistics
    clean_logits = logits(real)
    if anchor is not None:
        anchor.recording = False
    if len(xb) > len(real):
        clean_logits = torch.cat([clean_logits, logits(xb[len(real):])])
    loss = config.kd_weight * functional.kl_div(functional.log_softmax(clean_logits, 1), pb, reduction="batchmean")
    if anchor is not None:
        loss = loss + config.anchor_weight * anchor.gap()
    if len(triggered):
        loss = loss + functional.cross_entropy(logits(triggered), yb.repeat(len(found)))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def _judge(logits: Logits, x: torch.Tensor, labels: torch.Tensor, targets: list[int],
           input_range: tuple[float, float], config: AdversarialConfig, index: int, loss: float,
           reference: torch.Tensor | None = None) -> Round:
    """Held-out agreement with the original (and the accuracy it is expected to cost, given the
    original's probabilities ``reference``), and how far fresh triggers still reach."""
    with torch.no_grad():
        answers = logits(x).argmax(1)
    agreement = 100.0 * float((answers == labels).float().mean())
    drop = expected_accuracy_drop(reference, answers) if reference is not None else 100.0 - agreement
    reach: dict[str, float] = {}
    for family in config.families:
        for target in targets or [None]:
            keep = labels != target if target is not None else torch.ones_like(labels, dtype=torch.bool)
            if int(keep.sum()) == 0:
                continue
            trigger = _fresh(family, x, input_range, config, seed=1000 + index, area=config.judge_area)
            goal = triggers.towards(target) if target is not None else triggers.away
            settings = _search_settings(family, config, index)
            if family == "patch":  # the hard area bounds it: no size penalty
                settings = triggers.Search(settings.steps, settings.batch, settings.lr, 0.0, settings.seed)
            triggers.optimise(trigger, logits, x[keep], labels[keep], goal, settings)
            share = 100.0 * triggers.flipped(trigger, logits, x[keep], labels[keep], target)
            reach[family] = max(reach.get(family, 0.0), share)
    return Round(index, agreement, reach, loss, drop)


class _Anchor:
    """The gap between each BatchNorm's input statistics on the current batch and its stored
    running statistics (normalised per channel by the stored variance), summed over layers."""

    def __init__(self, module: nn.Module) -> None:
        self.layers = batchnorm_layers(module)
        self.gaps: list[torch.Tensor] = []
        self.recording = False  # only the clean batch of a weight update is anchored
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, layer: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        if not self.recording:
            return
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        var = layer.running_var + layer.eps
        mean_gap = (x.mean(dims) - layer.running_mean) ** 2 / var
        var_gap = (x.var(dims, unbiased=False) / var - 1) ** 2
        self.gaps.append(mean_gap.mean() + var_gap.mean())

    def reset(self) -> None:
        self.gaps = []

    def gap(self) -> torch.Tensor:
        return torch.stack(self.gaps).sum() if self.gaps else torch.zeros(())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[torch.Tensor], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, state):
            p.copy_(value)


# --- the remover as a pipeline stage ---------------------------------------------------------

# After the user's recalibration of the cleaned model's BatchNorm statistics, a fresh trigger
# search may reach this many more held-out images (percentage points) than on the model as
# handed back before the removal counts as masked. The benchmark's criterion is "ASR back above
# 10 %"; a search bounded by the trigger budgets overstates ASR, so the check compares the two
# reaches rather than an absolute level.
MASKED_REACH_RISE = 20.0


@dataclass
class Removal:
    """What adversarial unlearning changed, and the recalibration check of the result."""

    weights: dict[str, np.ndarray]  # initializer -> new value (ONNX layout), finite
    log: UnlearningLog
    recalibration: dict | None = None  # check (a): reach before / after, or why it was not run

    def as_dict(self) -> dict:
        return {"remover": "adversarial", "changed_tensors": len(self.weights), **self.log.as_dict(),
                "recalibration_check": self.recalibration}


def remove(prepared, images: np.ndarray, targets: list[int], options, progress=None,
           config: AdversarialConfig | None = None, evidence: dict[int, list[str]] | None = None) -> Removal:
    """Adversarially unlearn ``prepared``'s module on ``images`` (the user's, in the model's input
    space) against ``targets``, and check that a BatchNorm recalibration on the same images does
    not bring the triggers back. ``evidence``: the trigger families the detector's inversion flagged
    each target with; only those are unlearnt (``unlearnt_families``). Raises
    ``FidelityBudgetError`` when no round keeps the original's answers, or when the removal is
    masked."""
    loaded = prepared.loaded
    config = config or AdversarialConfig(seed=options.run.seed, device=prepared.device)
    config = replace(config, families=unlearnt_families(evidence, targets, config.families))
    statistics = loaded.storage.statistics
    trainable = [ref.tensor(prepared.module) for name, ref in prepared.refs.items() if name not in statistics]
    logits_of = _class_scores(loaded.output_index, loaded.output_is_probability)

    def on_round(measured: Round) -> None:
        if progress is not None:
            progress("unlearning", measured.index, config.rounds)

    input_range = tuple(options.interface.input_range)
    student, log = unlearn(prepared.module, trainable, images, targets, logits_of, input_range,
                           options.max_acc_drop, config, on_round, writable_batchnorm(prepared))
    if log.chosen < 0:
        best = min(log.rounds, key=lambda r: r.expected_drop, default=None)
        detail = "" if best is None else (f" (least expected drop {best.expected_drop:.1f} points, "
                                          f"{best.agreement:.1f}% of held-out answers kept)")
        raise FidelityBudgetError(
            f"adversarial unlearning could not keep the original's answers on the user's images within "
            f"--max-acc-drop {options.max_acc_drop}{detail}; refusing to clean")
    if not reach_fell(log.original, log.kept):
        raise FidelityBudgetError(
            f"adversarial unlearning did not lower the reach of any trigger it searched on the held-out images "
            f"(before {_reach_text(log.original)}, after {_reach_text(log.kept)}); a rescan that no longer flags "
            f"the model would be the unlearning fooling its own test; refusing to call it cleaned")
    student = student.cpu()
    weights = changed_weights(prepared, student, "unlearning")
    removal = Removal(weights, log)
    removal.recalibration = recalibration_check(student, images, targets, logits_of, input_range, config)
    if removal.recalibration.get("masked"):
        check = removal.recalibration
        raise FidelityBudgetError(
            f"the removal is masked: after re-estimating BatchNorm statistics on the user's images, a trigger "
            f"reaches {check['after']:.0f}% of held-out images (class {check['target']}) against "
            f"{check['before']:.0f}% before; refusing to hand back a model a recalibration would re-open")
    return removal


def reach_fell(original: Round | None, kept: Round | None) -> bool:
    """Whether the kept round lowered the held-out reach of at least one trigger family below the
    original's. The unlearning trains against the same trigger families the detector's inversion
    searches, so the rescan is no independent witness: on the benchmark's noise-keyed Blended
    model with target 5 the rescan cleared the kept round while its ASR stayed at 100 %, and the
    judge's reach had not moved (100 % before and after). A round that changed nothing the
    remover can measure is not called a removal. (A fall is necessary, not sufficient: on the
    low-frequency model with target 9, patch reach 100 -> 96 % came with ASR 99.4 -> 11.1 %.)"""
    if original is None or kept is None:
        return True  # no judge ran (no family to search): nothing to compare
    return any(kept.reach.get(family, 0.0) < reach for family, reach in original.reach.items())


def _reach_text(measured: Round | None) -> str:
    if measured is None or not measured.reach:
        return "n/a"
    return ", ".join(f"{family} {reach:.0f}%" for family, reach in measured.reach.items())


def unlearnt_families(evidence: dict[int, list[str]] | None, targets: list[int],
                      families: tuple[str, ...]) -> tuple[str, ...]:
    """The trigger families to unlearn: those the detector's inversion flagged the targets with, or
    all of ``families`` when it flagged none (the margin scan alone, or no inversion). Unlearning a
    family the backdoor does not use is adversarial training against features every model has.
    On the benchmark's PreAct BadNets model (200 images, unbounded patch mask), the rounds that
    unlearnt all three families kept 84-90 % of the held-out answers (test accuracy -3.0 to -3.4
    points at ASR 2.6-3.7 %); the patch alone kept 94 % (-1.8 points at ASR 5.6 %)."""
    flagged = {family for target in targets for family in (evidence or {}).get(target, [])}
    chosen = tuple(f for f in families if f in flagged)
    return chosen or families


def writable_batchnorm(prepared) -> bool:
    """Whether every BatchNorm layer of the module has its four tensors among ``prepared.refs``
    (so that what unlearning in train mode sets can be written back)."""
    statistics = prepared.loaded.storage.statistics
    owners = {ref.owner for name, ref in prepared.refs.items() if name in statistics}
    layers = {id(layer) for layer in batchnorm_layers(prepared.module)}
    named = {name for name, layer in prepared.module.named_modules() if id(layer) in layers}
    return bool(named) and named <= owners


def recalibration_check(student: nn.Module, images: np.ndarray, targets: list[int],
                        logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                        input_range: tuple[float, float], config: AdversarialConfig) -> dict:
    """Check (a): the cleaned module's BatchNorm statistics re-estimated on ``images``, and a fresh
    trigger search on the held-out split of both modules. Masked when the recalibrated module's
    reach rises by more than ``MASKED_REACH_RISE`` points."""
    if not batchnorm_layers(student):
        return {"run": False, "why": "no BatchNorm nodes: nothing a recalibration could change", "masked": False}
    recalibrated = recalibrate(student, images)
    x = torch.as_tensor(images, dtype=torch.float32)
    _, held = _split(len(x), config.holdout, config.seed)
    with torch.no_grad():
        labels = logits_of(student, x[held]).argmax(1)
    before = _judge(lambda xb: logits_of(student, xb), x[held], labels, targets, input_range, config, 99, 0.0)
    after = _judge(lambda xb: logits_of(recalibrated, xb), x[held], labels, targets, input_range, config, 99, 0.0)
    rise = {f: after.reach[f] - before.reach.get(f, 0.0) for f in after.reach}
    worst = max(rise, key=rise.get) if rise else None
    masked = worst is not None and rise[worst] > MASKED_REACH_RISE
    return {"run": True, "masked": bool(masked), "family": worst, "target": targets[0] if targets else None,
            "before": before.reach.get(worst, 0.0) if worst else 0.0, "after": after.reach.get(worst, 0.0) if worst else 0.0,
            "reach_before": {k: round(v, 2) for k, v in before.reach.items()},
            "reach_after": {k: round(v, 2) for k, v in after.reach.items()},
            "agreement_after": round(after.agreement, 2), "max_rise": MASKED_REACH_RISE}


def _class_scores(output_index: int, is_probability: bool) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Class scores of a converted module as logits: a trailing Softmax's probabilities become
    log-probabilities (the same softmax)."""
    def logits_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        if isinstance(out, (tuple, list)):
            out = out[output_index]
        out = out.reshape(out.shape[0], -1)
        return torch.log(out.clamp_min(1e-12)) if is_probability else out
    return logits_of
