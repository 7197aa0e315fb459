"""The two kinds of label a tensor's channel axis can carry besides ``Channels``, and the role
each weight layer ends up with."""

from __future__ import annotations

from enum import Enum


class Marker(Enum):
    """What a tensor carries when it carries no tracked channels.

    ``FIXED``: an activation whose channel order the fusion never changes (the graph input, a
    tensor whose channels were reduced away or could not be followed). ``CONST``: a value that
    does not depend on the input (weights, shapes); it stays in the backdoored model's order,
    which the fused model keeps.
    """

    FIXED = "fixed"
    CONST = "const"

    def __repr__(self) -> str:
        return self.name


FIXED = Marker.FIXED
CONST = Marker.CONST


class Role(str, Enum):
    """A weight layer's part in the fusion; the value is what reports print.

    A ``str`` Enum: ``roles[i] == "source"`` holds, and JSON writes ``"source"``.
    """

    SOURCE = "source"  # has neurons of its own, transported with its group's OT plan
    FOLLOWER = "follower"  # depthwise conv: no plan of its own, carries its input's plan
    PINNED = "pinned"  # its group takes the identity plan (see ``TieGroup.pin_reason``)

    __str__ = str.__str__
    __format__ = str.__format__


SOURCE, FOLLOWER, PINNED = Role.SOURCE, Role.FOLLOWER, Role.PINNED
