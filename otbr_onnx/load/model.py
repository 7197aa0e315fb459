"""Stage 1: read an untrusted ONNX file, validate it and find the image input and logits output.

Nothing here trusts the file: external-data paths are resolved against the model's own folder
and refused when they leave it, sizes are capped before anything large is allocated, and every
failure becomes an ``OtbrError`` with a one-line message.

What a model must pass, in order (exit 2 = not a valid model, 3 = valid but refused):
names are UTF-8 (2) and free of quotes, backslashes and control characters, which would reach
generated PyTorch code (3); default-domain ops at a known opset (3); the ONNX checker and strict
type/shape inference (2); every constant decodes to its declared shape (2) and holds no NaN,
nor +-Inf outside bound/mask uses (3); one float image input of a capped size (3); logits
computed from that input (3); and one onnxruntime run on a random image (3), whose logits must
be finite.

A fixed batch size is accepted: ``batch_plan`` makes a working copy with a dynamic batch where
the graph allows it, and otherwise the model runs at its own batch size (``sizing.BatchPlan``).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import external_data_helper

from converters.single_score import single_score_kind, two_class_graph
from otbr_onnx.errors import UnreadableModelError, UnsupportedModelError, UsageError
from otbr_onnx.load import checks, interface, reading
from otbr_onnx.load.checks import default_opset
from otbr_onnx.load.fixed_batch import batch_plan
from otbr_onnx.load.limits import Limits
from otbr_onnx.sizing import BatchPlan

if TYPE_CHECKING:
    from converters.storage import WeightStorage


@dataclass(frozen=True)
class LoadedModel:
    """A validated model and what the pipeline needs to know about its interface.

    ``proto`` is the model exactly as read (external data inlined): write-back edits a copy
    of it, so nothing shape inference adds ever reaches the output file.
    """

    path: Path | None
    proto: onnx.ModelProto
    sha256: str
    input_name: str
    input_shape: tuple[int, ...]  # resolved, batch dimension included (value used for checks)
    output_name: str
    output_index: int
    output_is_probability: bool
    opset: int
    # A fixed-batch model's copy with the batch made dynamic (shape fields only), which is
    # converted to PyTorch; None: ``proto`` itself. Never written anywhere.
    working_proto: onnx.ModelProto | None = None
    batch: BatchPlan = BatchPlan()
    # A binary classifier with one output column: "logit" or "probability" (after a Sigmoid);
    # the working copy answers two class scores (``converters.single_score``). None: (N, classes).
    single_score: str | None = None

    def class_scores(self, values: np.ndarray) -> np.ndarray:
        """What onnxruntime returns for the model as given (or as written), as the working copy's
        class scores: the same array, or a single column widened to two."""
        if self.single_score is None:
            return values
        from converters.single_score import two_class_scores

        return two_class_scores(values, self.single_score)

    @functools.cached_property
    def shapes(self) -> dict[str, list[int]]:
        """Static shape of every value at batch 2, or at the model's own batch where it is fixed
        (``otbr_onnx.shapes.static_shapes``), computed on first use and then shared by every
        stage that asks."""
        from otbr_onnx.shapes import static_shapes

        return static_shapes(self.working, self.input_name, self.input_shape, self.batch.exact or 2)

    @functools.cached_property
    def storage(self) -> "WeightStorage":
        """Where each weight is stored (initializer, Constant node, behind Identity / Cast /
        DequantizeLinear) and the float32 working copy built from it; see ``converters.storage``.
        Analysed on the dynamic-batch copy where there is one: the two copies touch disjoint
        fields (shapes; weight storage), so the float32 copy has both."""
        from otbr_onnx.bridge import weight_storage

        return weight_storage(self.working_proto if self.working_proto is not None else self.proto)

    @property
    def working(self) -> onnx.ModelProto:
        """The copy every stage but write-back reads: each weight slot a plain float32
        initializer, a fixed batch made dynamic where the graph allows it (``batch_plan``), same
        node names. ``proto`` stays the model as read."""
        return self.storage.working


def load_model(
    path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    output_name: str | None = None,
    limits: Limits = Limits(),
) -> LoadedModel:
    """Read, check and describe the model at ``path``."""
    path = Path(path)
    with reading.loader_errors(str(path)):
        data = reading.read_bytes(path, limits)
        proto = reading.parse(data, path)
        checks.check_names(proto.graph)  # first: later messages quote names, and must stay one line
        reading.inline_external_data(proto, path.parent, limits)
        model = describe_model(proto, input_shape, output_name, limits)
    return LoadedModel(path=path, sha256=hashlib.sha256(data).hexdigest(), **model)


def load_proto(
    proto: onnx.ModelProto,
    input_shape: tuple[int, ...] | None = None,
    output_name: str | None = None,
    limits: Limits = Limits(),
) -> LoadedModel:
    """Same as ``load_model`` for a model already in memory (it must not use external data)."""
    if any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise UsageError("an in-memory model with external data cannot be cleaned; pass its path")
    proto_copy = onnx.ModelProto()
    proto_copy.CopyFrom(proto)
    with reading.loader_errors("the model"):
        model = describe_model(proto_copy, input_shape, output_name, limits)
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    return LoadedModel(path=None, sha256=digest, **model)


def describe_model(
    proto: onnx.ModelProto,
    input_shape: tuple[int, ...] | None,
    output_name: str | None,
    limits: Limits,
) -> dict:
    """Check the model and find its image input and logits output."""
    graph = proto.graph
    if len(graph.node) == 0:
        raise UnreadableModelError("the graph has no nodes")
    if len(graph.node) > limits.max_nodes:
        raise UnsupportedModelError(
            f"the graph has {len(graph.node)} nodes, above the --max-nodes limit of {limits.max_nodes}"
        )
    checks.check_names(graph)
    checks.check_domains(proto)
    checks.check_size(proto)
    sizes = checks.tensor_sizes(checks.check_structure(proto).graph)  # the inferred copy is dropped at once
    checks.check_constants(proto)
    input_name, shape = interface.find_image_input(graph, input_shape, limits)
    out_name, out_index = interface.find_output(graph, output_name)
    checks.check_tensor_sizes(sizes, limits)  # after the input's own cap, before anything runs the graph
    interface.check_output_depends_on_input(graph, input_name, out_name)
    columns = checks.check_runs(proto, input_name, shape, out_name)
    working, batch = batch_plan(proto, input_name, shape, out_name)
    single = single_score_kind(graph, out_name) if columns == 1 else None
    if single is not None:
        working = two_class_graph(working if working is not None else proto, out_name, single)
    return {
        "working_proto": working,
        "batch": batch,
        "single_score": single,
        "proto": proto,
        "input_name": input_name,
        "input_shape": shape,
        "output_name": out_name,
        "output_index": out_index,
        "output_is_probability": interface.ends_in_softmax(graph, out_name) or single == "probability",
        "opset": default_opset(proto),
    }
