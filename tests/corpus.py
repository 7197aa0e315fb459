"""Bad inputs for ``otbr-onnx clean``, generated at test time from one tiny valid model.

Nothing here is a committed binary: each case writes its files into a fresh folder when the
test asks for it. A case says which exit code the CLI must give (see ``otbr_onnx/errors.py``):

* 2: bad usage, or a file that is not a readable / valid ONNX model (the checker rejects it);
* 3: a valid ONNX model this tool refuses (custom ops, unknown opset, non-finite weights, ...).

Decisions recorded here (the tests enforce them):

* Non-float (int64) weights on a Conv are not a valid ONNX model (Conv's ``T`` must be one float
  type for X, W and B), so the checker's type inference rejects them: exit 2.
* NaN or +-Inf weights in a Conv / Gemm / MatMul are refused at load time: exit 3, so no NaN
  model is ever written.
* A graph without nodes is "not a model we can read" (exit 2); a graph with nodes but no weight
  layer is a valid model we refuse (exit 3).
* Declared types or shapes that contradict the graph (strict shape inference fails) are an
  invalid model: exit 2. A model that passes those checks but that onnxruntime cannot run
  (a channel count the conv weight does not match) is refused: exit 3.
* A fixed batch dimension is no longer refused: ``tests/test_sizes.py`` cleans such models.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUICK_ARGS = ("--iterations", "2", "--batch-size", "4", "--prune-ratio", "0.25", "--quiet")
OPSET = 17
IR_VERSION = 8


# ---------------------------------------------------------------------------------------------
# the valid starting point
# ---------------------------------------------------------------------------------------------


def tiny_model(input_dims: tuple[int | str, ...] = ("N", 1, 8, 8)) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: float [N,1,8,8] -> logits [N,3].

    Weights come from a fixed seed so every build is byte-identical (the fuzzer's shrinking
    relies on the same starting bytes).
    """
    rng = np.random.default_rng(1234)
    initializers = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.5, (3, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (3,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu_out"], ["pool_out"], name="pool"),
        helper.make_node("Flatten", ["pool_out"], ["flat_out"], name="flatten"),
        helper.make_node("Gemm", ["flat_out", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def tiny_bytes() -> bytes:
    return tiny_model().SerializeToString(deterministic=True)


def parity_probe(count: int = 2) -> np.ndarray:
    """A batch the tiny model (and anything cleaned from it) must accept."""
    return np.random.default_rng(5).uniform(0, 1, (count, 1, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# what a case is
# ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The files of one case, ready to run: ``otbr-onnx clean MODEL OUTPUT *args``."""

    model: Path
    output: Path
    args: tuple[str, ...] = ()
    # Files whose bytes must be identical after the run (the input and its external data).
    guarded: list[Path] = field(default_factory=list)
    # A context manager active while the CLI runs (used to simulate a full disk).
    during: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    skip: str | None = None  # why this case cannot be run here (e.g. running as root)


@dataclass(frozen=True)
class Case:
    name: str
    exit_code: int
    build: Callable[[Path], Prepared]
    # A fragment the one-line message must contain, so a refusal for the wrong reason fails.
    message: str
    # A bug outside load.py/output.py that still breaks this case: the test is a strict xfail
    # (so it starts failing, as a reminder to drop this, once the bug is fixed).
    known_bug: str | None = None


def _save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def _standard(folder: Path, model: Path) -> Prepared:
    # Quick settings everywhere: a case whose check is missing then fails fast, not slowly.
    out_dir = folder / "out"
    out_dir.mkdir(exist_ok=True)
    guarded = [model] if model.is_file() else []
    return Prepared(model=model, output=out_dir / "cleaned.onnx", args=QUICK_ARGS, guarded=guarded)


def _from_model(make: Callable[[], onnx.ModelProto]) -> Callable[[Path], Prepared]:
    """A case whose only fault is inside the model (no checker run: the faults are deliberate)."""
    return lambda folder: _standard(folder, _save(make(), folder))


def _from_bytes(make: Callable[[], bytes]) -> Callable[[Path], Prepared]:
    def build(folder: Path) -> Prepared:
        path = folder / "model.onnx"
        path.write_bytes(make())
        return _standard(folder, path)

    return build


def _initializer(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# ---------------------------------------------------------------------------------------------
# files that are not ONNX models
# ---------------------------------------------------------------------------------------------


def missing_file(folder: Path) -> Prepared:
    return _standard(folder, folder / "absent.onnx")


def directory(folder: Path) -> Prepared:
    # A folder as MODEL means batch mode; one holding no .onnx file is a usage error.
    path = folder / "model.onnx"
    path.mkdir()
    (path / "notes.txt").write_text("no models here")
    return _standard(folder, path)


def random_bytes() -> bytes:
    return np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def text_file() -> bytes:
    return b"This is not a model.\nconv_w = [0.1, 0.2]\n"


def truncated() -> bytes:
    data = tiny_bytes()
    return data[: len(data) // 2]


def non_utf8_name() -> bytes:
    # Same length, so every protobuf length prefix stays right; only the UTF-8 is broken.
    return tiny_bytes().replace(b"fc_b", b"\xffc_b")


# ---------------------------------------------------------------------------------------------
# models that are broken or that the tool refuses
# ---------------------------------------------------------------------------------------------


def no_nodes() -> onnx.ModelProto:
    model = tiny_model()
    del model.graph.node[:]
    return model


def missing_initializer() -> onnx.ModelProto:
    model = tiny_model()
    _node(model, "conv").input[1] = "undefined_weight"
    return model


def cyclic() -> onnx.ModelProto:
    # relu reads the pool's output, which depends on relu: a cycle the checker must catch.
    model = tiny_model()
    _node(model, "relu").input[0] = "pool_out"
    return model


def future_opset() -> onnx.ModelProto:
    model = tiny_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    return model


def custom_domain() -> onnx.ModelProto:
    model = tiny_model()
    relu = _node(model, "relu")
    relu.op_type, relu.domain = "SecretRelu", "com.example.backdoor"
    model.opset_import.append(helper.make_opsetid("com.example.backdoor", 1))
    return model


def _poisoned_weight(value: float) -> onnx.ModelProto:
    model = tiny_model()
    weight = numpy_helper.to_array(_initializer(model, "conv_w")).copy()
    weight[0, 0, 1, 1] = value
    _initializer(model, "conv_w").CopyFrom(numpy_helper.from_array(weight, "conv_w"))
    return model


def inf_added_bias() -> onnx.ModelProto:
    # An extra Add after the classifier with +inf for class 1: that class always "wins".
    model = tiny_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, np.inf, 0], np.float32), "extra_bias"))
    _node(model, "fc").output[0] = "fc_out"
    model.graph.node.append(helper.make_node("Add", ["fc_out", "extra_bias"], ["logits"], name="add_bias"))
    return model


def overflowing_weight() -> onnx.ModelProto:
    # Finite, but 1e38 times a pixel overflows float32: the logits are infinite.
    return _poisoned_weight(1e38)


def int64_conv_weight() -> onnx.ModelProto:
    model = tiny_model()
    weight = numpy_helper.to_array(_initializer(model, "conv_w"))
    _initializer(model, "conv_w").CopyFrom(numpy_helper.from_array((weight * 10).astype(np.int64), "conv_w"))
    return model


def no_weight_layer() -> onnx.ModelProto:
    # x -> Relu -> Flatten: a valid model with a (N, 64) output but nothing to clean.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["logits"], name="flatten")],
        "relu_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 64])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def two_image_inputs() -> onnx.ModelProto:
    model = tiny_model()
    model.graph.input.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8]))
    add = helper.make_node("Add", ["x", "y"], ["xy"], name="add")
    _node(model, "conv").input[0] = "xy"
    model.graph.node.insert(0, add)
    return model


def channel_mismatch() -> onnx.ModelProto:
    # The input declares 3 channels, the conv weight expects 1: the checker and shape inference
    # accept it, onnxruntime does not.
    return tiny_model(("N", 3, 8, 8))


def output_shape_lie() -> onnx.ModelProto:
    # The declared logits are the conv's (N, 4, 8, 8) feature map under a (N, 3) type.
    model = tiny_model()
    model.graph.output[0].name = "conv_out"
    return model


def output_ignores_input() -> onnx.ModelProto:
    # The logits are computed from a constant, not from the image: nothing to unlearn.
    model = tiny_model()
    const = numpy_helper.from_array(np.ones((1, 4), np.float32), "const_features")
    model.graph.initializer.append(const)
    _node(model, "fc").input[0] = "const_features"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    return model


def huge_input() -> onnx.ModelProto:
    # 4e10 floats per image: loading must refuse it from the declared shape, never allocate it.
    return tiny_model(("N", 1, 200_000, 200_000))


def code_in_node_name(folder: Path) -> Prepared:
    """A node name that onnx2torch / torch.fx would paste into generated Python as a statement.

    fx emits ``relu = getattr(self, "<name>")(conv)``; with this name that line becomes
    ``getattr(self, "conv")`` (an existing module, so no error yet), then an ``open(...)`` line.
    Without the load-time name check the pipeline really creates ``out/PWNED`` (checked by hand);
    the test's listing of the output folder would then differ.
    """
    model = tiny_model()
    marker = folder / "out" / "PWNED"
    _node(model, "relu").name = f'conv")\nopen({str(marker)!r}, "w").close()\n#'
    return _standard(folder, _save(model, folder))


# ---------------------------------------------------------------------------------------------
# external data that tries to leave the model's folder
# ---------------------------------------------------------------------------------------------


def _point_external(model: onnx.ModelProto, tensor_name: str, location: str, length: int) -> None:
    """Make ``tensor_name`` read its bytes from ``location`` instead of ``raw_data``."""
    tensor = _initializer(model, tensor_name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _secret(folder: Path) -> tuple[Path, int]:
    """A file outside the model folder with exactly the bytes of the conv weight (4*9 floats)."""
    secret = folder / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(np.arange(36, dtype=np.float32).tobytes())
    return secret, secret.stat().st_size


def _external(folder: Path, location_for: Callable[[Path, Path], str]) -> Prepared:
    secret, size = _secret(folder)
    model_dir = folder / "models"
    model_dir.mkdir()
    model = tiny_model()
    _point_external(model, "conv_w", location_for(model_dir, secret), size)
    prepared = _standard(folder, _save(model, model_dir))
    prepared.guarded.append(secret)
    return prepared


def external_absolute(folder: Path) -> Prepared:
    return _external(folder, lambda model_dir, secret: str(secret.resolve()))


def external_dotdot(folder: Path) -> Prepared:
    return _external(folder, lambda model_dir, secret: "../outside/secret.bin")


def external_symlink(folder: Path) -> Prepared:
    # The location looks local, but the link points outside the model folder.
    def location(model_dir: Path, secret: Path) -> str:
        (model_dir / "weights.bin").symlink_to(secret)
        return "weights.bin"

    return _external(folder, location)


def _local_external(folder: Path, offset: str = "0", make_file: Callable[[Path], None] | None = None) -> Prepared:
    """The conv weight stored in ``weights.bin`` beside the model (inside its folder)."""
    model = tiny_model()
    weight = _initializer(model, "conv_w").raw_data
    _point_external(model, "conv_w", "weights.bin", len(weight))
    _initializer(model, "conv_w").external_data[1].value = offset
    prepared = _standard(folder, _save(model, folder))
    if make_file is None:
        (folder / "weights.bin").write_bytes(weight)
    else:
        make_file(folder / "weights.bin")
    if (folder / "weights.bin").is_file():
        prepared.guarded.append(folder / "weights.bin")
    return prepared


def external_valid(folder: Path) -> Prepared:
    return _local_external(folder)


def external_missing_file(folder: Path) -> Prepared:
    return _local_external(folder, make_file=lambda path: None)


def external_fifo(folder: Path) -> Prepared:
    # Reading a FIFO with no writer blocks forever: it must be refused, never opened.
    return _local_external(folder, make_file=lambda path: os.mkfifo(path))


def external_bad_offset(folder: Path) -> Prepared:
    return _local_external(folder, offset="twelve")


def external_offset_past_end(folder: Path) -> Prepared:
    return _local_external(folder, offset="100000")


# ---------------------------------------------------------------------------------------------
# output paths that must not or cannot be written
# ---------------------------------------------------------------------------------------------


LONG_NAME = "n" * 300 + ".onnx"  # beyond NAME_MAX: stat() itself fails with ENAMETOOLONG


def input_name_too_long(folder: Path) -> Prepared:
    prepared = _standard(folder, _save(tiny_model(), folder))
    prepared.model = folder / LONG_NAME
    return prepared


def output_name_too_long(folder: Path) -> Prepared:
    prepared = _standard(folder, _save(tiny_model(), folder))
    prepared.output = prepared.output.parent / LONG_NAME
    return prepared


def output_is_input(folder: Path) -> Prepared:
    model = _save(tiny_model(), folder)
    return Prepared(model=model, output=model, args=QUICK_ARGS, guarded=[model])


def output_folder_missing(folder: Path) -> Prepared:
    prepared = _standard(folder, _save(tiny_model(), folder))
    prepared.output = folder / "no_such_folder" / "cleaned.onnx"
    return prepared


def output_is_directory(folder: Path) -> Prepared:
    prepared = _standard(folder, _save(tiny_model(), folder))
    prepared.output.mkdir()
    return prepared


def output_folder_unwritable(folder: Path) -> Prepared:
    prepared = _standard(folder, _save(tiny_model(), folder))
    if os.geteuid() == 0:
        # root bypasses permission bits, so chmod proves nothing here; "folder missing" and
        # "disk full" cover the other ways a write can fail.
        prepared.skip = "running as root: chmod 0o500 does not stop root from writing"
        return prepared
    prepared.output.parent.chmod(0o500)
    return prepared


@contextlib.contextmanager
def disk_full() -> Iterator[None]:
    """Make every fsync in the output module fail with ENOSPC, as a full disk would."""
    from otbr_onnx import output

    real = output.os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    output.os.fsync = full
    try:
        yield
    finally:
        output.os.fsync = real


def disk_full_while_writing(folder: Path) -> Prepared:
    # An older cleaned model already sits at the output path: a failed write must keep it.
    prepared = _standard(folder, _save(tiny_model(), folder))
    prepared.output.write_bytes(b"previous result")
    prepared.guarded.append(prepared.output)
    prepared.during = disk_full
    return prepared


# ---------------------------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------------------------

CASES: list[Case] = [
    Case("missing_file", 2, missing_file, "no such file"),
    Case("directory_without_models", 2, directory, "no .onnx models found"),
    Case("empty_file", 2, _from_bytes(lambda: b""), "file is empty"),
    Case("random_bytes", 2, _from_bytes(random_bytes), "not an ONNX model"),
    Case("text_file", 2, _from_bytes(text_file), "not an ONNX model"),
    Case("truncated_protobuf", 2, _from_bytes(truncated), "not an ONNX model"),
    Case("non_utf8_name", 2, _from_bytes(non_utf8_name), "not valid UTF-8"),
    Case("no_nodes", 2, _from_model(no_nodes), "no nodes"),
    Case("missing_initializer", 2, _from_model(missing_initializer), "undefined_weight"),
    Case("cyclic_graph", 2, _from_model(cyclic), "input 'pool_out' of node"),
    Case("future_opset", 3, _from_model(future_opset), "opset"),
    Case("custom_domain_op", 3, _from_model(custom_domain), "com.example.backdoor"),
    Case("nan_weight", 3, _from_model(lambda: _poisoned_weight(float("nan"))), "'conv_w' holds NaN"),
    Case("inf_weight", 3, _from_model(lambda: _poisoned_weight(float("inf"))), "'conv_w' (read by Conv) holds infinite"),
    Case("inf_added_bias", 3, _from_model(inf_added_bias), "'extra_bias' (read by Add) holds infinite"),
    Case("overflowing_weight", 3, _from_model(overflowing_weight), "NaN or infinite on a random image"),
    Case("int64_conv_weight", 2, _from_model(int64_conv_weight), "tensor(int64)"),
    Case("code_in_node_name", 3, code_in_node_name, "contains a quote, backslash or control character"),
    Case("no_weight_layer", 3, _from_model(no_weight_layer), "no weight layer"),
    Case("two_image_inputs", 3, _from_model(two_image_inputs), "exactly one image input"),
    Case("input_channel_mismatch", 3, _from_model(channel_mismatch), "onnxruntime cannot run"),
    Case("output_shape_lie", 2, _from_model(output_shape_lie), "shapes are inconsistent"),
    Case("output_ignores_input", 3, _from_model(output_ignores_input), "does not depend on the image"),
    Case("huge_input_shape", 3, _from_model(huge_input), "max-noise-elements"),
    Case("external_absolute_path", 3, external_absolute, "absolute"),
    Case("external_dotdot_escape", 3, external_dotdot, "leaves the model folder"),
    Case("external_symlink_escape", 3, external_symlink, "leaves the model folder"),
    Case("input_name_too_long", 2, input_name_too_long, "File name too long"),
    Case("output_name_too_long", 2, output_name_too_long, "File name too long"),
    Case("external_missing_file", 2, external_missing_file, "is missing"),
    Case("external_fifo", 2, external_fifo, "is missing"),
    Case("external_bad_offset", 2, external_bad_offset, "malformed external data"),
    Case("external_offset_past_end", 2, external_offset_past_end, "is invalid"),
    Case("output_is_input", 2, output_is_input, "--force"),
    Case("output_folder_missing", 2, output_folder_missing, "does not exist"),
    Case("output_is_directory", 2, output_is_directory, "is a directory"),
    Case("output_folder_unwritable", 2, output_folder_unwritable, "not writable"),
    Case("disk_full_while_writing", 2, disk_full_while_writing, "No space left"),
]


# ---------------------------------------------------------------------------------------------
# running the CLI and judging what it printed (shared with the fuzz test)
# ---------------------------------------------------------------------------------------------

ERROR_PREFIX = "otbr-onnx: error:"
EXPECTED_FAILURE_CODES = (2, 3, 4)


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None  # anything but SystemExit escaping the CLI is a bug


def run_clean(model: Path, output: Path, *args: str) -> Outcome:
    """``otbr-onnx clean MODEL OUTPUT ARGS`` in process, stdout and stderr kept apart."""
    from click.testing import CliRunner

    from otbr_onnx.cli import main

    result = CliRunner().invoke(main, ["clean", str(model), str(output), *args])
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    return Outcome(result.exit_code, result.stdout, result.stderr, escaped)


def refusal_problems(outcome: Outcome) -> list[str]:
    """Why ``outcome`` is not a clean refusal: a 2/3/4 exit and exactly one error line."""
    problems = []
    if outcome.exception is not None:
        problems.append(f"exception escaped the CLI: {outcome.exception!r}")
    if outcome.exit_code not in EXPECTED_FAILURE_CODES:
        problems.append(f"exit code {outcome.exit_code}, expected one of {EXPECTED_FAILURE_CODES}")
    lines = outcome.stderr.splitlines()
    if len(lines) != 1 or not lines[0].startswith(ERROR_PREFIX):
        problems.append(f"stderr is not one '{ERROR_PREFIX}' line: {outcome.stderr!r}")
    if "Traceback" in outcome.stderr + outcome.stdout:
        problems.append("a traceback was printed")
    return problems
