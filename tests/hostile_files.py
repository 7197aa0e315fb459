"""Hostile files for the round-two tests (issue 13), built at test time from the tiny model of
``tests/corpus.py``: models carrying terminal escapes, dead layers, memory bombs, reordered
classes; npz files with lying headers; folders whose output overlaps the input.

Nothing here is committed as a binary and nothing is downloaded.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from numpy.lib import format as npy_format
from onnx import TensorProto, helper, numpy_helper

from corpus import IR_VERSION, OPSET, tiny_model

# What a hostile string looks like: set the terminal title (OSC 0 ... BEL), clear the screen,
# turn red, and reverse the text that follows (a bidi override).
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31m\u202e"
RAW_CONTROL = tuple(chr(c) for c in range(0x20) if chr(c) not in "\n") + ("\x7f", "\x9b", "\u202e")


def has_raw_control(text: str) -> bool:
    """True if ``text`` holds a character a terminal would act on (newlines aside)."""
    return any(c in text for c in RAW_CONTROL)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# ---------------------------------------------------------------------------------------------
# terminal escapes in strings the tool prints
# ---------------------------------------------------------------------------------------------


def escape_in_producer() -> onnx.ModelProto:
    model = tiny_model()
    model.producer_name, model.producer_version = f"exporter{ESCAPES}", f"1.0{ESCAPES}"
    return model


def escape_in_domain() -> onnx.ModelProto:
    model = tiny_model()
    relu = _node(model, "relu")
    relu.op_type, relu.domain = "Relu", f"com.evil{ESCAPES}"
    model.opset_import.append(helper.make_opsetid(relu.domain, 1))
    return model


def escape_in_attribute_name() -> onnx.ModelProto:
    """The checker quotes the unknown attribute's name in its message."""
    model = tiny_model()
    _node(model, "relu").attribute.append(helper.make_attribute(f"alpha{ESCAPES}", 1.0))
    return model


def escape_in_external_location() -> onnx.ModelProto:
    """The conv weight read from a file whose name is an escape sequence (and that is absent)."""
    model = tiny_model()
    tensor = next(t for t in model.graph.initializer if t.name == "conv_w")
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", f"w{ESCAPES}.bin"), ("offset", "0"), ("length", str(size))):
        tensor.external_data.add(key=key, value=value)
    return model


# ---------------------------------------------------------------------------------------------
# graphs the pipeline could not clean before: dead layers, non-class outputs, memory bombs
# ---------------------------------------------------------------------------------------------


def dead_conv_only() -> onnx.ModelProto:
    """Relu -> Flatten logits (N, 64), and a Conv on the image whose output nothing reads."""
    weight = numpy_helper.from_array(np.full((2, 1, 3, 3), 0.1, np.float32), "dead_w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "dead_w"], ["dead_out"], name="dead_conv"),
         helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["logits"], name="flatten")],
        "dead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 64])], [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def dead_conv_beside_live_head() -> onnx.ModelProto:
    """The tiny model plus a second Conv on the image that reaches nothing."""
    model = tiny_model()
    model.graph.initializer.append(numpy_helper.from_array(np.full((2, 1, 3, 3), 0.1, np.float32), "dead_w"))
    model.graph.node.insert(0, helper.make_node("Conv", ["x", "dead_w"], ["dead_out"], name="dead_conv"))
    return model


def dead_conv_through_shape() -> onnx.ModelProto:
    """A Conv seen by the logits only through Shape (its values never matter): dead too."""
    model = dead_conv_only()
    graph = model.graph
    graph.node.append(helper.make_node("Shape", ["dead_out"], ["dead_shape"], name="shape"))
    graph.node.append(helper.make_node("ReduceSum", ["dead_shape"], ["dead_sum"], name="sum", keepdims=0))
    graph.node.append(helper.make_node("Cast", ["dead_sum"], ["dead_f"], name="cast", to=TensorProto.FLOAT))
    graph.node.append(helper.make_node("Mul", ["dead_f", "zero"], ["nothing"], name="mul"))
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    _node(model, "flatten").output[0] = "flat"
    graph.node.append(helper.make_node("Add", ["flat", "nothing"], ["logits"], name="add"))
    return model


def segmentation_output() -> onnx.ModelProto:
    """The conv feature map (N, 4, 8, 8) as the declared, correctly typed output."""
    model = tiny_model()
    del model.graph.node[2:]
    del model.graph.initializer[2:]
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("relu_out", TensorProto.FLOAT, ["N", 4, 8, 8]))
    return model


def _with_bomb(make_big: list[onnx.NodeProto], initializers: list[TensorProto]) -> onnx.ModelProto:
    """logits + 0 * ReduceSum(big): ``big`` is built by ``make_big`` and sits on the logits path."""
    model = tiny_model()
    model.graph.initializer.extend(initializers)
    _node(model, "fc").output[0] = "fc_out"
    model.graph.node.extend([
        *make_big,
        helper.make_node("ReduceSum", ["big"], ["big_sum"], name="bomb_sum", keepdims=0),
        helper.make_node("Mul", ["big_sum", "bomb_zero"], ["bomb_nothing"], name="bomb_mul"),
        helper.make_node("Add", ["fc_out", "bomb_nothing"], ["logits"], name="bomb_add"),
    ])
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "bomb_zero"))
    return model


def bomb_constant_of_shape(side: int = 16000) -> onnx.ModelProto:
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    return _with_bomb([helper.make_node("ConstantOfShape", ["bomb_shape"], ["big"], name="bomb", value=value)],
                      [numpy_helper.from_array(np.array([side, side], np.int64), "bomb_shape")])


def bomb_expand(side: int = 16000) -> onnx.ModelProto:
    return _with_bomb([helper.make_node("Expand", ["bomb_one", "bomb_shape"], ["big"], name="bomb")],
                      [numpy_helper.from_array(np.ones((1, 1), np.float32), "bomb_one"),
                       numpy_helper.from_array(np.array([side, side], np.int64), "bomb_shape")])


def bomb_tile(side: int = 16000) -> onnx.ModelProto:
    return _with_bomb([helper.make_node("Tile", ["bomb_one", "bomb_repeats"], ["big"], name="bomb")],
                      [numpy_helper.from_array(np.ones((1, 1), np.float32), "bomb_one"),
                       numpy_helper.from_array(np.array([side, side], np.int64), "bomb_repeats")])


def bomb_from_constant_node(side: int = 16000) -> onnx.ModelProto:
    """The bomb's shape in a Constant node rather than an initializer."""
    shape = numpy_helper.from_array(np.array([side, side], np.int64))
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    return _with_bomb([helper.make_node("Constant", [], ["bomb_shape"], name="bomb_shape_node", value=shape),
                       helper.make_node("ConstantOfShape", ["bomb_shape"], ["big"], name="bomb", value=value)], [])


# ---------------------------------------------------------------------------------------------
# verify: a non-weight initializer changed
# ---------------------------------------------------------------------------------------------


def with_class_order(order: list[int], dtype=np.int64) -> onnx.ModelProto:
    """The tiny model with a Gather over the class axis: ``order`` reorders the answers."""
    model = tiny_model()
    _node(model, "fc").output[0] = "fc_out"
    model.graph.initializer.append(numpy_helper.from_array(np.array(order, dtype), "class_order"))
    model.graph.node.append(helper.make_node("Gather", ["fc_out", "class_order"], ["logits"], name="reorder", axis=1))
    return model


def with_scale(value: float) -> onnx.ModelProto:
    """The tiny model with its logits multiplied by a float constant that is no layer's weight."""
    model = tiny_model()
    _node(model, "fc").output[0] = "fc_out"
    model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.float32), "logit_scale"))
    model.graph.node.append(helper.make_node("Mul", ["fc_out", "logit_scale"], ["logits"], name="scale"))
    return model


def with_changed_weight(model: onnx.ModelProto, name: str = "conv_w", delta: float = 0.01) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    tensor = next(t for t in changed.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + np.float32(delta), name))
    return changed


# ---------------------------------------------------------------------------------------------
# npz files: lying headers, wrong shapes and types
# ---------------------------------------------------------------------------------------------


def images(count: int = 6, shape: tuple[int, ...] = (1, 8, 8)) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (count, *shape)).astype(np.float32)


def labels(count: int = 6, classes: int = 3) -> np.ndarray:
    return (np.arange(count) % classes).astype(np.int64)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def npy_with_header(header: dict, payload: bytes = b"\0" * 16) -> bytes:
    """An .npy member whose header says anything, followed by ``payload``."""
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def write_npz_members(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return path


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_huge_header(path: Path, shape: tuple[int, ...] = (10**7, 1, 8, 8), compress: bool = False) -> Path:
    """x declares 2.5 GB of float32 in a file of a few hundred bytes; y is fine."""
    huge = npy_with_header({"descr": "<f4", "fortran_order": False, "shape": shape})
    return write_npz_members(path, {"x": huge, "y": _npy(labels())}, compress)


def npz_zip_bomb(path: Path, count: int = 40_000) -> Path:
    """A compressed x that is honest about its size: 40000 x 1 x 8 x 8 zeros (10 MB) in ~10 KB."""
    return write_npz_members(path, {"x": _npy(np.zeros((count, 1, 8, 8), np.float32)), "y": _npy(labels(count))},
                             compress=True)


def npz_cases() -> dict[str, tuple]:
    """name -> (arrays for np.savez, a fragment of the one-line refusal)."""
    x, y = images(), labels()
    return {
        "wrong_image_shape": ({"x": images(shape=(3, 8, 8)), "y": y}, "images have shape (3, 8, 8)"),
        "wrong_rank": ({"x": np.zeros((6,), np.float32), "y": y}, "array 'x'"),
        "string_images": ({"x": np.array(["a"] * 6), "y": y}, "array 'x' has dtype <U1"),
        "complex_images": ({"x": x.astype(np.complex64), "y": y}, "array 'x' has dtype complex64"),
        "fewer_labels": ({"x": x, "y": y[:4]}, "array 'y' has shape (4,)"),
        "label_matrix": ({"x": x, "y": np.zeros((6, 3), np.int64)}, "array 'y' has shape (6, 3)"),
        "fractional_labels": ({"x": x, "y": y + 0.5}, "array 'y' has dtype float64 with non-integer"),
        "negative_label": ({"x": x, "y": y - 1}, "negative label"),
        "label_beyond_classes": ({"x": x, "y": y + 5}, "the model has 3 classes"),
        "empty": ({"x": images(0), "y": labels(0)}, "array 'x' is empty"),
        "no_arrays_named_x": ({"images": x, "y": y}, "must hold arrays x_clean/y_clean"),
        "poisoned_without_labels": ({"x": x, "y": y, "x_poisoned": x}, "'x_poisoned' has no 'y_poisoned'"),
        "target_array": ({"x": x, "y": y, "target": np.array([1, 2])}, "array 'target'"),
        "target_beyond_classes": ({"x": x, "y": y, "target": np.array(7)}, "--target 7 is not a class"),
    }


# ---------------------------------------------------------------------------------------------
# --data: image folders and npz files nobody trusts (issue 23)
# ---------------------------------------------------------------------------------------------


def rgb_model() -> onnx.ModelProto:
    """The tiny model taking RGB images (N, 3, 8, 8): its conv reads three channels."""
    model = tiny_model(("N", 3, 8, 8))
    weight = next(t for t in model.graph.initializer if t.name == "conv_w")
    values = np.repeat(numpy_helper.to_array(weight), 3, axis=1) / 3
    weight.CopyFrom(numpy_helper.from_array(values.astype(np.float32), "conv_w"))
    return model


def many_class_model(classes: int = 100_000) -> onnx.ModelProto:
    """The tiny model whose classifier has ``classes`` outputs, from a 12-value weight tiled at run
    time (Tile): a file of about 1 KB."""
    model = tiny_model()
    graph = model.graph
    fc = _node(model, "fc")
    repeats = -(-classes // 3)
    graph.initializer.extend([numpy_helper.from_array(np.array([repeats, 1], np.int64), "tile_rows"),
                              numpy_helper.from_array(np.array([classes], np.int64), "class_count"),
                              numpy_helper.from_array(np.array([0], np.int64), "zero_start"),
                              numpy_helper.from_array(np.array([0], np.int64), "row_axis")])
    graph.node.insert(len(graph.node) - 1, helper.make_node("Tile", ["fc_w", "tile_rows"], ["fc_w_tiled"], name="tile"))
    graph.node.insert(len(graph.node) - 1, helper.make_node("Slice", ["fc_w_tiled", "zero_start", "class_count",
                                                                      "row_axis"], ["fc_w_many"], name="cut"))
    fc.input[1] = "fc_w_many"
    del fc.input[2]  # no bias: one of 3 values would not cover the classes
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "fc_b"))
    graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]))
    onnx.checker.check_model(model)
    return model


def image_folder(folder: Path, count: int = 12, size: tuple[int, int] = (8, 8), mode: str = "L",
                 suffix: str = ".png") -> Path:
    """``count`` images of ``size`` (W, H) in ``mode``, each a distinct ramp, named 000.png ..."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    for index in range(count):
        ramp = (np.arange(width * height).reshape(height, width) * 7 + index * 11) % 256
        grey = Image.fromarray(ramp.astype(np.uint8), "L")
        grey.convert(mode).save(folder / f"{index:03d}{suffix}")
    return folder


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_bomb(path: Path, side: int = 50_000) -> Path:
    """A PNG of a few hundred bytes whose header declares ``side`` x ``side`` grey pixels (2.5
    GB decoded at 50,000); its data stream holds only the first rows (the header is the attack:
    nothing past it may be read)."""
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey, no interlace
    rows = zlib.compress(b"\0" * (side + 1) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows)
                     + png_chunk(b"IEND", b""))
    return path


def truncated_jpeg(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A real JPEG cut after a third of its bytes: the header reads, the pixels do not."""
    from PIL import Image

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    return path


def sixteen_bit_png(path: Path, value: int = 65535, size: tuple[int, int] = (8, 8)) -> Path:
    from PIL import Image

    Image.fromarray(np.full((size[1], size[0]), value, np.uint16)).save(path)
    return path


def palette_png(path: Path, colour: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 8)) -> Path:
    from PIL import Image

    Image.new("RGB", size, colour).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    return path


def animated(path: Path, fmt: str, frames: tuple[int, ...] = (255, 0, 0), size: tuple[int, int] = (8, 8)) -> Path:
    """An animated GIF or PNG whose frames are flat greys of the given values (the first: 255)."""
    from PIL import Image

    images = [Image.new("L", size, value) for value in frames]
    images[0].save(path, fmt, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path
