"""``Channels``: what a tensor's channel axis holds, and how a reshape moves it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Channels:
    """The channel axis of a tensor, as segments of source-layer neurons.

    ``segments`` concatenate, in order, the output channels of one source layer each
    (``(position, length)``) or a fixed, untransported block (``(None, length)``); each channel
    is repeated ``repeat`` times in a row (a ``Flatten`` of ``[N, C, H, W]`` repeats every
    channel ``H*W`` times). The width of the axis is ``sum(lengths) * repeat``.
    """

    axis: int  # negative index, counted from the last axis
    segments: tuple[tuple[int | None, int], ...]  # (weight-layer position or None = fixed, length)
    repeat: int = 1

    @property
    def width(self) -> int:
        return sum(length for _, length in self.segments)

    def sources(self) -> list[int]:
        return [src for src, _ in self.segments if src is not None]

    def moved(self, axis: int, repeat: int | None = None) -> "Channels":
        return Channels(axis, self.segments, self.repeat if repeat is None else repeat)


def track_reshape(value: Channels, in_dims: list[int], out_dims: list[int]) -> Channels | None:
    """Where the channel axis lands after a reshape, or None if it is split or interleaved.

    The channel axis survives when the product of the dims before it is unchanged and the
    output axis there is either the channel axis itself or the channel axis merged with the
    axes right after it (a Flatten into a Linear head: each channel becomes ``repeat``
    consecutive features).
    """
    channel = len(in_dims) + value.axis
    before = math.prod(in_dims[:channel])
    size = in_dims[channel]
    for k in range(len(out_dims)):
        if math.prod(out_dims[:k]) != before:
            continue
        merged = size
        for j in range(channel + 1, len(in_dims) + 1):
            if out_dims[k] == merged and math.prod(out_dims[k + 1:]) == math.prod(in_dims[j:]):
                return Channels(k - len(out_dims), value.segments, value.repeat * merged // size)
            if j < len(in_dims):
                merged *= in_dims[j]
    return None
