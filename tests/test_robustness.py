"""otbr_onnx/robustness.py on tiny torch models: BatchNorm recalibration and clean fine-tuning,
each on a copy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from otbr_onnx.robustness import batchnorm_layers, finetune, recalibrate


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4))
    bn = model[1]
    bn.running_mean.fill_(5.0)  # wrong statistics, as a masked removal could leave them
    bn.running_var.fill_(0.01)
    return model.eval()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _images(n: int = 120, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.3, 0.5, size=(n, 1, 4, 4)).astype(np.float32)


def test_recalibrate_sets_the_batch_statistics_of_the_images():
    model = _bn_model()
    before = _state(model)
    x = _images(150)
    # Three equal batches. torch's cumulative average (momentum None) weighs BATCHES equally, so
    # the mean is exact only when the batches are equal (500 images in batches of 50: the benchmark)
    copied = recalibrate(model, x, batch=50)
    assert _same(_state(model), before)  # the input is untouched
    with torch.no_grad():
        features = model[0](torch.from_numpy(x))
    bn = batchnorm_layers(copied)[0]
    torch.testing.assert_close(bn.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    # torch keeps the unbiased variance of each batch; averaged over batches it is close to the whole
    torch.testing.assert_close(bn.running_var, features.var(dim=(0, 2, 3)), rtol=0.05, atol=1e-4)
    assert not copied.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), copied.parameters()))  # weights kept


def test_recalibrate_on_one_batch_is_exact():
    model = _bn_model()
    x = _images(40)
    bn = batchnorm_layers(recalibrate(model, x, batch=40))[0]
    with torch.no_grad():
        features = model[0](torch.from_numpy(x))
    torch.testing.assert_close(bn.running_var, features.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)


def test_recalibrate_without_batchnorm_returns_an_equal_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    before = _state(model)
    copied = recalibrate(model, _images())
    assert copied is not model and batchnorm_layers(copied) == []
    assert _same(_state(copied), before) and _same(_state(model), before)


def test_finetune_lowers_the_loss_and_leaves_the_input_alone():
    model = _bn_model()
    before = _state(model)
    x = _images(200)
    y = np.random.default_rng(1).integers(0, 4, size=len(x))

    def loss(module: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(module.eval()(torch.from_numpy(x)), torch.from_numpy(y)))

    tuned = finetune(model, x, y, steps=60, batch=50, lr=1e-2)
    assert _same(_state(model), before)
    assert not tuned.training
    assert loss(tuned) < loss(model)
