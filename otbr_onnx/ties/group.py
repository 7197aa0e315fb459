"""``TieGroup``: weight layers whose neurons must move together, and ``ChannelTies``, the
analysis result that holds every layer's role and every group."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from otbr_onnx.layers import WeightLayer
from otbr_onnx.ties.channels import Channels
from otbr_onnx.ties.markers import FOLLOWER, PINNED, Role


class Plan(str, Enum):
    """The plan a group's neurons are transported with: an OT plan shared by all members, or
    the identity (pinned: no transport, ``Wf = lambda * Wp' + (1 - lambda) * Wb``)."""

    OT = "ot"
    IDENTITY = "identity"

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(frozen=True)
class TieGroup:
    """Source layers whose output channels are tied: they must share ONE transport plan.

    A three-layer example. ``a = Conv1(x)``, ``b = Conv2(relu(a))``, ``y = Conv3(a + b)``::

        x -> Conv1 -> a --------------+
                      |                Add -> Conv3 -> y
                      +-> Relu -> Conv2 -> b

    ``Add`` ties Conv1 and Conv2: channel ``c`` of ``a + b`` is the sum of channel ``c`` of
    both, so both must receive the SAME plan ``T`` or Conv3 would read misaligned sums. They form
    one group, ``TieGroup(id=0, members=(0, 1), role=SOURCE, plan=Plan.OT)``; Conv3 is a group
    of its own. Conv2 reads Conv1's channels (through ``Relu``, which keeps channels in place),
    so Conv2's input axis is aligned with the group's plan; Conv3's input is aligned with it
    too. Had ``a + b`` also been a graph output, the group would be pinned:
    ``role=PINNED, plan=Plan.IDENTITY, pin_reason="reaches graph output 'y'"``.

    Depthwise convs (followers) belong to no group: they carry their input's plan.
    """

    id: int  # the smallest member position: stable across runs, shown in reports
    members: tuple[int, ...]  # weight-layer positions, ascending
    role: Role  # SOURCE or PINNED; every member has it
    pin_reason: str | None = None  # why the group is pinned: the first pinned member's own reason

    @property
    def plan(self) -> Plan:
        return Plan.IDENTITY if self.role == PINNED else Plan.OT

    @property
    def tied(self) -> bool:
        """More than one layer: a tie the graph imposes."""
        return len(self.members) > 1


@dataclass
class ChannelTies:
    """The result: one role per weight layer, groups that share a plan, input channel maps.

    Indexed by weight-layer position (``layers[i]``): ``roles[i]``, ``groups[i]`` (the group id,
    -1 for followers), ``inputs[i]`` (what the layer's input-channel axis carries, None where
    it is fixed), ``pin_reasons[i]`` (pinned layers only), ``heads`` (layers whose channels reach
    a graph output). ``tie_groups`` holds the same groups as objects.
    """

    layers: list[WeightLayer]
    roles: list[Role]
    groups: list[int]  # group id per layer (= smallest member position); -1 for followers
    inputs: list[Channels | None]  # what each layer's input-channel axis carries (None: fixed)
    pin_reasons: dict[int, str] = field(default_factory=dict)
    heads: set[int] = field(default_factory=set)  # layers whose channels reach a graph output
    tie_groups: dict[int, TieGroup] = field(default_factory=dict)  # group id -> group

    def __post_init__(self) -> None:
        if not self.tie_groups:
            self.tie_groups = build_groups(self.roles, self.groups, self.pin_reasons)

    def members(self, group: int) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g == group]

    def group_of(self, i: int) -> TieGroup | None:
        """Layer ``i``'s group, or None for a follower."""
        return self.tie_groups.get(self.groups[i])

    def tied_groups(self) -> dict[int, list[int]]:
        """Groups of more than one layer: the channel ties the graph imposes."""
        return {g: list(group.members) for g, group in self.tie_groups.items() if group.tied}


def build_groups(roles: list[Role], groups: list[int], pin_reasons: dict[int, str]) -> dict[int, TieGroup]:
    """``TieGroup`` objects from per-layer roles and group ids, ordered by first member.

    A pinned group's reason is the first one recorded (``pin_reasons`` keeps the order in which
    the walk pinned layers; the members pinned only for being tied come after it).
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g >= 0 and roles[i] != FOLLOWER:
            members.setdefault(g, []).append(i)
    first_reason: dict[int, str] = {}
    for i, reason in pin_reasons.items():
        if groups[i] >= 0:
            first_reason.setdefault(groups[i], reason)
    return {g: TieGroup(g, tuple(ids), roles[ids[0]], first_reason.get(g) if roles[ids[0]] == PINNED else None)
            for g, ids in members.items()}
