"""A binary classifier with one output column, seen as two class scores.

Sigmoid classifiers (document orientation, NSFW, defect detectors) answer with one number per
image: a logit ``z`` (class 1 when ``z > 0``) or, when the graph ends in ``Sigmoid``, the
probability ``p`` of class 1. Every stage of the pipeline reads class scores of shape
(N, classes), so the working copy gets two nodes after that column:

* a logit: ``[0, z]``. Softmax of it is ``[1 - sigmoid(z), sigmoid(z)]``, the model's own
  probabilities, and its margin ``z`` is the model's own decision value;
* a probability: ``[1 - p, p]``, read as probabilities (as for a Softmax output).

The same map, applied in NumPy to what onnxruntime returns for the model as given
(``two_class_scores``), lets parity compare the written graph with the fused module column for
column. Only the working copy gets the nodes; write-back edits the original graph, which keeps
its single output.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

Kind = Literal["logit", "probability"]

SUFFIX = "/otbr_single_score"  # the renamed column inside the working copy


def single_score_kind(graph: onnx.GraphProto, output_name: str) -> Kind:
    """``"probability"`` when ``output_name`` is made by a ``Sigmoid``, else ``"logit"``."""
    for node in graph.node:
        if output_name in node.output:
            return "probability" if node.op_type == "Sigmoid" else "logit"
    return "logit"


def two_class_scores(values: np.ndarray, kind: Kind) -> np.ndarray:
    """(N, 1) scores as (N, 2): ``[0, z]`` for a logit, ``[1 - p, p]`` for a probability.

    The arithmetic is float32 as in the working copy's nodes, so both sides of a parity check
    round the same way.
    """
    column = np.asarray(values)
    first = np.zeros_like(column) if kind == "logit" else (np.ones_like(column) - column)
    return np.concatenate([first, column], axis=1)


def as_class_scores(values: np.ndarray, graph: onnx.GraphProto, output_name: str) -> np.ndarray:
    """(N, classes) scores as they are; a single column (N, 1) widened by ``two_class_scores``
    with the kind its producer in ``graph`` gives (for callers holding only the model)."""
    if values.shape[1] != 1:
        return values
    return two_class_scores(values, single_score_kind(graph, output_name))


def two_class_graph(proto: onnx.ModelProto, output_name: str, kind: Kind) -> onnx.ModelProto:
    """A copy of ``proto`` whose output ``output_name`` is (N, 2) as ``two_class_scores`` makes it.

    The producer's output is renamed (and every reader follows it); two new nodes rebuild
    ``output_name`` from it. Node names, weights and every other output are untouched.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    column = output_name + SUFFIX
    for node in graph.node:
        node.output[:] = [column if name == output_name else name for name in node.output]
        node.input[:] = [column if name == output_name else name for name in node.input]
    first = output_name + "/otbr_other_class"
    if kind == "logit":
        nodes = [helper.make_node("Sub", [column, column], [first], name=first)]  # zeros of z's shape and dtype
    else:
        one = output_name + "/otbr_one"
        nodes = [helper.make_node("Constant", [], [one], name=one,
                                  value=helper.make_tensor(one, _elem_type(graph, output_name), [], [1.0])),
                 helper.make_node("Sub", [one, column], [first], name=first)]
    nodes.append(helper.make_node("Concat", [first, column], [output_name], name=output_name + "/otbr_two_class",
                                  axis=1))
    graph.node.extend(nodes)
    for value in graph.output:
        if value.name == output_name:
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 2:
                dims[1].Clear()
                dims[1].dim_value = 2
    return copy


def _elem_type(graph: onnx.GraphProto, name: str) -> int:
    for value in graph.output:
        if value.name == name and value.type.tensor_type.elem_type:
            return value.type.tensor_type.elem_type
    return TensorProto.FLOAT
