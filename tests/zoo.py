"""A zoo of tiny torch classifiers covering the architecture families real ONNX files come from.

Families: PreAct-ResNet (BN nodes survive export), a post-activation bottleneck ResNet with a
projection shortcut (BN folds into the convs), VGG-BN (Flatten into a two-layer Linear head),
MobileNetV2 (depthwise convs, inverted residuals, ReLU6), a DenseNet-style concat net, a
SqueezeNet-style fire net (concat of 1x1 and 3x3 expands, conv classifier), a tiny ViT (patch
conv, Linear q/k/v attention, LayerNorm, GELU MLP; cls token or mean pooling), a ResNeXt block
(grouped conv), a 1-D model (Conv1d, ``W @ X`` MatMul, Gemm with transB=0), a ConvTranspose
model, an NHWC-input model, an MLP-Mixer, and a CNN+GRU that ``clean`` must refuse.

Every model is a few channels wide, takes 8 x 8 .. 16 x 16 images (or length-16 signals) and
has 3-4 classes, so a full export + clean takes well under a second. BatchNorm layers get
random statistics (as a trained model has), so the legacy exporter's BN folding really changes
conv weights.

Each family also knows a *function-preserving channel permutation*: reordering some hidden
channels of the torch model (a writer's output channels, every reader's input channels and any
per-channel parameter in between) gives another model with exactly the same function. Cleaning
both must give the same cleaned function; a channel tie the analysis misses shows up as a
difference. ``build(..., permuted="tracked")`` leaves out the channels of layers the analysis
pins by design, for tests that expect every transported layer back exactly.

``export`` writes ONNX with either of torch's exporters (legacy TorchScript or dynamo) at a
requested opset, and records what the exporter actually wrote (dynamo writes opset 18 when it
cannot convert down).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from tests import builders
from tests.builders import TinyPreActResNet, randomise_bn

# --------------------------------------------------------------------------------------------
# permutation helpers: each edits one tensor axis in place
# --------------------------------------------------------------------------------------------


def _take(tensor: torch.Tensor, perm: torch.Tensor, dim: int) -> None:
    tensor.copy_(tensor.index_select(dim, perm))


def permute_out(layer: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the neurons of a Conv/Linear (dim 0 of weight and bias)."""
    _take(layer.weight, perm, 0)
    if layer.bias is not None:
        _take(layer.bias, perm, 0)


def permute_in(layer: nn.Module, perm: torch.Tensor, start: int = 0, repeat: int = 1) -> None:
    """Reorder input channels ``start .. start + len(perm)`` of a Conv/Linear.

    With ``repeat > 1`` each channel spans ``repeat`` consecutive inputs (a flattened feature map
    read by a Linear).
    """
    width = len(perm) * repeat
    index = torch.arange(layer.weight.shape[1])
    block = (perm[:, None] * repeat + torch.arange(repeat)[None, :]).reshape(-1) + start
    index[start:start + width] = block
    _take(layer.weight, index, 1)


def permute_norm(norm: nn.Module, perm: torch.Tensor, start: int = 0) -> None:
    """Reorder channels ``start .. start + len(perm)`` of a BatchNorm or LayerNorm."""
    size = (norm.num_features if isinstance(norm, nn.modules.batchnorm._BatchNorm)  # noqa: SLF001
            else norm.normalized_shape[0])
    index = torch.arange(size)
    index[start:start + len(perm)] = perm + start
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(norm, name, None)
        if tensor is not None:
            _take(tensor, index, 0)


def permute_depthwise(conv: nn.Conv2d, perm: torch.Tensor) -> None:
    """A depthwise conv's channel c reads channel c: its neurons move with its input."""
    permute_out(conv, perm)


def _perm(width: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation that moves every channel (a random one could leave some in place)."""
    perm = torch.randperm(width, generator=gen)
    return torch.roll(perm, 1) if torch.any(perm == torch.arange(width)) else perm


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)


def _gap(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


# --------------------------------------------------------------------------------------------
# PreAct-ResNet: BN before conv, so BN nodes survive export; identity and projection blocks
# --------------------------------------------------------------------------------------------


class PreActResNet(TinyPreActResNet):
    """``builders.TinyPreActResNet`` on 3 channels (the tests' one PreAct-ResNet), with its permutation."""

    def __init__(self, width: int = 6, classes: int = 4) -> None:
        super().__init__(channels=3, width=width, classes=classes)

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """The stage-1 residual stream (stem + b1.c2, read by both blocks) and b1's inner channels."""
        stream = _perm(self.stem.out_channels, gen)
        for writer in (self.stem, self.b1.c2):
            permute_out(writer, stream)
        for bn in (self.b1.bn1, self.b2.bn1):
            permute_norm(bn, stream)
        for reader in (self.b1.c1, self.b2.c1, self.b2.sc):
            permute_in(reader, stream)
        inner = _perm(self.b1.c1.out_channels, gen)
        permute_out(self.b1.c1, inner)
        permute_norm(self.b1.bn2, inner)
        permute_in(self.b1.c2, inner)


# --------------------------------------------------------------------------------------------
# ResNet with bottlenecks, post-activation: every BN folds into its conv on export
# --------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.bn1 = _conv_bn(cin, mid, 1)
        self.c2, self.bn2 = _conv_bn(mid, mid, 3, stride)
        self.c3, self.bn3 = _conv_bn(mid, cout, 1)
        self.sc = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.c1(x)))
        out = torch.relu(self.bn2(self.c2(out)))
        out = self.bn3(self.c3(out))
        return torch.relu(out + (self.sc(x) if self.sc is not None else x))


class BottleneckResNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.c0, self.bn0 = _conv_bn(3, 8, 3)
        self.b1 = Bottleneck(8, 4, 12, 2)  # projection shortcut
        self.b2 = Bottleneck(12, 4, 12, 1)  # identity shortcut
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_gap(self.b2(self.b1(torch.relu(self.bn0(self.c0(x)))))))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """The stage-2 stream (b1.c3, b1.sc, b2.c3 write it; b2.c1 and fc read it) and b1's middle."""
        stream = _perm(12, gen)
        for conv, bn in ((self.b1.c3, self.b1.bn3), (self.b1.sc[0], self.b1.sc[1]), (self.b2.c3, self.b2.bn3)):
            permute_out(conv, stream)
            permute_norm(bn, stream)
        permute_in(self.b2.c1, stream)
        permute_in(self.fc, stream)
        mid = _perm(4, gen)
        permute_out(self.b1.c2, mid)
        permute_norm(self.b1.bn2, mid)
        permute_in(self.b1.c3, mid)


# --------------------------------------------------------------------------------------------
# VGG-BN: plain chain, Flatten of a 2x2 map into a two-layer Linear classifier
# --------------------------------------------------------------------------------------------


class VggBN(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1),
                                    nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c.out_channels) for c in self.convs])
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 16), nn.Linear(16, classes)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = torch.relu(bn(conv(x)))
            if i % 2 == 1:
                x = nn.functional.max_pool2d(x, 2)
        return self.fc2(self.drop(torch.relu(self.fc1(torch.flatten(x, 1)))))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """Conv 2's channels, the last conv's channels (read through Flatten) and fc1's neurons."""
        second = _perm(6, gen)
        permute_out(self.convs[1], second)
        permute_norm(self.bns[1], second)
        permute_in(self.convs[2], second)
        last = _perm(8, gen)
        permute_out(self.convs[3], last)
        permute_norm(self.bns[3], last)
        permute_in(self.fc1, last, repeat=4)
        hidden = _perm(16, gen)
        permute_out(self.fc1, hidden)
        permute_in(self.fc2, hidden)


# --------------------------------------------------------------------------------------------
# MobileNetV2: inverted residuals, depthwise convs, ReLU6
# --------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand, self.bn1 = _conv_bn(cin, hidden, 1)
        self.dw, self.bn2 = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project, self.bn3 = _conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu6(self.bn1(self.expand(x)))
        out = nn.functional.relu6(self.bn2(self.dw(out)))
        out = self.bn3(self.project(out))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem, self.bn0 = _conv_bn(3, 6, 3, 2)
        self.ir1 = InvertedResidual(6, 6, 2, 1)
        self.ir2 = InvertedResidual(6, 8, 2, 2)
        self.last, self.bn_last = _conv_bn(8, 12, 1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self.bn0(self.stem(x)))
        x = self.ir2(self.ir1(x))
        return self.fc(_gap(nn.functional.relu6(self.bn_last(self.last(x)))))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """The residual stream around ir1 (stem + ir1.project) and ir1's expanded channels,
        which run through the depthwise conv."""
        stream = _perm(6, gen)
        for conv, bn in ((self.stem, self.bn0), (self.ir1.project, self.ir1.bn3)):
            permute_out(conv, stream)
            permute_norm(bn, stream)
        permute_in(self.ir1.expand, stream)
        permute_in(self.ir2.expand, stream)
        hidden = _perm(12, gen)
        permute_out(self.ir1.expand, hidden)
        permute_norm(self.ir1.bn1, hidden)
        permute_depthwise(self.ir1.dw, hidden)
        permute_norm(self.ir1.bn2, hidden)
        permute_in(self.ir1.project, hidden)


# --------------------------------------------------------------------------------------------
# DenseNet-style: every layer reads the concatenation of all earlier ones (pre-activation BN)
# --------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.d1, self.d2 = DenseLayer(6, 4), DenseLayer(10, 4)
        self.bn_t, self.trans = nn.BatchNorm2d(14), nn.Conv2d(14, 8, 1, bias=False)
        self.d3 = DenseLayer(8, 4)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.d2(self.d1(self.stem(x)))
        x = nn.functional.avg_pool2d(self.trans(torch.relu(self.bn_t(x))), 2)
        return self.fc(_gap(torch.relu(self.bn(self.d3(x)))))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """The stem's channels (segment 0 of every concat) and d1's growth channels (segment 1)."""
        stem = _perm(6, gen)
        permute_out(self.stem, stem)
        for bn in (self.d1.bn, self.d2.bn, self.bn_t):
            permute_norm(bn, stem)
        for reader in (self.d1.conv, self.d2.conv, self.trans):
            permute_in(reader, stem)
        grown = _perm(4, gen)
        permute_out(self.d1.conv, grown)
        for bn in (self.d2.bn, self.bn_t):
            permute_norm(bn, grown, start=6)
        for reader in (self.d2.conv, self.trans):
            permute_in(reader, grown, start=6)


# --------------------------------------------------------------------------------------------
# SqueezeNet-style: fire modules concat a 1x1 and a 3x3 expand; a conv is the classifier
# --------------------------------------------------------------------------------------------


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1, self.e3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.f1, self.f2 = Fire(8, 4, 5), Fire(10, 4, 6)
        self.head = nn.Conv2d(12, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.stem(x)), 2, ceil_mode=True)
        x = self.f2(self.f1(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.head(x)), 1), 1)

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """f1's squeeze channels and both of f1's expand segments, read by f2.squeeze."""
        squeeze = _perm(4, gen)
        permute_out(self.f1.squeeze, squeeze)
        permute_in(self.f1.e1, squeeze)
        permute_in(self.f1.e3, squeeze)
        for start, conv in ((0, self.f1.e1), (5, self.f1.e3)):
            perm = _perm(5, gen)
            permute_out(conv, perm)
            permute_in(self.f2.squeeze, perm, start=start)


# --------------------------------------------------------------------------------------------
# tiny ViT: patch conv, cls token, Linear q/k/v attention, LayerNorm, GELU MLP
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 3, cls_token: bool = True) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.use_cls = cls_token
        tokens = 4 + int(cls_token)  # an 8x8 image makes 2x2 patches
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():  # LayerNorm affine away from (1, 0), as after training
            for norm in (self.norm1, self.norm2, self.norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.use_cls:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        x = self.norm(x)
        return self.head(x[:, 0] if self.use_cls else x.mean(dim=1))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """The MLP's hidden neurons, and the embedding (residual stream) dimension everywhere:
        patch conv, cls token, position embedding, every LayerNorm, q/k/v/fc1/head inputs and
        proj/fc2 outputs."""
        hidden = _perm(self.fc1.out_features, gen)
        permute_out(self.fc1, hidden)
        permute_in(self.fc2, hidden)
        embed = _perm(self.patch.out_channels, gen)
        for writer in (self.patch, self.attn.proj, self.fc2):
            permute_out(writer, embed)
        for token in (self.cls, self.pos):
            _take(token, embed, 2)
        for norm in (self.norm1, self.norm2, self.norm):
            permute_norm(norm, embed)
        for reader in (self.attn.q, self.attn.k, self.attn.v, self.fc1, self.head):
            permute_in(reader, embed)
        if pinned_too:  # inside each head: q and k alike (scores keep), v with proj's inputs
            dim, heads = self.patch.out_channels, self.attn.heads
            qk = _within_groups(dim, heads, gen)
            permute_out(self.attn.q, qk)
            permute_out(self.attn.k, qk)
            values = _within_groups(dim, heads, gen)
            permute_out(self.attn.v, values)
            permute_in(self.attn.proj, values)


# --------------------------------------------------------------------------------------------
# ResNeXt-style: a grouped 3x3 conv inside a residual block
# --------------------------------------------------------------------------------------------


class ResNeXt(nn.Module):
    def __init__(self, classes: int = 4, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.stem, self.bn0 = _conv_bn(3, 8, 3)
        self.c1, self.bn1 = _conv_bn(8, 8, 1)
        self.g, self.bn2 = _conv_bn(8, 8, 3, groups=groups)
        self.c3, self.bn3 = _conv_bn(8, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        out = torch.relu(self.bn1(self.c1(x)))
        out = self.bn3(self.c3(torch.relu(self.bn2(self.g(out)))))
        return self.fc(_gap(torch.relu(x + out)))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """The residual stream (stem + c3); with ``pinned_too`` also the grouped conv's channels,
        permuted within each group so the grouping still holds."""
        stream = _perm(8, gen)
        for conv, bn in ((self.stem, self.bn0), (self.c3, self.bn3)):
            permute_out(conv, stream)
            permute_norm(bn, stream)
        permute_in(self.c1, stream)
        permute_in(self.fc, stream)
        if not pinned_too:
            return
        inner = _within_groups(8, self.groups, gen)
        permute_out(self.c1, inner)
        permute_norm(self.bn1, inner)
        permute_grouped_in(self.g, inner)
        outer = _within_groups(8, self.groups, gen)
        permute_out(self.g, outer)
        permute_norm(self.bn2, outer)
        permute_in(self.c3, outer)


def _within_groups(width: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation that keeps every channel inside its group."""
    size = width // groups
    return torch.cat([_perm(size, gen) + k * size for k in range(groups)])


def permute_grouped_in(conv: nn.Conv2d, perm: torch.Tensor) -> None:
    """Reorder a grouped conv's input channels by a within-group ``perm``.

    Weight axis 1 counts channels inside one group, so each group's rows take their own
    group-local part of the permutation.
    """
    size = conv.in_channels // conv.groups
    rows = conv.out_channels // conv.groups
    for k in range(conv.groups):
        local = perm[k * size:(k + 1) * size] - k * size
        block = conv.weight[k * rows:(k + 1) * rows]
        block.copy_(block.index_select(1, local))


# --------------------------------------------------------------------------------------------
# 1-D signal model: Conv1d, a W @ X MatMul over channels, a Gemm with transB=0
# --------------------------------------------------------------------------------------------


class Conv1dMatMul(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6)
        self.w = nn.Parameter(torch.randn(8, 6) * 0.4)  # W @ X: mixes channels, neurons = rows
        self.b = nn.Parameter(torch.randn(8, 1) * 0.1)
        self.c2 = nn.Conv1d(8, 8, 1)
        self.fc_w = nn.Parameter(torch.randn(8, 10) * 0.3)  # addmm: Gemm with transB=0
        self.fc_b = nn.Parameter(torch.randn(10) * 0.1)
        self.head = nn.Linear(10, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(torch.matmul(self.w, x) + self.b)
        x = torch.relu(self.c2(x)).mean(dim=2)
        return self.head(torch.relu(torch.addmm(self.fc_b, x, self.fc_w)))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        first = _perm(6, gen)
        permute_out(self.c1, first)
        permute_norm(self.bn1, first)
        _take(self.w, first, 1)
        mixed = _perm(8, gen)
        _take(self.w, mixed, 0)
        _take(self.b, mixed, 0)
        permute_in(self.c2, mixed)
        second = _perm(8, gen)
        permute_out(self.c2, second)
        _take(self.fc_w, second, 0)
        hidden = _perm(10, gen)
        _take(self.fc_w, hidden, 1)
        _take(self.fc_b, hidden, 0)
        permute_in(self.head, hidden)


# --------------------------------------------------------------------------------------------
# ConvTranspose: a down-up path before the classifier (neurons are axis 1 of its weight)
# --------------------------------------------------------------------------------------------


class UpConv(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.down, self.bn1 = _conv_bn(3, 6, 3, 2)
        self.up, self.bn2 = nn.ConvTranspose2d(6, 4, 2, stride=2), nn.BatchNorm2d(4)
        self.c, self.fc = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.down(x)))
        x = torch.relu(self.bn2(self.up(x)))
        return self.fc(_gap(torch.relu(self.c(x))))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        down = _perm(6, gen)
        permute_out(self.down, down)
        permute_norm(self.bn1, down)
        _take(self.up.weight, down, 0)  # ConvTranspose weight [C_in, C_out, k, k]
        up = _perm(4, gen)
        _take(self.up.weight, up, 1)
        _take(self.up.bias, up, 0)
        permute_norm(self.bn2, up)
        permute_in(self.c, up)


# --------------------------------------------------------------------------------------------
# NHWC input: the graph starts with a Transpose of the image
# --------------------------------------------------------------------------------------------


class ChannelsLast(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c1, self.bn1 = _conv_bn(3, 6, 3)
        self.c2, self.bn2 = _conv_bn(6, 8, 3, 2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = torch.relu(self.bn2(self.c2(torch.relu(self.bn1(self.c1(x))))))
        return self.fc(_gap(x))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        first = _perm(6, gen)
        permute_out(self.c1, first)
        permute_norm(self.bn1, first)
        permute_in(self.c2, first)
        second = _perm(8, gen)
        permute_out(self.c2, second)
        permute_norm(self.bn2, second)
        permute_in(self.fc, second)


# --------------------------------------------------------------------------------------------
# MLP-Mixer: token mixing as W @ X over the token axis, channel mixing as X @ W
# --------------------------------------------------------------------------------------------


class Mixer(nn.Module):
    def __init__(self, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)  # 8x8 image: 4 tokens
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.t1, self.t1_b = nn.Parameter(torch.randn(6, 4) * 0.4), nn.Parameter(torch.randn(6, 1) * 0.1)
        self.t2, self.t2_b = nn.Parameter(torch.randn(4, 6) * 0.4), nn.Parameter(torch.randn(4, 1) * 0.1)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # [N, tokens, dim]
        mixed = nn.functional.gelu(torch.matmul(self.t1, self.norm1(x)) + self.t1_b)
        x = x + torch.matmul(self.t2, mixed) + self.t2_b
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x).mean(dim=1))

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        """The embedding (residual stream) everywhere, the channel MLP's hidden neurons and, with
        ``pinned_too``, the token MLP's hidden tokens."""
        embed = _perm(self.patch.out_channels, gen)
        for writer in (self.patch, self.fc2):
            permute_out(writer, embed)
        for norm in (self.norm1, self.norm2, self.norm):
            permute_norm(norm, embed)
        for reader in (self.fc1, self.head):
            permute_in(reader, embed)
        hidden = _perm(self.fc1.out_features, gen)
        permute_out(self.fc1, hidden)
        permute_in(self.fc2, hidden)
        if pinned_too:
            tokens = _perm(6, gen)
            _take(self.t1, tokens, 0)
            _take(self.t1_b, tokens, 0)
            _take(self.t2, tokens, 1)


# --------------------------------------------------------------------------------------------
# CNN + GRU over the image columns: onnx2torch has no GRU converter, so clean must refuse
# --------------------------------------------------------------------------------------------


class ConvGRU(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.gru = nn.GRU(4 * 8, 6, batch_first=True)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = torch.relu(self.c(x)).permute(0, 3, 1, 2).flatten(2)  # [N, W, C*H]
        out, _ = self.gru(columns)
        return self.fc(out[:, -1])

    def permute(self, gen: torch.Generator, pinned_too: bool = True) -> None:
        raise NotImplementedError("refused family: there is no cleaned function to compare")


# --------------------------------------------------------------------------------------------
# the zoo and its exporter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why ``clean`` must refuse a family, and the message it must give (a regex)."""

    reason: str
    message: str


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]  # (1, C, H, W), (1, C, L) or (1, H, W, C)
    pinned_part: bool = False  # its permutation also moves channels the analysis pins by design
    refusal: Refusal | None = None


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("preact_resnet", PreActResNet, (1, 3, 8, 8)),
    Family("bottleneck_resnet", BottleneckResNet, (1, 3, 8, 8)),
    Family("vgg_bn", VggBN, (1, 3, 8, 8)),
    Family("mobilenet_v2", MobileNetV2, (1, 3, 16, 16)),
    Family("densenet", DenseNet, (1, 3, 8, 8)),
    Family("squeezenet", SqueezeNet, (1, 3, 16, 16)),
    Family("vit", TinyViT, (1, 3, 8, 8), pinned_part=True),
    Family("vit_meanpool", lambda: TinyViT(cls_token=False), (1, 3, 8, 8), pinned_part=True),
    Family("resnext", ResNeXt, (1, 3, 8, 8), pinned_part=True),
    Family("conv1d_matmul", Conv1dMatMul, (1, 3, 16)),
    Family("upconv", UpConv, (1, 3, 8, 8)),
    Family("nhwc", ChannelsLast, (1, 8, 8, 3)),
    Family("mixer", Mixer, (1, 3, 8, 8), pinned_part=True),
    Family("conv_gru", ConvGRU, (1, 3, 8, 8), refusal=Refusal(
        "onnx2torch 1.5.15 has no GRU converter (method.md, Pitfalls)",
        r"^op GRU \(opset \d+\) at node '[^']+' has no PyTorch converter$",
    )),
)}

EXPORTERS = ("legacy", "dynamo")
OPSETS = (13, 17, 18)


PERMUTATIONS = ("all", "tracked")


def build(family: str, seed: int = 0, permuted: str | None = None) -> nn.Module:
    """A fresh model of ``family`` with seeded weights and BN statistics, in eval mode.

    ``permuted`` applies the family's function-preserving channel permutation: "all" of it, or
    only the "tracked" part, which leaves alone the channels of layers the tie analysis pins
    by design (grouped convs, attention heads, token mixing): a pinned layer keeps its neuron
    order, so a reordered copy can only be matched where the reordering is transportable.
    """
    torch.manual_seed(seed)
    model = randomise_bn(FAMILIES[family].make(), seed).eval()
    if permuted is not None:
        if permuted not in PERMUTATIONS:
            raise ValueError(f"permuted must be one of {PERMUTATIONS}, got {permuted!r}")
        if FAMILIES[family].refusal is not None:
            raise ValueError(f"{family} is a refused family: it has no permutation")
        with torch.no_grad():
            model.permute(torch.Generator().manual_seed(seed + 100), pinned_too=permuted == "all")
    return model


@dataclass(frozen=True)
class Exported:
    model: onnx.ModelProto
    exporter: str
    requested_opset: int
    written_opset: int  # what the exporter actually declared (dynamo may pick its own)


class ExportError(Exception):
    """The torch exporter itself failed: a limit outside otbr-onnx."""


def export(model: nn.Module, shape: tuple[int, ...], exporter: str, opset: int) -> Exported:
    """ONNX of ``model`` (eval mode) with a dynamic batch, input 'input', output 'logits'."""
    # batch 2: torch.export specialises a size-1 dimension, which fights the dynamic batch
    example = torch.rand((2,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), _quiet_loggers():
            warnings.simplefilter("ignore")
            proto = builders.export(model, shape, opset, exporter=exporter, example=example)
    except Exception as error:  # noqa: BLE001 - any exporter failure is reported as such
        raise ExportError(f"{exporter} exporter, opset {opset}: {type(error).__name__}: {error}") from error
    written = next(e.version for e in proto.opset_import if e.domain in ("", "ai.onnx"))
    return Exported(proto, exporter, opset, written)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """The dynamo exporter logs a traceback each time its opset down-conversion gives up (it
    then keeps opset 18, which ``Exported.written_opset`` records): expected, not news."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "torch._dynamo", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
