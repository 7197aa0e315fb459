"""Write models/demo_images/: 200 unlabeled Fashion-MNIST test images as PNG files, none of them
in models/demo_eval.npz (neither its clean images nor the images its triggered set was made from),
for ``otbr-onnx clean models/demo_badnets.onnx OUT --data models/demo_images``.

    python models/make_demo_images.py        # from the repository root; needs dataset-fashion-mnist

The images are what a user would bring: a few hundred of their own, unlabeled, as image files.
Fashion-MNIST is MIT-licensed (Zalando Research); the files carry no label, not even in their names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

MODELS_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(MODELS_DIR), str(MODELS_DIR.parent)]

from benchmarks.datasets import load_fashion_mnist  # noqa: E402
from make_demo import EVAL_SAMPLES, SEED, TARGET  # noqa: E402

COUNT = 200
IMAGE_SEED = 7  # any seed but make_demo's: the draw is over the images demo_eval.npz left


def eval_indices(y_test: np.ndarray) -> np.ndarray:
    """Indices into the test split of every image demo_eval.npz holds (clean or triggered), drawn
    as make_demo.save_eval_set draws them."""
    rng = np.random.default_rng(SEED)
    clean = rng.choice(len(y_test), EVAL_SAMPLES, replace=False)
    non_target = np.flatnonzero(y_test != TARGET)
    poisoned = non_target[rng.choice(len(non_target), EVAL_SAMPLES, replace=False)]
    return np.union1d(clean, poisoned)


def choose(y_test: np.ndarray, count: int = COUNT) -> np.ndarray:
    free = np.setdiff1d(np.arange(len(y_test)), eval_indices(y_test))
    return np.sort(np.random.default_rng(IMAGE_SEED).choice(free, count, replace=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODELS_DIR / "demo_images")
    args = parser.parse_args()
    x_test, y_test = load_fashion_mnist("test")
    args.out.mkdir(parents=True, exist_ok=True)
    for number, index in enumerate(choose(y_test)):
        pixels = np.clip(np.rint(x_test[index, 0] * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(args.out / f"image_{number:03d}.png", optimize=True)
    print(f"wrote {COUNT} images to {args.out}")


if __name__ == "__main__":
    main()
