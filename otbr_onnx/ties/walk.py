"""``Walk``: the state of the channel-tie walk that op handlers read and update.

It knows every value's static shape, which source layers are pinned and why, and which are
tied (a disjoint-set forest over weight-layer positions).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.cluster.hierarchy import DisjointSet

from otbr_onnx.shapes import Shapes
from otbr_onnx.ties.channels import Channels


class Walk:
    def __init__(self, graph: onnx.GraphProto, shapes: Shapes, num_layers: int) -> None:
        self.graph = graph
        self.shapes = shapes
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes: dict[str, onnx.TensorProto] = {}  # Constant outputs, decoded on demand
        self.pins: dict[int, str] = {}  # layer position -> why it is pinned, in the order found
        self.ties = DisjointSet(range(num_layers))

    # -- shapes ----------------------------------------------------------------------------
    def rank(self, name: str) -> int | None:
        dims = self.shapes.get(name)
        return None if dims is None else len(dims)

    def dims(self, name: str) -> list[int] | None:
        """The dims of ``name`` if every one is known, else None."""
        dims = self.shapes.get(name)
        return None if dims is None or any(d <= 0 for d in dims) else dims

    # -- ties and pins ---------------------------------------------------------------------
    def pin(self, value: object, reason: str) -> None:
        """Pin every source layer ``value``'s channels come from (nothing for a marker)."""
        if isinstance(value, Channels):
            for src in value.sources():
                self.pins.setdefault(src, reason)

    def tie(self, a: int, b: int) -> None:
        self.ties.merge(a, b)

    # -- constants -------------------------------------------------------------------------
    def record_constant(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            self.constant_nodes[node.output[0]] = node.attribute[0].t

    def const_array(self, name: str) -> np.ndarray | None:
        """The value of an initializer or ``Constant`` output (decoded only when asked)."""
        tensor = self.initializers.get(name, self.constant_nodes.get(name))
        if tensor is None:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - an undecodable constant is one we cannot read
            return None
