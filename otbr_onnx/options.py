"""What a user can set for ``scan`` and ``clean`` (``CleanOptions``), and the study knobs that only
the benchmarks turn (``Experiment``).

``CleanOptions`` is made of frozen groups, each validated by its own ``validate``:

- ``scan`` (``ScanOptions``): detection, the maximum-margin search and its verdict (detect.py,
  detectors/);
- ``data`` (``DataOptions``): the user's images (``--data``), the calibration set and the probes
  synthesised when there are none;
- ``removal`` (``RemovalOptions``): how the backdoor is removed: the remover, ranking, unlearning,
  pruning and fusion, and the fidelity budget;
- ``interface`` (``InterfaceOptions``): the model's input range, input shape and logits output;
- ``run`` (``RunOptions``): where and how the run executes: seed, device, memory, providers;
- ``limits`` (``load.Limits``): the caps that keep a hostile file from exhausting the machine;
- ``experiment`` (``Experiment``): the benchmarks' study knobs.

A copy with a few fields changed: ``options.with_(removal={"prune_ratio": 0.1})``.

The command line takes its choices and defaults from here (``default``, ``METHODS`` ...) and maps
its arguments to the groups here (``COMMAND_LINE``, ``from_command_line``), so this module imports
nothing heavy: ``otbr-onnx --help`` must not load torch."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace

from otbr_onnx.errors import UsageError
from otbr_onnx.load import Limits

# The scan's robust z above which a class is suspected (detectors/margin.py says why 3.5), here so
# that the CLI reads the default without importing the detector, which imports torch.
DEFAULT_THRESHOLD = 3.5
DEVICES = ("auto", "cpu", "cuda")
ORT_PROVIDERS = ("cpu", "cuda")  # onnxruntime execution providers for the parity checks

METHODS = ("otbr", "prune-only", "clp")
# How neurons are ranked for pruning and weighted in the fusion (rank.py):
#   activation: target-aware, how much more a neuron fires on the suspected target's
#               maximum-margin inputs than on the other classes' (needs a suspected class);
#   nwc:        the paper's neuron weight change under random unlearning;
#   auto:       activation when the scan suspects a class, else nwc.
RANKINGS = ("auto", "activation", "nwc")
# How the backdoor is removed (otbr_onnx/removers/):
#   pruning:     ranking + pruning + OT fusion (``method`` picks OTBR, prune-only or CLP), data-free;
#   adversarial: adversarial unlearning on the user's images (--data): triggers the model still
#                obeys are found and the weight layers are fine-tuned to ignore them while keeping
#                the original's answers;
#   auto:        adversarial when the user gives images (--data) and asks for nothing only pruning
#                reads (--reference, --method prune-only/clp, --prune-ratio, --calibration);
#                pruning otherwise.
#                Measured on the data benchmark (200 images, 16 backdoored models,
#                benchmarks/WITH_DATA.md): adversarial unlearning cleaned 3 for good
#                (PreAct LF t9, VGG LF and WaNet, ASR <= 4.5 after recalibration and fine-tuning, at
#                -1.6 to -2.5 points) and lowered two more (SIG 93.5 -> 29.5, VGG Blended 99.7 ->
#                17.0); pruning scored on the same images cleaned none of the PreAct ones
#                (WITH_DATA.md), its candidates that cleared the target costing 2.5-30 points. The
#                price: 1.5-6 minutes per flagged small model on 2 CPU cores, and most flagged models
#                refused rather than cleaned (the rescan still flags the target, no round fits the
#                budget, or no trigger's reach fell).

# The fidelity budget (accuracy points, --max-acc-drop) each remover gets when none is given.
# Relearning rebuilds the model's answers from a few hundred images and costs far more than a
# targeted removal: on the development split of benchmarks/split.py (200 images,
# benchmarks/REMOVAL_DEV.md) its held-out estimate of the cost was 2.3-12.4 points (measured on
# test images: 5.7-13.9). 10 sanitizes 12 of those 14 models; a budget of 2 would sanitize none,
# and every model the scan passes would again be handed back as it came.
RESIDUAL_PICKERS = ("minimal", "scan", "off")  # --unlearn-residual
MAX_ACC_DROP: dict[str, float] = {"pruning": 2.0, "adversarial": 2.0, "relearning": 10.0}


@dataclass(frozen=True)
class Experiment:
    """Knobs studied in the benchmarks, not offered on the command line. Defaults are the tool's."""

    layers: str = "all"  # "all" weight layers, or "conv" only as in the paper
    fuse_head: bool = False
    nwc_power: float = 1.0  # q proportional to score ** power
    # How NWC is compared ACROSS layers: "sum" over the neuron's weights (the paper) or "mean" per
    # weight. "mean" was refused on all 24 benchmark models under the ratio rule (a past study;
    # its write-up is no longer in the repository).
    nwc_scale: str = "sum"
    unlearn_bn: str = "train"  # BatchNorm mode during unlearning: "train" (the reference) or "eval"
    aligned_cost: bool = True  # OT cost on input-aligned pruned rows (the reference: raw rows)
    max_grad_norm: float | None = None  # unlearning gradient clipping (off: the loss cap bounds it)
    max_loss: float | None = 100.0  # stop unlearning once noise cross-entropy passes this
    clp_u: float = 3.0  # CLP's threshold: mean + u * std of a layer's channel Lipschitz bounds

    def validate(self) -> None:
        if self.layers not in ("all", "conv"):
            raise UsageError(f"layers must be 'all' or 'conv', got {self.layers!r}")
        if self.nwc_scale not in ("sum", "mean") or self.unlearn_bn not in ("train", "eval"):
            raise UsageError("nwc_scale must be 'sum' or 'mean', unlearn_bn 'train' or 'eval'")
        if not self.nwc_power > 0 or not self.clp_u > 0:
            raise UsageError("nwc_power and clp_u must be > 0")


@dataclass(frozen=True)
class ScanOptions:
    """Detection (detect.py, detectors/): the maximum-margin search and the z above which it flags."""

    starts: int = 8  # --scan-starts
    steps: int = 100  # --scan-steps
    threshold: float = DEFAULT_THRESHOLD  # --scan-threshold
    # The scan screens every class: a model with more classes is refused before it starts
    # (budget.check_work), so that a small file declaring 100,000 classes cannot run for hours.
    max_classes: int = 1000

    def validate(self) -> None:
        if self.starts < 1 or self.steps < 1:
            raise UsageError("--scan-starts and --scan-steps must be >= 1")
        if not self.threshold > 0:
            raise UsageError(f"--scan-threshold must be > 0, got {self.threshold}")
        if self.max_classes < 1:
            raise UsageError(f"--max-classes must be >= 1, got {self.max_classes}")


@dataclass(frozen=True)
class DataOptions:
    """The images a run reads: the user's (``--data``), the calibration set, and the number of
    probes synthesised from the model when the ratio rule has neither."""

    # The user's own images (``--data``): a folder of PNG/JPEG or an npz (x, optional y). Folder
    # images are scaled to the interface's ``input_range``, then normalised with ``mean``/``std``
    # per channel when given (otbr_onnx/data/images.py). None: surrogate images synthesised from
    # the model.
    path: str | None = None
    mean: tuple[float, ...] | None = None  # --data-mean
    std: tuple[float, ...] | None = None  # --data-std
    # With clean images (an npz of x/y) the ratio rule scores accuracy on them under max_acc_drop
    # points instead of soft agreement on probes. Never triggered data.
    calibration: str | None = None
    probes: int = 64

    def validate(self) -> None:
        if self.probes < 1:
            raise UsageError(f"--probes must be >= 1, got {self.probes}")
        self._validate_normalisation()

    def _validate_normalisation(self) -> None:
        """--data-mean / --data-std: finite numbers (std > 0), and only with --data. Their count
        against the model's channels is checked where the images are read (data.load_images)."""
        for option, values in (("--data-mean", self.mean), ("--data-std", self.std)):
            if values is None:
                continue
            if self.path is None:
                raise UsageError(f"{option} normalises the images of --data; give --data too")
            if not values or not all(math.isfinite(v) for v in values):
                raise UsageError(f"{option} must be one or more finite numbers, got {values}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise UsageError(f"--data-std must be > 0 for every channel, got {self.std}")


@dataclass(frozen=True)
class RemovalOptions:
    """How the backdoor is removed: the remover, the ranking and random unlearning, pruning and
    fusion, and what the cleaning may cost (the fidelity budget)."""

    remover: str = "auto"  # a name of otbr_onnx/removers/ (checked there) or "auto", see resolved_remover
    method: str = "otbr"  # "otbr", "prune-only" (stage 1 alone) or "clp" (baseline)
    ranking: str = "auto"
    always: bool = False  # clean even when the scan finds nothing (fidelity-first ratio rule)
    # With --data every model is sanitized, flagged or not (``sanitizes_every_model``); this keeps
    # the behaviour before: remove only what the scan flags.
    only_if_flagged: bool = False
    # The relearning remover: search the relearnt model ("minimal": the minimal-trigger statistic;
    # "scan": the pipeline's scan; "off") and unlearn a class it still flags (removers/residual.py)
    # within what the accuracy budget has left. Off: neither search helped on the held-out split
    # (benchmarks/RESIDUAL.md; docs/method.md says how that decision was reached).
    unlearn_residual: str = "off"
    reference: bool = False  # the published method: no scan, NWC ranking, fixed gamma
    # --- random unlearning ---
    iterations: int = 20
    batch_size: int = 256
    # 1e-4 (the paper's, tuned on a full-width CIFAR-10 ResNet-18) barely moves the noise loss of
    # small models in 20 steps (4.36 -> 4.57 nats on the demo); 1e-3 moves it (-> 5.7) without
    # the blow-up seen at 1e-2 (-> 34).
    lr: float = 1e-3
    # --- pruning and fusion ---
    fusion_lambda: float = 0.5
    # None: chosen per model (ratio.py). A number fixes it.
    prune_ratio: float | None = None
    # --- the fidelity budget ---
    # Accuracy points the cleaning may cost on real images: --calibration, or --data (against its
    # labels, else the original's answers). None: the remover's own (``CleanOptions.max_acc_drop``).
    max_acc_drop: float | None = None
    # % of the original's confidence in its own answers on the synthesised probes that the
    # cleaning may lose (soft disagreement, see ratio.soft_agreement).
    max_disagreement: float = 10.0

    def validate(self) -> None:
        if self.iterations < 0 or self.batch_size < 1:
            raise UsageError("--iterations must be >= 0 and --batch-size >= 1")
        if not 0.0 <= self.fusion_lambda <= 1.0:
            raise UsageError(f"--fusion-lambda must be in [0, 1], got {self.fusion_lambda}")
        if self.prune_ratio is not None and not 0.0 <= self.prune_ratio < 1.0:
            raise UsageError(f"--prune-ratio must be in [0, 1), got {self.prune_ratio}")
        if not 0.0 <= self.max_disagreement <= 100.0:
            raise UsageError(f"--max-disagreement must be in [0, 100], got {self.max_disagreement}")
        if self.max_acc_drop is not None and self.max_acc_drop < 0:
            raise UsageError(f"--max-acc-drop must be >= 0, got {self.max_acc_drop}")
        if self.unlearn_residual not in RESIDUAL_PICKERS:
            raise UsageError(f"--unlearn-residual must be one of {', '.join(RESIDUAL_PICKERS)}, "
                             f"got {self.unlearn_residual!r}")
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.ranking not in RANKINGS:
            raise UsageError(f"--ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")
        if self.reference and self.ranking == "activation":
            raise UsageError("--reference is the published method: its ranking is nwc, not activation")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class InterfaceOptions:
    """The model's interface: the range of its input values, its input shape when the model's is
    dynamic, and which output holds the logits when it has several."""

    input_range: tuple[float, float] = (0.0, 1.0)
    input_shape: tuple[int, ...] | None = None
    output_name: str | None = None  # --output

    def validate(self) -> None:
        low, high = self.input_range
        if not low < high:
            raise UsageError(f"--input-range must be LOW,HIGH with LOW < HIGH, got {low},{high}")


@dataclass(frozen=True)
class RunOptions:
    """Where and how the run executes: its seed, device, parity provider and memory."""

    seed: int = 0
    device: str = "auto"
    ort_provider: str = "cpu"  # onnxruntime execution provider for parity: "cpu" or "cuda"
    # Bytes the run may use (host RSS; on CUDA, device memory): the micro-batch of unlearning,
    # scan and probes is chosen to fit (sizing.py). None: 2 GiB, or half the available memory
    # when that is less (CUDA: half the free device memory).
    max_memory: int | None = None
    micro_batch: int | None = None  # unlearn the batch in chunks of this size (None: from max_memory)

    def validate(self) -> None:
        if self.micro_batch is not None and self.micro_batch < 1:
            raise UsageError(f"--micro-batch must be >= 1, got {self.micro_batch}")
        if self.max_memory is not None and self.max_memory < 1:
            raise UsageError(f"--max-memory must be a positive size, got {self.max_memory}")
        if self.device not in DEVICES:
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.ort_provider not in ORT_PROVIDERS:
            raise UsageError(f"--ort-provider must be cpu or cuda, got {self.ort_provider!r}")


@dataclass(frozen=True)
class CleanOptions:
    """Every option of ``scan`` and ``clean``, by group (see the module's docstring).
    ``published()`` gives the paper's settings."""

    scan: ScanOptions = field(default_factory=ScanOptions)
    data: DataOptions = field(default_factory=DataOptions)
    removal: RemovalOptions = field(default_factory=RemovalOptions)
    interface: InterfaceOptions = field(default_factory=InterfaceOptions)
    run: RunOptions = field(default_factory=RunOptions)
    limits: Limits = field(default_factory=Limits)
    experiment: Experiment = field(default_factory=Experiment)

    @classmethod
    def published(cls, **groups: dict) -> "CleanOptions":
        """The paper's settings: 20 steps, batch 256, lr 1e-4, lambda 0.5, conv layers only, NWC
        ranking, no scan, and a fixed gamma (0.02: the paper sweeps gamma with test data, which a
        tool cannot do). ``groups``: fields changed on top, as in ``with_``."""
        removal = RemovalOptions(iterations=20, batch_size=256, lr=1e-4, fusion_lambda=0.5, reference=True,
                                 prune_ratio=0.02, ranking="nwc", always=True)
        experiment = Experiment(layers="conv", aligned_cost=False, max_grad_norm=None, max_loss=None)
        return cls(removal=removal, experiment=experiment).with_(**groups)

    def with_(self, **groups: dict) -> "CleanOptions":
        """A copy with some fields of some groups changed, each group's as a dict of field values:
        ``options.with_(removal={"prune_ratio": 0.1}, run={"seed": 1})``."""
        return replace(self, **{name: replace(getattr(self, name), **changes) for name, changes in groups.items()})

    @property
    def resolved_remover(self) -> str:
        """The remover ``auto`` stands for (see the comment on removers above): adversarial
        unlearning when the user gave images, unless an option only pruning reads was set."""
        removal = self.removal
        if removal.remover != "auto":
            return removal.remover
        pruning_asked = (removal.reference or removal.method != "otbr" or removal.prune_ratio is not None
                         or self.data.calibration is not None)
        return "relearning" if self.data.path is not None and not pruning_asked else "pruning"

    @property
    def max_acc_drop(self) -> float:
        """The accuracy points the cleaning may cost: ``--max-acc-drop`` where given, else the
        remover's default (``MAX_ACC_DROP``)."""
        given = self.removal.max_acc_drop
        return given if given is not None else MAX_ACC_DROP.get(self.resolved_remover, MAX_ACC_DROP["pruning"])

    @property
    def sanitizes_every_model(self) -> bool:
        """Whether ``clean`` removes whatever the scan says: with the user's images (--data) and the
        relearning remover the scan is evidence for the report, not the gate on removal, unless
        --only-if-flagged (or --always, which cleans every model anyway). The scan misses backdoors
        it was never tuned on (issue 33: 12 of 16 unseen backdoored models passed unchanged behind
        it). The pruning and adversarial removers work on the class the scan suspects, so for them
        the scan stays the gate."""
        if self.removal.always:
            return True
        return (self.data.path is not None and self.resolved_remover == "relearning"
                and not self.removal.only_if_flagged)

    @property
    def scans(self) -> bool:
        """Whether ``clean`` runs the scan (and the rescan): every method but the published one."""
        return not self.removal.reference

    def validate(self) -> None:
        for group in (self.run, self.scan, self.removal, self.interface, self.data, self.experiment):
            group.validate()
        if self.removal.remover in ("adversarial", "relearning") and self.data.path is None:
            raise UsageError(f"--remover {self.removal.remover} learns from the user's images: give --data")


def default(path: str):
    """The default of the option at ``path``: a group and its field (``"scan.starts"``) or a whole
    group (``"limits"``). The CLI shows it and starts from it, so it keeps no copy of a default."""
    group, _, name = path.partition(".")
    value = _field_default(CleanOptions, group)
    return _field_default(type(value), name) if name else value


def _field_default(cls: type, name: str):
    found = next(f for f in fields(cls) if f.name == name)
    return found.default_factory() if found.default is MISSING else found.default


def _same_names(group: str, cls: type) -> dict[str, tuple[str, str]]:
    return {f.name: (group, f.name) for f in fields(cls)}


# Each command-line argument (click's parameter name) and the option it sets: (group, field).
# The data and scan options carry their group in the flag (--data-mean, --scan-steps); the others
# are named as their fields.
COMMAND_LINE: dict[str, tuple[str, str]] = {
    "scan_starts": ("scan", "starts"),
    "scan_steps": ("scan", "steps"),
    "scan_threshold": ("scan", "threshold"),
    "max_classes": ("scan", "max_classes"),
    "data_path": ("data", "path"),
    "data_mean": ("data", "mean"),
    "data_std": ("data", "std"),
    "calibration": ("data", "calibration"),
    "probes": ("data", "probes"),
    **_same_names("removal", RemovalOptions),
    **_same_names("interface", InterfaceOptions),
    **_same_names("run", RunOptions),
    **_same_names("limits", Limits),
}

# What the published method decides whatever the flags say: it has no scan (always cleans) and
# ranks by NWC. The command line's defaults for these (--always off, --ranking auto) must not
# override it; the values themselves come from ``CleanOptions.published``.
PUBLISHED_DECIDES = ("always", "ranking")


def from_command_line(reference: bool, given: dict, **fixed) -> CleanOptions:
    """The published (``--reference``) or default settings, overridden by the options the user
    gave (``given``: None means not given, so the base keeps its value) and by ``fixed`` (options
    that always have a value), except what the published method decides (``PUBLISHED_DECIDES``).
    Both are keyed by the command line's names (``COMMAND_LINE``)."""
    base = CleanOptions.published() if reference else CleanOptions()
    if reference:
        fixed = {**fixed, **{name: _argument(base, name) for name in PUBLISHED_DECIDES}}
    return base.with_(**_grouped({**{k: v for k, v in given.items() if v is not None}, **fixed}))


def _argument(options: CleanOptions, name: str):
    """The value of the command-line argument ``name`` in ``options``."""
    group, field_name = COMMAND_LINE[name]
    return getattr(getattr(options, group), field_name)


def _grouped(arguments: dict) -> dict[str, dict]:
    """Command-line arguments as ``with_`` takes them: each group's fields in a dict."""
    groups: dict[str, dict] = {}
    for name, value in arguments.items():
        group, field_name = COMMAND_LINE[name]
        groups.setdefault(group, {})[field_name] = value
    return groups
