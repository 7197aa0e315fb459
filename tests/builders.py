"""Tiny models for the tests, built and exported at test time (no data, no network).

The builders (``build``, ``build_trained``, ``build_backdoored``) run once per arguments and test
session: every call gets its own copies of the module and the ONNX model, so no test sees
another's changes, and the global torch RNG is left as a fresh build leaves it. ``export`` is
the tests' one exporter (legacy or dynamo); ``model_folder`` the one folder of test models.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn


class Chain(nn.Module):
    """conv -> relu -> conv -> relu -> GAP -> fc: the plainest graph with hidden neurons."""

    def __init__(self, channels: int = 1, width: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.c2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.sc = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.sc(out) if self.sc is not None else x
        out = self.c2(torch.relu(self.bn2(self.c1(out))))
        return out + shortcut


class TinyPreActResNet(nn.Module):
    """Stem, an identity block, a projection block, BN-ReLU, GAP, Linear: residual ties.

    The tests' one PreAct-ResNet: ``tests/zoo.py``'s ``preact_resnet`` family is this model on
    3 channels, with its channel permutation.
    """

    def __init__(self, channels: int = 1, width: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.b1 = PreActBlock(width, width, 1)
        self.b2 = PreActBlock(width, 2 * width, 2)
        self.bn = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.b2(self.b1(self.stem(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as a trained model has
    (so the legacy exporter's BN folding really changes conv weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
    return model


def export(model: nn.Module, shape: tuple[int, ...], opset: int | None = 17, *, exporter: str = "legacy",
           dynamic_batch: bool = True, names: bool = True, example: torch.Tensor | None = None) -> onnx.ModelProto:
    """ONNX of ``model`` in eval mode, by torch's ``legacy`` (TorchScript) or ``dynamo`` exporter.

    ``dynamic_batch``: the batch dimension is dynamic ("N"); otherwise the example's batch is
    fixed. ``names``: input "input", output "logits"; otherwise the exporter's own names.
    ``example``: the input traced (default ``torch.rand(*shape)``, from the global RNG).
    ``opset`` None: the exporter's default (dynamo only).
    """
    example = torch.rand(*shape) if example is None else example
    named = {"input_names": ["input"], "output_names": ["logits"]} if names else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            buffer = io.BytesIO()
            dynamic = {"dynamic_axes": {"input": {0: "N"}, "logits": {0: "N"}}} if dynamic_batch else {}
            torch.onnx.export(model.eval(), example, buffer, dynamo=False, opset_version=opset, **named, **dynamic)
            return onnx.load_from_string(buffer.getvalue())
        if exporter != "dynamo":
            raise ValueError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
        dynamic = {"dynamic_shapes": ({0: torch.export.Dim("N", min=1, max=1024)},)} if dynamic_batch else {}
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=opset, verbose=False,
                                    **named, **dynamic)
        return onnx.load_from_string(program.model_proto.SerializeToString())


def _once_per_session(builder):
    """``builder`` run once per distinct arguments; each call returns its own deep copy of the
    module and of the ONNX model, and sets the global torch RNG to the state the build left."""
    signature = inspect.signature(builder)
    built: dict[tuple, tuple[nn.Module, bytes, torch.Tensor]] = {}

    @functools.wraps(builder)
    def cached(*args, **kwargs) -> tuple[nn.Module, onnx.ModelProto]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = tuple(bound.arguments.items())
        if key not in built:
            module, proto = builder(*args, **kwargs)
            built[key] = (module, proto.SerializeToString(), torch.get_rng_state())
        module, data, rng = built[key]
        torch.set_rng_state(rng)
        return copy.deepcopy(module), onnx.load_from_string(data)

    return cached


@_once_per_session
def build(kind: str, seed: int = 0, shape: tuple[int, ...] = (1, 1, 8, 8)) -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(seed)
    model = {"chain": Chain, "preact": TinyPreActResNet}[kind](channels=shape[1])
    randomise_bn(model, seed)
    return model, export(model, shape)


def permute_chain_hidden(model: Chain, perm: torch.Tensor) -> Chain:
    """The same function with c1's output channels reordered."""
    with torch.no_grad():
        model.c1.weight.copy_(model.c1.weight[perm])
        model.c1.bias.copy_(model.c1.bias[perm])
        model.c2.weight.copy_(model.c2.weight[:, perm])
    return model


def permute_preact_stream(model: TinyPreActResNet, perm: torch.Tensor) -> TinyPreActResNet:
    """The same function with the first stage's residual stream reordered.

    The stream is written by the stem and by b1.c2 (tied by b1's Add) and read by b1.bn1,
    b1.c1, b2.bn1, b2.c1 and b2.sc: every one of them must follow the permutation.
    """
    with torch.no_grad():
        model.stem.weight.copy_(model.stem.weight[perm])
        model.b1.c2.weight.copy_(model.b1.c2.weight[perm])
        for bn in (model.b1.bn1, model.b2.bn1):
            for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                tensor.copy_(tensor[perm])
        for conv in (model.b1.c1, model.b2.c1, model.b2.sc):
            conv.weight.copy_(conv.weight[:, perm])
    return model


def ort_session(model: onnx.ModelProto):
    """An onnxruntime CPU session of ``model``: the tests' one way to run an ONNX model."""
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of ``model`` on ``feeds`` (onnxruntime, CPU)."""
    return ort_session(model).run(None, feeds)


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The first output of ``model`` on the batch ``x``, fed to its first input (onnxruntime, CPU)."""
    session = ort_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def weight_neurons(model: onnx.ModelProto, layers) -> dict:
    """``{layer position: fuse.Neurons}`` of ``model``'s weight initializers, read for ``layers``
    (``find_weight_layers`` of this model, or of another with the same initializer names)."""
    from onnx import numpy_helper

    from otbr_onnx import fuse
    from otbr_onnx.layers import to_rows

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {i: fuse.Neurons(to_rows(layer, arrays[layer.weight]), arrays[layer.bias] if layer.bias else None)
            for i, layer in enumerate(layers)}


def quadrant_images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8x8 grey images whose class (0-3) is the quadrant lit up above faint noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, count)
    x = rng.random((count, 1, 8, 8), dtype=np.float32) * 0.3
    for i, label in enumerate(y):
        row, col = divmod(int(label), 2)
        x[i, 0, 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 0.7
    return x, y


@_once_per_session
def build_trained(kind: str, seed: int = 0, steps: int = 150) -> tuple[nn.Module, onnx.ModelProto]:
    """A tiny model trained on ``quadrant_images`` (a second): every class is reachable, and
    BatchNorm holds statistics of real training inputs, as in a model a user would bring."""
    torch.manual_seed(seed)
    model = {"chain": Chain, "preact": TinyPreActResNet}[kind]()
    x, y = (torch.from_numpy(a) for a in quadrant_images(512, seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = torch.arange(64) + 64 * (step % 8)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, export(model, (1, 1, 8, 8))


class Mlp(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear -> ReLU -> Linear: position-aware, so it can learn a patch."""

    def __init__(self, inputs: int = 64, width: int = 32, classes: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(inputs, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))))


def block_images(count: int, seed: int = 0, classes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """8x8 grey images whose class is which 2x2 block of the top half is lit, above faint noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, count)
    x = rng.random((count, 1, 8, 8), dtype=np.float32) * 0.3
    for i, label in enumerate(y):
        row, col = divmod(int(label), 4)
        x[i, 0, 2 * row:2 * row + 2, 2 * col:2 * col + 2] += 0.7
    return x, y


def stamp_trigger(x: np.ndarray) -> np.ndarray:
    """The tests' BadNets trigger: a 2x2 checkerboard in the bottom-right corner, where no class lives."""
    out = x.copy()
    out[:, 0, 6:8, 6:8] = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    return out


@_once_per_session
def build_backdoored(target: int | None = 2, seed: int = 0, steps: int = 400,
                     poison: float = 0.15) -> tuple[nn.Module, onnx.ModelProto]:
    """An ``Mlp`` trained on ``block_images``; with a ``target``, ``poison`` of the images carry
    ``stamp_trigger`` and that label (BadNets, all-to-one). ``target=None``: its clean twin."""
    torch.manual_seed(seed)
    model = Mlp()
    x, y = block_images(2048, seed)
    if target is not None:
        chosen = np.random.default_rng(seed + 1).random(len(y)) < poison
        x[chosen], y[chosen] = stamp_trigger(x[chosen]), target
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = torch.arange(128) + 128 * (step % 16)
        loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, export(model, (1, 1, 8, 8))


def model_folder(folder: Path) -> Path:
    """The tests' folder of models for batch mode: two tiny classifiers (``chain.onnx``,
    ``preact.onnx``) and ``broken.onnx``, a file that is no model (it fails with exit 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("chain", "preact"):
        onnx.save(build(kind)[1], folder / f"{kind}.onnx")
    (folder / "broken.onnx").write_bytes(b"not a model")
    return folder
