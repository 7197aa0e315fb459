"""Small image classifiers for building backdoored test models.

Three families chosen because they stress different graph shapes in the exported ONNX:
- PreActResNet: residual Adds with identity and 1x1-projection shortcuts, and BatchNorm nodes
  that survive export (BN -> ReLU -> Conv cannot be folded into a preceding Conv).
- SmallVGG: a plain chain whose BatchNorms the exporter folds into the Convs.
- SmallMobileNetV2: inverted residuals with depthwise (grouped) convs.
- SmallViT: a transformer without BatchNorm: patch embedding, attention MatMuls, LayerNorm.
All take (N, in_channels, H, W) and end in global average pooling, so any input size works, and
use only ops that the legacy ONNX exporter maps to plain ONNX operators.
"""

from typing import Sequence

import torch
from torch import nn


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al., 2016): BN -> ReLU -> Conv, twice, plus a shortcut.

    The shortcut is the identity when shape is kept, else a 1x1 strided conv that reads the
    pre-activated input (as in the paper, so the projection sees normalised features).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet: 3x3 stem, one stage per width (stride 2 after the first), BN-ReLU, GAP, Linear."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError("widths and blocks need one entry per stage")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        channels = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for block in range(count):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*layers)
        # The last block's output is un-normalised (a residual sum): normalise before pooling.
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.stages(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallVGG(nn.Module):
    """VGG-style chain: per stage two Conv-BN-ReLU then 2x2 max-pool; GAP and a Linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [_conv_bn_relu(channels, width), _conv_bn_relu(width, width), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual if shape kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.use_residual = stride == 1 and in_channels == out_channels
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, hidden, kernel=1),
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            # No activation after the projection: MobileNetV2's "linear bottleneck".
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class SmallMobileNetV2(nn.Module):
    """MobileNetV2-style net: stem, inverted-residual stages (stride 2 after the first), 1x1 head conv, GAP, Linear."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 24, 32),
        blocks: Sequence[int] = (1, 2, 2),
        expand: int = 4,
        head_width: int = 128,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError("widths and blocks need one entry per stage")
        self.stem = _conv_bn_relu(in_channels, widths[0])
        layers: list[nn.Module] = []
        channels = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for block in range(count):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(InvertedResidual(channels, width, stride, expand))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.head = _conv_bn_relu(channels, head_width, kernel=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(out), 1))


class SelfAttention(nn.Module):
    """Multi-head self-attention written with Linear layers and MatMuls, so that the exported graph
    holds the attention MatMuls and the q/k/v heads a converter must keep aligned."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)) with a GELU."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class SmallViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al., 2021) for 28x28 inputs: 7x7 patches (16
    tokens), a learnt position embedding, ``depth`` pre-norm blocks and mean pooling (no BatchNorm)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dim: int = 48, heads: int = 4,
                 depth: int = 2, patch: int = 7, image: int = 28) -> None:
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.blocks(tokens)).mean(dim=1))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "preact_resnet": PreActResNet,
    "vgg": SmallVGG,
    "mobilenetv2": SmallMobileNetV2,
    "vit": SmallViT,
}


def build(name: str, in_channels: int = 1, num_classes: int = 10, **kwargs: object) -> nn.Module:
    """Instantiate an architecture by its registry name (what a benchmark config names)."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
