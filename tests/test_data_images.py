"""``otbr_onnx.data.load_images``: the user's own images (``--data``), in process.

Every image is built here with Pillow in ``tmp_path``; nothing is committed or downloaded. The
same hostile files run as real processes in ``tests/test_hostile_runner.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hostile_files as hf
from otbr_onnx.data import images as data_images
from otbr_onnx.data import load_images
from otbr_onnx.errors import UsageError
from otbr_onnx.load import Limits

GREY = (1, 1, 8, 8)  # NCHW, one channel
RGB = (1, 3, 8, 8)
NHWC = (1, 8, 8, 3)


def refused(match: str, *args, **kwargs) -> str:
    """The one-line UsageError (exit 2) that ``load_images(*args)`` raises."""
    with pytest.raises(UsageError, match=match) as caught:
        load_images(*args, **kwargs)
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    return message


def grey_folder(folder: Path, values: list[int], size=(8, 8)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, value in enumerate(values):
        Image.new("L", size, value).save(folder / f"{index:03d}.png")
    return folder


# --- values, shapes and layout ---------------------------------------------------------------

def test_folder_values_are_pixels_over_255_in_name_order(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0, 51, 102, 153, 204, 255, 0, 0, 0, 0, 0, 255])
    images = load_images(folder, GREY, (0.0, 1.0))
    assert images.x.shape == (12, 1, 8, 8) and images.x.dtype == np.float32
    np.testing.assert_allclose(images.x[:6, 0, 0, 0], [0, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-6)
    assert images.y is None
    assert images.source == f"folder {folder} (12 images)"


def test_range_mapping_low_plus_span_times_p(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0, 255] + [51] * 8)
    x = load_images(folder, GREY, (-1.0, 1.0)).x
    np.testing.assert_allclose(x[:3, 0, 0, 0], [-1.0, 1.0, -1.0 + 2 * 0.2], atol=1e-6)
    x = load_images(folder, GREY, (0.0, 255.0)).x
    np.testing.assert_allclose(x[:3, 0, 0, 0], [0.0, 255.0, 51.0], atol=1e-4)


def test_nchw_and_nhwc_place_channels_where_the_model_reads_them(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for index in range(10):
        Image.new("RGB", (8, 8), (255, 0, 51)).save(folder / f"{index}.png")
    first = load_images(folder, RGB, (0.0, 1.0)).x
    last = load_images(folder, NHWC, (0.0, 1.0)).x
    assert first.shape == (10, 3, 8, 8) and last.shape == (10, 8, 8, 3)
    np.testing.assert_allclose(first[0, :, 2, 5], [1.0, 0.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(last[0, 2, 5, :], [1.0, 0.0, 0.2], atol=1e-6)


def test_a_shape_without_a_channel_axis_is_refused(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 10)
    refused("no 1- or 3-channel axis", folder, (1, 5, 8, 8), (0.0, 1.0))
    refused(r"images \(N, C, H, W\)", folder, (1, 64), (0.0, 1.0))


def test_mean_and_std_per_channel_and_broadcast(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for index in range(10):
        Image.new("RGB", (8, 8), (255, 0, 51)).save(folder / f"{index}.png")
    x = load_images(folder, RGB, (0.0, 1.0), mean=(0.5, 0.5, 0.2), std=(0.5, 0.25, 2.0)).x
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, -2.0, 0.0], atol=1e-6)
    x = load_images(folder, RGB, (0.0, 1.0), mean=(0.5,), std=(0.5,)).x
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, -1.0, -0.6], atol=1e-6)
    refused("--data-mean has 2 values", folder, RGB, (0.0, 1.0), mean=(0.1, 0.2))
    refused("--data-std must be > 0", folder, RGB, (0.0, 1.0), std=(1.0, 0.0, 1.0))


# --- conversions ------------------------------------------------------------------------------

def test_resized_bilinear_to_the_model_size(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    left_right = np.zeros((16, 32), np.uint8)
    left_right[:, 16:] = 255
    for index in range(10):
        Image.fromarray(left_right, "L").save(folder / f"{index}.png")
    images = load_images(folder, GREY, (0.0, 1.0))
    row = images.x[0, 0, 4]
    assert row[0] == pytest.approx(0.0, abs=1e-6) and row[-1] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < row[3] < 1.0 or 0.0 < row[4] < 1.0  # bilinear blends at the edge, nearest would not
    assert any("resized to 8 x 8 (bilinear): 10" in note for note in images.notes)


def test_grey_into_rgb_repeats_and_rgb_into_grey_is_luma(tmp_path: Path) -> None:
    grey = grey_folder(tmp_path / "grey", [102] * 10)
    x = load_images(grey, RGB, (0.0, 1.0)).x
    np.testing.assert_allclose(x[0, :, 0, 0], [0.4, 0.4, 0.4], atol=1e-6)
    colour = tmp_path / "colour"
    colour.mkdir()
    for index in range(10):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(colour / f"{index}.png")
    images = load_images(colour, GREY, (0.0, 1.0))
    assert images.x[0, 0, 0, 0] == pytest.approx(76 / 255, abs=1 / 255)  # ITU-R 601-2: 0.299 R
    assert any(note.startswith("RGB -> grey: 10") for note in images.notes)


def test_sixteen_bit_palette_and_alpha_pngs_convert(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 8)  # 000 .. 007, then the four below by name
    hf.sixteen_bit_png(folder / "a16.png", 65535)
    hf.sixteen_bit_png(folder / "b16.png", 32768)
    hf.palette_png(folder / "c_palette.png", (255, 0, 0))
    Image.new("RGBA", (8, 8), (0, 255, 0, 0)).save(folder / "d_alpha.png")
    images = load_images(folder, RGB, (0.0, 1.0))
    np.testing.assert_allclose(images.x[8, :, 0, 0], [1.0, 1.0, 1.0], atol=1e-6)  # 16-bit white, not clipped
    np.testing.assert_allclose(images.x[9, :, 0, 0], [32768 / 65535] * 3, atol=1e-6)
    np.testing.assert_allclose(images.x[10, :, 0, 0], [1.0, 0.0, 0.0], atol=1e-6)  # the palette's colour
    np.testing.assert_allclose(images.x[11, :, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)  # alpha dropped
    assert any("16-bit" in note for note in images.notes)
    assert any("palette -> RGB" in note for note in images.notes)


def test_animated_png_gives_its_first_frame(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 9)
    hf.animated(folder / "anim.png", "PNG", (255, 0, 0))
    images = load_images(folder, GREY, (0.0, 1.0))
    assert images.x[-1, 0, 0, 0] == pytest.approx(1.0)
    assert any("animated: first frame" in note for note in images.notes)


def test_gif_is_skipped_and_a_gif_named_png_refused(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 10)
    hf.animated(folder / "anim.gif", "GIF")
    images = load_images(folder, GREY, (0.0, 1.0))
    assert len(images.x) == 10 and any("without a .png/.jpg/.jpeg name skipped" in n for n in images.notes)
    hf.animated(folder / "zz.png", "GIF")
    refused("zz.png is not a PNG or JPEG image", folder, GREY, (0.0, 1.0))


def test_jpeg_decodes(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    hf.image_folder(folder, 10, (40, 30), "RGB", ".jpg")
    x = load_images(folder, RGB, (0.0, 1.0)).x
    assert x.shape == (10, 3, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0


# --- folder rules and caps ---------------------------------------------------------------------

def test_too_few_images_refused(tmp_path: Path) -> None:
    refused("0 PNG/JPEG file", tmp_path, GREY, (0.0, 1.0))
    folder = grey_folder(tmp_path / "one", [0])
    refused(f"1 PNG/JPEG file.*at least {data_images.MIN_IMAGES}", folder, GREY, (0.0, 1.0))


def test_subfolders_are_ignored_not_recursed(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 10)
    grey_folder(folder / "nested", [255] * 10)
    images = load_images(folder, GREY, (0.0, 1.0))
    assert len(images.x) == 10 and images.x.max() == 0.0
    assert any("1 sub-folder(s) ignored" in note for note in images.notes)
    grey_folder(tmp_path / "only_nested" / "inner", [0] * 10)
    refused("0 PNG/JPEG file", tmp_path / "only_nested", GREY, (0.0, 1.0))


def test_cap_reads_the_first_by_name_and_says_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data_images, "MAX_IMAGES", 10)
    folder = grey_folder(tmp_path / "d", list(range(0, 240, 20)))  # 12 images, 000 .. 011
    images = load_images(folder, GREY, (0.0, 1.0))
    assert len(images.x) == 10 and images.x[-1, 0, 0, 0] == pytest.approx(180 / 255)
    assert "read the first 10 of 12 image files (sorted by name)" in images.notes
    assert images.source.endswith("(10 images)")


def test_the_memory_cap_bounds_the_images_held(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 12)
    images = load_images(folder, GREY, (0.0, 1.0), limits=Limits(max_noise_elements=11 * 64))
    assert len(images.x) == 11
    refused("exceed the --max-noise-elements", folder, GREY, (0.0, 1.0), limits=Limits(max_noise_elements=64))


def test_a_folder_with_too_many_entries_is_refused_quickly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data_images, "MAX_ENTRIES", 50)
    for index in range(200):
        (tmp_path / f"{index}.png").touch()
    refused("more than 50 entries", tmp_path, GREY, (0.0, 1.0))


def test_a_link_leaving_the_folder_is_refused_one_inside_is_read(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 10)
    outside = grey_folder(tmp_path / "elsewhere", [255])
    (folder / "inside.png").symlink_to(folder / "000.png")
    assert len(load_images(folder, GREY, (0.0, 1.0)).x) == 11
    (folder / "zz.png").symlink_to(outside / "000.png")
    refused("zz.png is a link that leaves the data folder", folder, GREY, (0.0, 1.0))


def test_a_fifo_inside_is_refused_without_opening_it(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 10)
    os.mkfifo(folder / "wait.png")
    refused("wait.png is not a regular file", folder, GREY, (0.0, 1.0))


def test_a_fifo_or_missing_path_as_data_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "data")
    refused("not a folder or a regular file", tmp_path / "data", GREY, (0.0, 1.0))
    refused("no such file or folder", tmp_path / "absent", GREY, (0.0, 1.0))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 10)
    (folder / "000.png").chmod(0)
    refused("000.png: cannot read", folder, GREY, (0.0, 1.0))


# --- undecodable files and bombs ------------------------------------------------------------------

@pytest.mark.parametrize("name, build, match", [
    ("not_an_image.png", lambda p: p.write_bytes(b"hello, not a picture"), "is not a PNG or JPEG image"),
    ("empty.jpg", lambda p: p.write_bytes(b""), "is not a PNG or JPEG image"),
    ("truncated.jpg", hf.truncated_jpeg, "cannot be decoded"),
    ("bomb.png", hf.png_bomb, "50000 x 50000|decompression bomb"),
    ("warning_bomb.png", lambda p: hf.png_bomb(p, 5000), "decompression bomb"),  # Pillow's warning band
])
def test_undecodable_files_and_bombs_are_refused(tmp_path: Path, name: str, build, match: str) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 10)
    build(folder / name)
    refused(match, folder, GREY, (0.0, 1.0))


def test_the_bomb_limit_is_restored_and_the_bomb_is_not_decoded(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    before = PILImage.MAX_IMAGE_PIXELS
    folder = grey_folder(tmp_path / "d", [0] * 10)
    bomb = hf.png_bomb(folder / "bomb.png")
    assert bomb.stat().st_size < 10_000
    refused("decompression bomb", folder, GREY, (0.0, 1.0))
    assert PILImage.MAX_IMAGE_PIXELS == before


def test_terminal_escapes_in_a_file_name_are_printed_escaped(tmp_path: Path) -> None:
    folder = grey_folder(tmp_path / "d", [0] * 10)
    (folder / f"x{hf.ESCAPES}.png").write_bytes(b"junk")
    message = refused("is not a PNG or JPEG image", folder, GREY, (0.0, 1.0))
    assert "\\x1b]0;pwned" in message and not hf.has_raw_control(message)


# --- npz ------------------------------------------------------------------------------------------

def npz(tmp_path: Path, **arrays) -> Path:
    return hf.write_npz(tmp_path / "data.npz", **arrays)


def test_npz_is_used_as_given_with_labels(tmp_path: Path) -> None:
    x = hf.images(12)
    images = load_images(npz(tmp_path, x=x, y=hf.labels(12)), GREY, (0.0, 1.0))
    np.testing.assert_array_equal(images.x, x)
    np.testing.assert_array_equal(images.y, hf.labels(12))
    assert images.y.dtype == np.int64 and images.source == f"npz {tmp_path / 'data.npz'} (12 images)"
    assert load_images(npz(tmp_path, x=x.astype(np.float64)), GREY, (0.0, 1.0)).y is None


@pytest.mark.parametrize("arrays, match", [
    ({"x": hf.images(12, (3, 8, 8))}, r"array 'x' has shape \(12, 3, 8, 8\); the model takes \(N, 1, 8, 8\)"),
    ({"x": np.zeros((12, 64), np.float32)}, "array 'x' has shape"),
    ({"x": np.array(["a"] * 12)}, "has dtype <U1"),
    ({"x": hf.images(12).astype(bool)}, "has dtype bool"),
    ({"images": hf.images(12)}, "no array 'x'"),
    ({"x": hf.images(0)}, "holds 0 image"),
    ({"x": hf.images(1)}, "holds 1 image"),
    ({"x": hf.images(12) * 255}, r"range over \[0\.\d+, 254\.\d+\].*--input-range is 0,1"),
    ({"x": hf.images(12) - 5}, "range over"),
    ({"x": np.where(np.arange(12 * 64).reshape(12, 1, 8, 8) == 70, np.nan, 0.5).astype(np.float32)},
     "1 NaN or infinite value.*image 1"),
    ({"x": np.full((12, 1, 8, 8), np.inf, np.float32)}, "NaN or infinite"),
    ({"x": np.full((12, 1, 8, 8), 1e300)}, "NaN or infinite"),  # beyond float32
    ({"x": hf.images(12), "y": hf.labels(11)}, r"array 'y' has shape \(11,\)"),
    ({"x": hf.images(12), "y": hf.labels(12) + 0.5}, "non-integer"),
    ({"x": hf.images(12), "y": hf.labels(12) - 1}, "negative label"),
])
def test_bad_npz_refused(tmp_path: Path, arrays: dict, match: str) -> None:
    refused(match, npz(tmp_path, **arrays), GREY, (0.0, 1.0))


def test_npz_range_check_follows_input_range(tmp_path: Path) -> None:
    x = hf.images(12) * 255
    assert load_images(npz(tmp_path, x=x), GREY, (0.0, 255.0)).x.max() > 200
    assert len(load_images(npz(tmp_path, x=hf.images(12) * 1.2), GREY, (0.0, 1.0)).x) == 12  # slight overshoot


def test_npz_with_mean_std_and_capped_count(tmp_path: Path, monkeypatch) -> None:
    path = npz(tmp_path, x=hf.images(12), y=hf.labels(12))
    refused("apply to a folder of images", path, GREY, (0.0, 1.0), mean=(0.5,))
    monkeypatch.setattr(data_images, "MAX_IMAGES", 10)
    images = load_images(path, GREY, (0.0, 1.0))
    assert len(images.x) == len(images.y) == 10 and "used the first 10 of 12 images" in images.notes


def test_npz_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"PK but not really")
    refused("cannot read as .npz", tmp_path / "x.npz", GREY, (0.0, 1.0))


# --- the command line ------------------------------------------------------------------------------

def cli(*args: str):
    from click.testing import CliRunner

    from otbr_onnx.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_refuses_data_in_one_line_before_any_output(tmp_path: Path) -> None:
    import corpus

    model = hf.save(corpus.tiny_model(), tmp_path / "m.onnx")
    folder = grey_folder(tmp_path / "d", [0] * 10)
    for args, match in [
        (["verify", str(model), str(model), "--data", str(folder)], "give --scan too"),
        (["scan", str(model), "--data", str(folder), "--data-std", "1,2,3"], "--data-std has 3 values"),
        (["scan", str(model), "--data-mean", "0.5"], "give --data too"),
        (["scan", str(model), "--data", str(folder), "--data-mean", "x"], "comma-separated numbers"),
        (["scan", str(model), "--data", str(folder), "--report", str(folder / "r.json")], "inside, the --data"),
    ]:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("otbr-onnx: error:") and match in lines[0], result.output
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:03d}.png" for i in range(10)]
