"""Channel-tie analysis: which weight layers' neurons must move together during OT fusion.

OT fusion transports the neurons (output channels) of each weight layer with a plan ``T``. The
fused model keeps the backdoored model's channel order, so the plan only matters where a
later layer reads those channels: its *pruned* weights must be re-expressed in the new order
(``Wp' = Wp . A`` on the input axis, ``A = T diag(1/q)``). That is only sound when every value on
that input axis came through ops that keep channel ``c`` at position ``c``.

The analysis walks the graph in topological order and labels every tensor's channel axis:

* ``Channels``: the axis is a concatenation of *segments*, each the output channels of one
  source layer (or a fixed, untransported block), possibly each repeated ``repeat`` times (a
  ``Flatten`` of ``[N, C, H, W]`` repeats every channel ``H*W`` times).
* ``FIXED``: an activation whose channel order is never changed (the graph input, or a tensor
  whose channels were reduced away).
* ``CONST``: a value that does not depend on the input (weights, shapes); it stays in the
  backdoored model's order, which the fused model keeps.

``TieGroup`` (``group.py``) teaches the idea on a three-layer example.

Where a tie cannot be honoured (channels flow into an op whose channel mapping is unknown,
such as attention reshapes, a ``Slice`` across a segment, a graph output, a grouped conv) the
sources involved are *pinned*: their group takes the identity plan, so the fused layer is
``lambda * Wp' + (1 - lambda) * Wb`` with no transport. A depthwise conv is a *follower*: it has
no plan of its own and carries its input's plan, since channel ``c`` out depends only on
channel ``c`` in. Pinning can only make the fused model closer to the backdoored one; it never
misaligns it.

A ``MatMul`` whose constant weight contracts an axis other than the tracked channels (an
MLP-Mixer's token mixing, ``W @ X`` over tokens) keeps channel ``c`` at ``c``: the channels flow
through it, and the layer itself is pinned, since its own neurons lie on an untracked axis.
ConvTranspose layers are sources like convs (their neurons are axis 1 of the weight). Shapes
come from ``otbr_onnx.shapes`` (ONNX shape inference, and one onnxruntime run where inference
gives up), normally computed once by ``load`` and passed in.

One concept per module:

* ``channels``: ``Channels``, what a channel axis holds, and how a reshape moves it;
* ``markers``: the ``FIXED`` / ``CONST`` labels and the ``SOURCE`` / ``FOLLOWER`` / ``PINNED`` roles;
* ``group``: ``TieGroup`` and the result, ``ChannelTies``;
* ``walk``: the state handlers read and update (shapes, pins, the disjoint set of ties);
* ``handlers``: ``{op_type: handler}``, how each op moves the channel axis;
* ``analysis``: ``analyse``, the walk over the graph and the weight layers' roles.
"""

from otbr_onnx.shapes import static_shapes
from otbr_onnx.ties.analysis import analyse
from otbr_onnx.ties.channels import Channels
from otbr_onnx.ties.group import ChannelTies, Plan, TieGroup
from otbr_onnx.ties.handlers import HANDLERS
from otbr_onnx.ties.markers import CONST, FIXED, FOLLOWER, PINNED, SOURCE, Marker, Role

__all__ = [
    "CONST", "FIXED", "FOLLOWER", "HANDLERS", "PINNED", "SOURCE", "ChannelTies", "Channels", "Marker", "Plan",
    "Role", "TieGroup", "analyse", "static_shapes",
]
