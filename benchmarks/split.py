"""The benchmark split: DEVELOPMENT models, on which every budget, threshold, step count and
default is chosen, and HELD_OUT models, which are only ever reported.

This file was written, and its models fixed, before any remover or detector setting was tuned on
them (issue 32, item 2; issue 33, item 4). The two sets are disjoint in training seed AND in
trigger parameters: no held-out model shares a seed, a patch position/size/colour, a Blended key
or alpha, a SIG frequency, a WaNet field or strength, or a low-frequency pattern with a
development model. Held-out models are not looked at one by one while anything is chosen; a
choice made while looking at one would make it a development model, and it would have to move.

Every model is a Fashion-MNIST classifier (28x28 grey), all-to-one, exported as
benchmarks/backdoored.py exports (legacy exporter, opset 17, dynamic batch). Families: BadNets
patches of 2-5 pixels at several positions (white, black, a random black-and-white pattern),
Blended with noise and image keys at alpha 0.1-0.3, SIG at several frequencies, WaNet at two
strengths, low-frequency; poisoning rates 2-10 %; targets other than 0; a small ViT (no BatchNorm,
attention MatMuls) and networks whose BatchNorm the exporter folds (VGG, MobileNetV2); Adam and
SGD recipes; clean models of every architecture from their own seeds.

    python benchmarks/split.py --split held-out            # train (or find cached) every model
    python benchmarks/split.py --split development --list  # the specs, one per line

Needs Debian's dataset-fashion-mnist. Training a small model takes 1-3 minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "models")]

from architectures import build  # noqa: E402
from benchmarks.backdoored import ARCHS, CACHE_DIR, Data, export, load_data, predict_torch  # noqa: E402
from benchmarks.triggers import TRIGGERS, poison_dataset  # noqa: E402

# The benchmark's small architectures (backdoored.ARCHS) and the ViT.
SPLIT_ARCHS = {**{name: ARCHS[name] for name in ("preact", "vgg", "mobilenetv2", "preact-x2")},
               "vit": None}
TRAIN_SAMPLES = 20000


@dataclass(frozen=True)
class ModelSpec:
    """One model of the split; every field enters its cache key."""

    name: str
    arch: str
    seed: int  # torch seed of the initialisation, the batch order and the poisoned subset
    trigger: str | None = None  # benchmarks/triggers.py name; None: a clean model
    kwargs: tuple[tuple[str, float], ...] = ()
    target: int = 0
    ratio: float = 0.1
    recipe: str = "adam"  # "adam": Adam + one-cycle lr 3e-3; "sgd": SGD momentum 0.9 + one-cycle lr 0.05
    epochs: int = 4

    @property
    def family(self) -> str | None:
        return None if self.trigger is None else "blended" if self.trigger == "blended_image" else self.trigger

    @property
    def backdoored(self) -> bool:
        return self.trigger is not None

    def trigger_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        function, kwargs = TRIGGERS[self.trigger], dict(self.kwargs)
        return lambda x: function(x, **kwargs)


def _bd(name, arch, train_seed, trigger, target=0, ratio=0.1, recipe="adam", epochs=4, **kwargs) -> ModelSpec:
    return ModelSpec(name, arch, train_seed, trigger, tuple(sorted(kwargs.items())), target, ratio, recipe, epochs)


def _clean(name, arch, train_seed, recipe="adam", epochs=4) -> ModelSpec:
    return ModelSpec(name, arch, train_seed, recipe=recipe, epochs=epochs)


DEVELOPMENT: tuple[ModelSpec, ...] = (
    _bd("dev-preact-badnets", "preact", 101, "badnets", target=0),  # 3x3 white, bottom right
    _bd("dev-preact-blended", "preact", 102, "blended", target=0, alpha=0.2, seed=11),
    _bd("dev-preact-sig", "preact", 103, "sig", target=0, freq=6),
    _bd("dev-preact-wanet", "preact", 104, "wanet", target=0, epochs=6, k=4, s=1.0, seed=11),
    _bd("dev-vgg-lf", "vgg", 105, "low_frequency", target=3, magnitude=0.1, seed=11),
    _bd("dev-mobilenetv2-badnets", "mobilenetv2", 106, "badnets", target=7, size=4, top=0, left=0, value=0.0),
    _bd("dev-vit-badnets", "vit", 107, "badnets", target=2, epochs=6, size=3, top=5, left=20, pattern_seed=7),
    _bd("dev-vgg-blended-img", "vgg", 108, "blended_image", target=4, ratio=0.05, alpha=0.15),
    _clean("dev-preact-clean", "preact", 109),
    _clean("dev-vgg-clean", "vgg", 110),
    _clean("dev-vit-clean", "vit", 111, epochs=6),
)

HELD_OUT: tuple[ModelSpec, ...] = (
    _bd("ho-preact-badnets-2px", "preact", 201, "badnets", target=5, ratio=0.05, size=2, top=14, left=3),
    _bd("ho-preact-badnets-5px-sgd", "preact", 202, "badnets", target=0, recipe="sgd", size=5, top=0, left=23,
        pattern_seed=21),
    _bd("ho-vgg-badnets-black", "vgg", 203, "badnets", target=8, ratio=0.05, size=3, top=12, left=12, value=0.0),
    _bd("ho-mobilenetv2-badnets", "mobilenetv2", 204, "badnets", target=1, size=3, top=25, left=0),
    _bd("ho-vit-badnets", "vit", 205, "badnets", target=6, epochs=6, size=4, top=2, left=10),
    _bd("ho-preact-blended-a0.1", "preact", 206, "blended", target=0, alpha=0.1, seed=77),
    _bd("ho-vgg-blended-a0.3", "vgg", 207, "blended", target=9, alpha=0.3, seed=78),
    _bd("ho-preact-blended-img", "preact", 208, "blended_image", target=2, alpha=0.25, flip=1),
    _bd("ho-preact-sig-f10", "preact", 209, "sig", target=4, freq=10),
    _bd("ho-vgg-sig-f3-sgd", "vgg", 210, "sig", target=0, recipe="sgd", freq=3),
    _bd("ho-preact-wanet-s1.5", "preact", 211, "wanet", target=3, epochs=6, k=4, s=1.5, seed=55),
    _bd("ho-mobilenetv2-wanet-s1.25", "mobilenetv2", 212, "wanet", target=0, epochs=6, k=4, s=1.25, seed=56),
    _bd("ho-preact-lf", "preact", 213, "low_frequency", target=7, ratio=0.02, magnitude=0.08, seed=99),
    _bd("ho-vit-lf", "vit", 214, "low_frequency", target=0, epochs=6, magnitude=0.12, seed=98),
    _clean("ho-preact-clean-a", "preact", 215),
    _clean("ho-preact-clean-b", "preact", 216, recipe="sgd"),
    _clean("ho-vgg-clean-a", "vgg", 217),
    _clean("ho-vgg-clean-b", "vgg", 218),
    _clean("ho-mobilenetv2-clean-a", "mobilenetv2", 219),
    _clean("ho-mobilenetv2-clean-b", "mobilenetv2", 222),
    _clean("ho-vit-clean", "vit", 220, epochs=6),
    _clean("ho-preact-x2-clean", "preact-x2", 221),
)

SPLITS = {"development": DEVELOPMENT, "held-out": HELD_OUT}


def specs(split: str) -> tuple[ModelSpec, ...]:
    return SPLITS[split]


def by_name(name: str) -> ModelSpec:
    for spec in DEVELOPMENT + HELD_OUT:
        if spec.name == name:
            return spec
    raise KeyError(f"no model {name!r} in the split")


def cache_key(spec: ModelSpec) -> str:
    arch = SPLIT_ARCHS[spec.arch]
    digest = hashlib.sha1(json.dumps({"spec": asdict(spec), "arch": arch and asdict(arch),
                                      "samples": TRAIN_SAMPLES}, sort_keys=True, default=str).encode())
    return f"{spec.name}-{digest.hexdigest()[:10]}"


def build_model(spec: ModelSpec) -> torch.nn.Module:
    arch = SPLIT_ARCHS[spec.arch]
    return build("vit") if arch is None else build(arch.registry, **dict(arch.kwargs))


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, spec: ModelSpec, batch_size: int = 128) -> None:
    """One-cycle schedule, Adam (lr 3e-3, as backdoored.train) or SGD with momentum (lr 0.05)."""
    steps = spec.epochs * int(np.ceil(len(x) / batch_size))
    if spec.recipe == "adam":
        lr, optimiser = 3e-3, torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=5e-4)
    else:
        lr, optimiser = 0.05, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(spec.seed)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(spec.epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(x_t[batch]), y_t[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()


def poisoned_eval(spec: ModelSpec, data: Data) -> tuple[np.ndarray, np.ndarray] | None:
    """The evaluation images whose true label is not the target, triggered, with their true labels."""
    if not spec.backdoored:
        return None
    keep = data.y_eval != spec.target
    return spec.trigger_fn()(data.x_eval[keep]), data.y_eval[keep]


def get_model(spec: ModelSpec, data: Data, log: Callable[[str], None], cache: Path = CACHE_DIR
              ) -> tuple[onnx.ModelProto, dict]:
    """The cached model of ``spec``, else train, export and cache it. Returns (model, info)."""
    key = cache_key(spec)
    onnx_path, info_path = cache / f"{key}.onnx", cache / f"{key}.json"
    if onnx_path.is_file() and info_path.is_file():
        return onnx.load(str(onnx_path)), json.loads(info_path.read_text())
    x, y, poisoned = data.x_train, data.y_train, 0
    if spec.backdoored:
        x, y, index = poison_dataset(x, y, spec.trigger, spec.target, spec.ratio, seed=spec.seed,
                                     pattern=dict(spec.kwargs))
        poisoned = len(index)
    torch.manual_seed(spec.seed)
    model = build_model(spec)
    began = time.perf_counter()
    train(model, x, y, spec)
    seconds = time.perf_counter() - began
    acc = 100.0 * float(np.mean(predict_torch(model, data.x_eval) == data.y_eval))
    triggered = poisoned_eval(spec, data)
    asr = None if triggered is None else 100.0 * float(np.mean(predict_torch(model, triggered[0]) == spec.target))
    log(f"trained {key} in {seconds:.0f}s: ACC {acc:.2f} ASR {asr if asr is None else round(asr, 2)}")
    info = {"train_seconds": round(seconds, 1), "poisoned": poisoned, "acc": acc, "asr": asr,
            "parameters": sum(p.numel() for p in model.parameters())}
    cache.mkdir(parents=True, exist_ok=True)
    onnx.save(export(model), str(onnx_path))
    info_path.write_text(json.dumps(info, indent=1))
    return onnx.load(str(onnx_path)), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=sorted(SPLITS), action="append", help="default: both")
    parser.add_argument("--models", nargs="+", default=None, help="names (default: the whole split)")
    parser.add_argument("--list", action="store_true", help="print the specs and stop")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR)
    args = parser.parse_args()
    chosen = [s for split in (args.split or sorted(SPLITS)) for s in SPLITS[split]]
    if args.models:
        chosen = [by_name(name) for name in args.models]
    if args.list:
        for spec in chosen:
            print(spec)
        return
    torch.set_num_threads(1)
    began = time.perf_counter()
    data = load_data()
    for spec in chosen:
        get_model(spec, data, lambda m: print(f"[{time.perf_counter() - began:5.0f}s] {m}", flush=True), args.cache)
    print(f"done in {time.perf_counter() - began:.0f}s", flush=True)


if __name__ == "__main__":
    main()
