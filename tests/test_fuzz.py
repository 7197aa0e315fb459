"""Mutation fuzzing of ``otbr-onnx clean``: a corrupted model is cleaned or cleanly refused.

Starting from the tiny valid model of ``tests/corpus.py``, hypothesis corrupts either the
serialised bytes (bit flips, truncation, insertion, deletion, overwrite) or the parsed
``ModelProto`` (dims, dtypes, attribute values, dropped node inputs, renamed tensors, changed
op types, dropped nodes, opset). Whatever comes out, the CLI must either

* exit 0, with an output that onnxruntime loads and runs to finite logits, or
* exit 2, 3 or 4 with exactly one ``otbr-onnx: error:`` line on stderr and no output file;

never exit 1 (an internal error is a bug) and never print a traceback.

Normal runs try a quick 40 examples. The long run (a few minutes per 1000 examples)::

    OTBR_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz.py -q -x --hypothesis-show-statistics

A failure prints the shortest mutation list hypothesis found; replay it with ``apply``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import corpus
import hostile_files
from corpus import QUICK_ARGS, refusal_problems, run_clean
from otbr_onnx.errors import WRITTEN_CODES

EXAMPLES = int(os.environ.get("OTBR_FUZZ_EXAMPLES", "40"))
BASE = corpus.tiny_bytes()

# Positions are drawn independently of the model and taken modulo the size they index, so a
# mutation list stays meaningful while hypothesis shrinks it.
POSITION = st.integers(min_value=0, max_value=2**16)
DIM_VALUES = [0, 1, 2, 3, 4, 7, 8, 9, 64, 2**20, 2**40, -1]
DTYPES = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32,
          TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16, 0, 999]
OP_TYPES = ["Relu", "Conv", "Gemm", "MatMul", "Add", "Flatten", "Softmax", "Identity", "Reshape",
            "GlobalAveragePool", "MaxPool", "BatchNormalization", "Transpose", "Concat", "NoSuchOp"]
ATTRIBUTE_NAMES = ["pads", "strides", "dilations", "group", "kernel_shape", "transA", "transB", "alpha",
                   "beta", "axis", "auto_pad", "perm"]
NAMES = ["x", "conv_w", "conv_b", "conv_out", "relu_out", "pool_out", "flat_out", "fc_w", "fc_b", "logits",
         "", "ghost", "x/../x", "conv", "fc", 'conv")\n#', "a'b", "tab\there", "nul\x00", "back\\slash", "é/層",
         "\x1b]0;title\x07", "\x1b[2J", "red\x1b[31m", "\u202ereversed", "csi\x9b2J"]
# Strings with terminal escapes (OSC title, screen clear, colour, C1 CSI, bidi override), mixed
# into free-text fields; whatever the tool prints of them must come out escaped.
ESCAPE_TEXT = st.lists(st.sampled_from(["\x1b]0;t\x07", "\x1b[2J", "\x1b[31m", "\x9b", "\u202e", "\x07", "\r",
                                        "\n", "a", "é", "層", "/", ".."]), min_size=1, max_size=6).map("".join)
INT_VALUES = st.sampled_from([-(2**40), -2, -1, 0, 1, 2, 3, 5, 64, 2**31, 2**40])
FLOAT_VALUES = st.sampled_from([0.0, -1.0, 1e-30, 1e30, 2.0, float("nan"), float("inf")])


# ---------------------------------------------------------------------------------------------
# mutations: small frozen dataclasses, so a failing example prints as readable code
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flip:
    at: int
    bit: int

    def on_bytes(self, data: bytearray) -> bytearray:
        if data:
            data[self.at % len(data)] ^= 1 << (self.bit % 8)
        return data


@dataclass(frozen=True)
class Truncate:
    at: int

    def on_bytes(self, data: bytearray) -> bytearray:
        return data[: self.at % (len(data) + 1)]


@dataclass(frozen=True)
class Insert:
    at: int
    chunk: bytes

    def on_bytes(self, data: bytearray) -> bytearray:
        at = self.at % (len(data) + 1)
        return data[:at] + bytearray(self.chunk) + data[at:]


@dataclass(frozen=True)
class Delete:
    at: int
    length: int

    def on_bytes(self, data: bytearray) -> bytearray:
        at = self.at % (len(data) + 1)
        return data[:at] + data[at + self.length:]


@dataclass(frozen=True)
class Overwrite:
    at: int
    chunk: bytes

    def on_bytes(self, data: bytearray) -> bytearray:
        at = self.at % (len(data) + 1)
        return data[:at] + bytearray(self.chunk) + data[at + len(self.chunk):]


def _pick(items, index: int):
    return items[index % len(items)] if len(items) else None


@dataclass(frozen=True)
class SetValueDim:
    """Change one dim of a graph input or output: value, symbolic, or removed shape."""

    output: bool
    which: int
    axis: int
    value: int | str | None

    def on_model(self, model: onnx.ModelProto) -> None:
        values = model.graph.output if self.output else model.graph.input
        value = _pick(values, self.which)
        if value is None:
            return
        tensor_type = value.type.tensor_type
        if self.value is None:
            tensor_type.ClearField("shape")
            return
        dim = _pick(tensor_type.shape.dim, self.axis)
        if dim is None:
            return
        if isinstance(self.value, str):
            dim.dim_param = self.value
        else:
            dim.dim_value = self.value


@dataclass(frozen=True)
class SetValueType:
    output: bool
    which: int
    dtype: int

    def on_model(self, model: onnx.ModelProto) -> None:
        value = _pick(model.graph.output if self.output else model.graph.input, self.which)
        if value is not None:
            value.type.tensor_type.elem_type = self.dtype


@dataclass(frozen=True)
class SetInitializerDims:
    which: int
    dims: tuple[int, ...]

    def on_model(self, model: onnx.ModelProto) -> None:
        tensor = _pick(model.graph.initializer, self.which)
        if tensor is not None:
            del tensor.dims[:]
            tensor.dims.extend(self.dims)


@dataclass(frozen=True)
class SetInitializerType:
    """Relabel the dtype, keeping the raw bytes (a size mismatch unless the widths agree)."""

    which: int
    dtype: int

    def on_model(self, model: onnx.ModelProto) -> None:
        tensor = _pick(model.graph.initializer, self.which)
        if tensor is not None:
            tensor.data_type = self.dtype


@dataclass(frozen=True)
class SetAttribute:
    node: int
    name: str
    value: int | float | tuple[int, ...] | str

    def on_model(self, model: onnx.ModelProto) -> None:
        node = _pick(model.graph.node, self.node)
        if node is None:
            return
        kept = [a for a in node.attribute if a.name != self.name]
        del node.attribute[:]
        node.attribute.extend(kept)
        if isinstance(self.value, tuple):  # an empty list has no inferable type: say INTS
            attribute = helper.make_attribute(self.name, list(self.value), attr_type=onnx.AttributeProto.INTS)
        else:
            attribute = helper.make_attribute(self.name, self.value)
        node.attribute.append(attribute)


@dataclass(frozen=True)
class DropAttribute:
    node: int
    which: int

    def on_model(self, model: onnx.ModelProto) -> None:
        node = _pick(model.graph.node, self.node)
        if node is not None and node.attribute:
            del node.attribute[self.which % len(node.attribute)]


@dataclass(frozen=True)
class DropInput:
    """Remove a node input, or blank it ('' means an omitted optional input in ONNX)."""

    node: int
    which: int
    blank: bool

    def on_model(self, model: onnx.ModelProto) -> None:
        node = _pick(model.graph.node, self.node)
        if node is None or not node.input:
            return
        index = self.which % len(node.input)
        if self.blank:
            node.input[index] = ""
        else:
            del node.input[index]


@dataclass(frozen=True)
class Rename:
    """Rename one thing in one place only: a node, a node's input or output, an initializer, a
    graph input or output (so references dangle or collide)."""

    place: str
    which: int
    slot: int
    name: str

    def on_model(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        if self.place == "node":
            node = _pick(graph.node, self.which)
            if node is not None:
                node.name = self.name
            return
        if self.place in ("input", "output"):
            node = _pick(graph.node, self.which)
            names = None if node is None else getattr(node, self.place)
            if names:
                names[self.slot % len(names)] = self.name
            return
        items = {"initializer": graph.initializer, "graph_input": graph.input, "graph_output": graph.output}
        target = _pick(items[self.place], self.which)
        if target is not None:
            target.name = self.name


@dataclass(frozen=True)
class SetText:
    """Put a (hostile) string into a free-text field the tool may print: producer, a node's
    domain, an attribute's name, an external-data location."""

    field: str
    which: int
    text: str

    def on_model(self, model: onnx.ModelProto) -> None:
        if self.field in ("producer_name", "producer_version", "doc_string"):
            setattr(model, self.field, self.text)
            return
        node = _pick(model.graph.node, self.which)
        if self.field == "domain" and node is not None:
            node.domain = self.text
        elif self.field == "attribute_name" and node is not None:
            node.attribute.append(helper.make_attribute(self.text or "a", 1))
        elif self.field == "location":
            tensor = _pick(model.graph.initializer, self.which)
            if tensor is not None:
                tensor.data_location = TensorProto.EXTERNAL
                tensor.external_data.add(key="location", value=self.text)


@dataclass(frozen=True)
class SetOpType:
    node: int
    op_type: str

    def on_model(self, model: onnx.ModelProto) -> None:
        node = _pick(model.graph.node, self.node)
        if node is not None:
            node.op_type = self.op_type


@dataclass(frozen=True)
class DropNode:
    node: int

    def on_model(self, model: onnx.ModelProto) -> None:
        if model.graph.node:
            del model.graph.node[self.node % len(model.graph.node)]


@dataclass(frozen=True)
class SwapNodes:
    first: int
    second: int

    def on_model(self, model: onnx.ModelProto) -> None:
        nodes = model.graph.node
        if len(nodes) < 2:
            return
        a, b = self.first % len(nodes), self.second % len(nodes)
        copy_a, copy_b = onnx.NodeProto(), onnx.NodeProto()
        copy_a.CopyFrom(nodes[a])
        copy_b.CopyFrom(nodes[b])
        nodes[a].CopyFrom(copy_b)
        nodes[b].CopyFrom(copy_a)


@dataclass(frozen=True)
class SetOpset:
    version: int

    def on_model(self, model: onnx.ModelProto) -> None:
        model.opset_import[0].version = self.version


CHUNKS = st.binary(min_size=1, max_size=16)
BYTE_MUTATIONS = st.one_of(
    st.builds(Flip, POSITION, st.integers(0, 7)),
    st.builds(Truncate, POSITION),
    st.builds(Insert, POSITION, CHUNKS),
    st.builds(Delete, POSITION, st.integers(1, 32)),
    st.builds(Overwrite, POSITION, CHUNKS),
)
DIMS = st.one_of(st.sampled_from(DIM_VALUES), st.sampled_from(["N", "H", ""]), st.none())
ATTRIBUTE_VALUES = st.one_of(
    INT_VALUES, FLOAT_VALUES, st.lists(INT_VALUES, min_size=0, max_size=5).map(tuple), st.sampled_from(["SAME_UPPER", "x"])
)
MODEL_MUTATIONS = st.one_of(
    st.builds(SetValueDim, st.booleans(), POSITION, POSITION, DIMS),
    st.builds(SetValueType, st.booleans(), POSITION, st.sampled_from(DTYPES)),
    st.builds(SetInitializerDims, POSITION, st.lists(st.sampled_from(DIM_VALUES), max_size=5).map(tuple)),
    st.builds(SetInitializerType, POSITION, st.sampled_from(DTYPES)),
    st.builds(SetAttribute, POSITION, st.sampled_from(ATTRIBUTE_NAMES), ATTRIBUTE_VALUES),
    st.builds(DropAttribute, POSITION, POSITION),
    st.builds(DropInput, POSITION, POSITION, st.booleans()),
    st.builds(Rename, st.sampled_from(["node", "input", "output", "initializer", "graph_input", "graph_output"]),
              POSITION, POSITION, st.sampled_from(NAMES)),
    st.builds(SetOpType, POSITION, st.sampled_from(OP_TYPES)),
    st.builds(DropNode, POSITION),
    st.builds(SwapNodes, POSITION, POSITION),
    st.builds(SetOpset, st.sampled_from([0, 1, 6, 9, 11, 13, 17, 21, onnx.defs.onnx_opset_version(), 10**6])),
    st.builds(SetText, st.sampled_from(["producer_name", "producer_version", "doc_string", "domain", "attribute_name",
                                        "location"]), POSITION, ESCAPE_TEXT),
)
# Either kind alone, or structure first then bytes: byte damage on a structurally odd model.
MUTATIONS = st.one_of(
    st.lists(BYTE_MUTATIONS, min_size=1, max_size=3),
    st.lists(MODEL_MUTATIONS, min_size=1, max_size=3),
    st.tuples(st.lists(MODEL_MUTATIONS, min_size=1, max_size=2), BYTE_MUTATIONS).map(lambda p: [*p[0], p[1]]),
)


def apply(mutations: list) -> bytes:
    """The tiny model with ``mutations`` applied in order (structural ones on the parsed model)."""
    model = onnx.load_model_from_string(BASE)
    data = bytearray(BASE)
    structural_pending = False
    for mutation in mutations:
        if hasattr(mutation, "on_model"):
            mutation.on_model(model)
            structural_pending = True
            continue
        if structural_pending:
            data, structural_pending = bytearray(model.SerializeToString()), False
        data = mutation.on_bytes(data)
    if structural_pending:
        data = bytearray(model.SerializeToString())
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# the property
# ---------------------------------------------------------------------------------------------


def _probe_for(session: ort.InferenceSession) -> np.ndarray:
    """Random images in the declared input shape: two where the batch is symbolic, else as many as
    a fixed batch declares (the tool cleans fixed-batch models and keeps their shapes)."""
    shape = [d if isinstance(d, int) else 2 for d in session.get_inputs()[0].shape]
    return np.random.default_rng(3).uniform(0, 1, shape).astype(np.float32)


def _check_success(output: Path) -> None:
    assert output.is_file(), "exit 0 but no output file"
    session = ort.InferenceSession(output.read_bytes(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: _probe_for(session)})[0]
    assert np.isfinite(logits).all(), "exit 0 but the cleaned model outputs non-finite values"


@contextlib.contextmanager
def _warnings_as_a_user_sees_them() -> Iterator[list]:
    """Record the warnings Python's default filters would print on a real run's stderr.

    Under pytest they are captured rather than printed, so CliRunner's stderr alone would hide
    a warning that, for a user, is a second stderr line.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=hidden)
        yield caught


@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(mutations=MUTATIONS)
def test_mutated_model_is_cleaned_or_cleanly_refused(mutations: list, capfd: pytest.CaptureFixture) -> None:
    data = apply(mutations)
    with tempfile.TemporaryDirectory() as folder:
        model, output = Path(folder) / "model.onnx", Path(folder) / "cleaned.onnx"
        model.write_bytes(data)
        capfd.readouterr()  # forget what earlier examples left
        with _warnings_as_a_user_sees_them() as caught:
            outcome = run_clean(model, output, *QUICK_ARGS)
        # onnxruntime's C++ logger writes straight to file descriptor 2, past CliRunner.
        event(f"exit {outcome.exit_code}")  # the outcome mix, shown by --hypothesis-show-statistics
        native = capfd.readouterr().err
        assert native == "", f"native code wrote to stderr: {native[:300]!r}"
        assert [str(w.message) for w in caught] == [], "warnings would print extra stderr lines"
        assert model.read_bytes() == data, "the input file changed"
        assert not hostile_files.has_raw_control(outcome.stderr + outcome.stdout), "a raw escape was printed"
        if outcome.exit_code in WRITTEN_CODES:  # written (6: a fresh scan of the written model flags a class)
            assert outcome.exception is None and outcome.stderr == "", outcome.stderr
            _check_success(output)
        else:
            assert refusal_problems(outcome) == [], (refusal_problems(outcome), outcome.stderr)
            assert not output.exists(), "refused but an output file was written"
        # Only the input and (on success) the output: no temporary file left behind.
        assert {p.name for p in Path(folder).iterdir()} <= {"model.onnx", "cleaned.onnx"}


def test_mutations_change_the_model() -> None:
    # Guards the fuzzer itself: a mutation that silently does nothing would test nothing.
    assert apply([Flip(at=100, bit=0)]) != BASE
    assert apply([Truncate(at=10)]) == BASE[:10]
    assert onnx.load_model_from_string(apply([SetOpType(node=1, op_type="NoSuchOp")])).graph.node[1].op_type == "NoSuchOp"
    assert apply([]) == bytes(BASE)


# ---------------------------------------------------------------------------------------------
# npz inputs (eval --data): generated arrays, then byte-level corruption of the archive
# ---------------------------------------------------------------------------------------------

NPZ_KEYS = ["x", "y", "x_clean", "y_clean", "x_poisoned", "y_poisoned", "target", "\x1b]0;key\x07", "x.npy"]
NPZ_DTYPES = ["float32", "float64", "float16", "uint8", "int64", "int8", "bool", "complex64", "<U2", "V4"]
NPZ_SHAPES = st.lists(st.sampled_from([0, 1, 2, 3, 6, 8, 2**31]), min_size=0, max_size=5).map(tuple)


@dataclass(frozen=True)
class NpzArray:
    key: str
    dtype: str
    shape: tuple[int, ...]
    fill: float

    def array(self) -> np.ndarray:
        shape = tuple(min(d, 8) for d in self.shape)  # large declared sizes come from LyingHeader
        if self.dtype.startswith("<U"):
            return np.full(shape, "ab")
        if self.dtype == "V4":
            return np.zeros(shape, "V4")
        with np.errstate(invalid="ignore", over="ignore"):  # nan or 1e30 cast to ints: any value will do
            return np.full(shape, self.fill).astype(self.dtype)


def _good_arrays() -> list[NpzArray]:
    return [NpzArray("x", "float32", (6, 1, 8, 8), 0.5), NpzArray("y", "int64", (6,), 1)]


@dataclass(frozen=True)
class LyingHeader:
    """Rewrite one member's header to declare ``shape`` (the data stays as it was)."""

    which: int
    shape: tuple[int, ...]


NPZ_ARRAYS = st.builds(NpzArray, st.sampled_from(NPZ_KEYS), st.sampled_from(NPZ_DTYPES), NPZ_SHAPES,
                       st.sampled_from([0.0, 1.0, -1.0, 2.5, 1e30, float("nan"), float("inf")]))
NPZ_FILES = st.tuples(
    st.one_of(st.just(_good_arrays()), st.lists(NPZ_ARRAYS, min_size=0, max_size=4),
              st.lists(NPZ_ARRAYS, max_size=2).map(lambda extra: _good_arrays() + extra)),
    st.booleans(),  # compressed
    st.lists(st.one_of(BYTE_MUTATIONS, st.builds(LyingHeader, POSITION, NPZ_SHAPES)), max_size=2),
)


def build_npz(arrays: list[NpzArray], compressed: bool, mutations: list) -> bytes:
    """The npz bytes: arrays as written by numpy, headers rewritten, then bytes corrupted."""
    import io
    import zipfile

    members = {}
    for item in arrays:
        buffer = io.BytesIO()
        np.save(buffer, item.array())
        members[f"{item.key}.npy"] = buffer.getvalue()
    for mutation in mutations:
        if isinstance(mutation, LyingHeader) and members:
            name = _pick(sorted(members), mutation.which)
            lie = hostile_files.npy_with_header({"descr": "<f4", "fortran_order": False, "shape": mutation.shape}, b"")
            data = members[name]
            header_end = data.index(b"\n") + 1 if b"\n" in data else 0
            members[name] = lie + data[header_end:]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    data = bytearray(out.getvalue())
    for mutation in mutations:
        if not isinstance(mutation, LyingHeader):
            data = mutation.on_bytes(data)
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(npz=NPZ_FILES)
def test_mutated_npz_is_evaluated_or_cleanly_refused(npz, tmp_path_factory: pytest.TempPathFactory) -> None:
    from click.testing import CliRunner

    from otbr_onnx.cli import main

    folder = tmp_path_factory.mktemp("npz")
    model = folder / "model.onnx"
    model.write_bytes(BASE)
    data = folder / "data.npz"
    data.write_bytes(build_npz(*npz))
    result = CliRunner().invoke(main, ["eval", str(model), "--data", str(data), "--max-file-bytes", str(2**26)])
    event(f"exit {result.exit_code}")
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, repr(escaped)
    assert not hostile_files.has_raw_control(result.stderr + result.stdout)
    if result.exit_code == 0:
        assert result.stderr == "" and "ACC" in result.stdout
        return
    assert result.exit_code in (2, 3), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(corpus.ERROR_PREFIX), result.stderr


def test_npz_builder_makes_a_readable_file(tmp_path: Path) -> None:
    from otbr_onnx.evaluate import load_npz

    path = tmp_path / "d.npz"
    path.write_bytes(build_npz(_good_arrays(), True, []))
    assert load_npz(path)["x"].shape == (6, 1, 8, 8)
