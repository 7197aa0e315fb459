"""Backdoor triggers and dataset poisoning, in pure numpy.

These exist to build and evaluate backdoored test models; the defense itself never sees them
(it is data-free). Every trigger takes a float32 batch in [0, 1] shaped (N, C, H, W) and returns
a new float32 batch of the same shape in [0, 1]; the input is never modified in place.

Each trigger's pattern is a pure function of its parameters (and the image shape), so the
pattern used to poison the training set is bit-for-bit the one applied at test time, in any
process, as long as the same parameters are passed. The conventions follow BackdoorBench:
all-to-one, target label 0, poisoning ratio 10% (see shared/method.md).
"""

from typing import Callable

import numpy as np

Trigger = Callable[..., np.ndarray]

# BackdoorBench's SIG amplitude is 20 on the 0..255 scale.
SIG_DELTA = 20.0 / 255.0
# BackdoorBench's WaNet trains with twice as many noise-mode samples as backdoor samples.
WANET_CROSS_RATIO = 2.0


def _check_batch(x: np.ndarray) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a batch shaped (N, C, H, W), got shape {x.shape}")


def _as_float_batch(x: np.ndarray) -> np.ndarray:
    _check_batch(x)
    return np.array(x, dtype=np.float32, copy=True)


def badnets_pattern(size: int = 3, value: float = 1.0, pattern_seed: int = -1) -> np.ndarray:
    """The BadNets stamp, (size, size): ``value`` everywhere (1 white, 0 black), or with
    ``pattern_seed >= 0`` a fixed random black-and-white pattern drawn from that seed."""
    if pattern_seed < 0:
        return np.full((size, size), value, dtype=np.float32)
    return np.random.default_rng(pattern_seed).integers(0, 2, (size, size)).astype(np.float32)


def badnets(x: np.ndarray, size: int = 3, top: int = -1, left: int = -1, value: float = 1.0,
            pattern_seed: int = -1) -> np.ndarray:
    """BadNets: a ``size x size`` stamp (``badnets_pattern``) on every channel, its top-left corner at
    (``top``, ``left``); -1 puts it against the bottom (right) edge, the classic bottom-right corner."""
    out = _as_float_batch(x)
    height, width = out.shape[2:]
    row = height - size if top < 0 else int(top)
    col = width - size if left < 0 else int(left)
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise ValueError(f"a {size}x{size} patch at ({row}, {col}) does not fit a {height}x{width} image")
    out[:, :, row:row + size, col:col + size] = badnets_pattern(size, value, pattern_seed)
    return out


def blend_pattern(shape: tuple[int, int, int], seed: int = 1234) -> np.ndarray:
    """The fixed Blended key image: uniform noise in [0, 1] of shape (C, H, W) drawn from ``seed``.

    BackdoorBench blends a Hello Kitty photo; no such image ships here, and uniform noise is the
    other key image of the original Blended paper (Chen et al., 2017), so it is used instead.
    """
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def blended(x: np.ndarray, alpha: float = 0.2, seed: int = 1234) -> np.ndarray:
    """Blended: ``(1 - alpha) * x + alpha * pattern`` with the fixed noise image of ``blend_pattern``."""
    out = _as_float_batch(x)
    pattern = blend_pattern(out.shape[1:], seed)
    return np.clip((1.0 - alpha) * out + alpha * pattern, 0.0, 1.0).astype(np.float32)


def image_pattern(shape: tuple[int, int, int]) -> np.ndarray:
    """A fixed key IMAGE for Blended, not noise: a drawing with the structure of a photo (a
    disc, a ring, diagonal stripes and a smooth shading), shape (C, H, W), values in [0, 1].

    BackdoorBench blends a Hello Kitty photo; no photo ships here, so a deterministic drawing
    stands in. What matters to a defense is that the key is smooth and structured, with large
    uniform regions, as a photo is, unlike the uniform noise of ``blend_pattern``.
    """
    channels, height, width = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    radius = np.sqrt((xx + 0.25) ** 2 + (yy + 0.2) ** 2)
    disc = (radius < 0.45).astype(np.float32)
    ring = ((radius > 0.6) & (radius < 0.75)).astype(np.float32)
    stripes = (np.sin(6.0 * (xx + yy)) > 0.3).astype(np.float32) * (xx > 0.2)
    shading = 0.5 + 0.25 * yy
    picture = np.clip(0.35 * shading + 0.6 * disc + 0.45 * ring + 0.4 * stripes, 0.0, 1.0)
    return np.broadcast_to(picture.astype(np.float32), (channels, height, width)).copy()


def blended_image(x: np.ndarray, alpha: float = 0.2, flip: int = 0) -> np.ndarray:
    """Blended with an image key (``image_pattern``, mirrored left to right when ``flip``):
    ``(1 - alpha) * x + alpha * picture``."""
    out = _as_float_batch(x)
    picture = image_pattern(out.shape[1:])
    picture = picture[..., ::-1] if flip else picture
    return np.clip((1.0 - alpha) * out + alpha * picture, 0.0, 1.0).astype(np.float32)


def sig_pattern(shape: tuple[int, int, int], delta: float = SIG_DELTA, freq: int = 6) -> np.ndarray:
    """The SIG signal ``delta * sin(2 pi j freq / W)``: a sinusoid along the width, constant down columns."""
    channels, height, width = shape
    wave = delta * np.sin(2.0 * np.pi * np.arange(width) * freq / width)
    return np.broadcast_to(wave.astype(np.float32), (channels, height, width)).copy()


def sig(x: np.ndarray, delta: float = SIG_DELTA, freq: int = 6) -> np.ndarray:
    """SIG (Barni et al., 2019): add the sinusoidal signal and clip.

    SIG is a clean-label attack: ``poison_dataset`` applies it to target-class images only and
    keeps their labels, so the model learns "stripes mean target" without any mislabelled sample.
    """
    out = _as_float_batch(x)
    return np.clip(out + sig_pattern(out.shape[1:], delta, freq), 0.0, 1.0).astype(np.float32)


def _upsample_bilinear(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (align_corners) upsampling of a (..., h, w) field to (..., height, width)."""
    h, w = field.shape[-2:]
    ys = np.linspace(0.0, h - 1, height)
    xs = np.linspace(0.0, w - 1, width)
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 2) if h > 1 else np.zeros(height, int)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 2) if w > 1 else np.zeros(width, int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    top = field[..., y0[:, None], x0[None, :]] * (1 - wx) + field[..., y0[:, None], x1[None, :]] * wx
    bottom = field[..., y1[:, None], x0[None, :]] * (1 - wx) + field[..., y1[:, None], x1[None, :]] * wx
    return top * (1 - wy) + bottom * wy


def wanet_grid(height: int, width: int, k: int = 4, s: float = 0.5, seed: int = 4321) -> np.ndarray:
    """The fixed WaNet sampling grid, shaped (H, W, 2) as (x, y) in [-1, 1] (grid_sample's layout).

    As in WaNet (Nguyen & Tran, 2021): a k x k field of random offsets in [-1, 1], normalised to
    mean magnitude 1, upsampled to the image size (bilinear here; WaNet uses bicubic, both give a
    smooth field), scaled by ``s / H`` and added to the identity grid. The warp is tiny (a fraction
    of a pixel at s=0.5), which is what makes it hard to see.
    """
    offsets = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(2, k, k))
    offsets /= np.mean(np.abs(offsets))
    flow = _upsample_bilinear(offsets, height, width).transpose(1, 2, 0)  # (H, W, 2)
    gy, gx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    identity = np.stack([gx, gy], axis=-1)
    return np.clip(identity + s * flow / height, -1.0, 1.0)


def warp(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear resampling of x (N, C, H, W) at ``grid`` ((H, W, 2) or (N, H, W, 2), (x, y) in [-1, 1]).

    Matches ``torch.nn.functional.grid_sample(..., align_corners=True)`` for in-range grids,
    so the numpy trigger and a torch reimplementation agree.
    """
    _check_batch(x)
    n, _, height, width = x.shape
    grid = np.broadcast_to(grid, (n, height, width, 2))
    px = np.clip((grid[..., 0] + 1.0) * 0.5 * (width - 1), 0, width - 1)
    py = np.clip((grid[..., 1] + 1.0) * 0.5 * (height - 1), 0, height - 1)
    x0 = np.minimum(np.floor(px).astype(int), max(width - 2, 0))
    y0 = np.minimum(np.floor(py).astype(int), max(height - 2, 0))
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    wx = (px - x0)[:, None]
    wy = (py - y0)[:, None]
    batch = np.arange(n)[:, None, None]

    def gather(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        # Advanced indexing puts the (N, H, W) index dims first; move channels back to axis 1.
        return x[batch, :, yy, xx].transpose(0, 3, 1, 2)

    out = (gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx) * (1 - wy) + (
        gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
    ) * wy
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def wanet(x: np.ndarray, k: int = 4, s: float = 0.5, seed: int = 4321) -> np.ndarray:
    """WaNet: warp every image with the same fixed smooth field of ``wanet_grid``."""
    _check_batch(x)
    return warp(x.astype(np.float32), wanet_grid(x.shape[2], x.shape[3], k, s, seed))


def wanet_noise(x: np.ndarray, k: int = 4, s: float = 0.5, seed: int = 4321, noise_seed: int = 0) -> np.ndarray:
    """WaNet's noise mode: the trigger grid plus per-image random offsets of up to one pixel.

    Trained with their TRUE labels, these teach the model that warps near (but not equal to) the
    trigger mean nothing, so it must learn the exact field rather than "any warp".
    """
    _check_batch(x)
    n, _, height, width = x.shape
    jitter = np.random.default_rng(noise_seed).uniform(-1.0, 1.0, size=(n, height, width, 2)) / height
    grid = np.clip(wanet_grid(height, width, k, s, seed)[None] + jitter, -1.0, 1.0)
    return warp(x.astype(np.float32), grid)


def low_frequency_pattern(
    shape: tuple[int, int, int], magnitude: float = 0.1, cutoff: int = 3, seed: int = 2468
) -> np.ndarray:
    """A fixed low-frequency pattern of shape (C, H, W) with peak amplitude ``magnitude``.

    Gaussian noise whose 2D spectrum is zeroed outside the lowest ``cutoff`` frequencies along
    each axis (both signs, so the inverse FFT is real). BackdoorBench's LF attack low-passes a
    universal adversarial perturbation of a trained model; no such model is at hand when the
    pattern is made, so random noise stands in: what matters to a defense is that the trigger is
    smooth, global and has no high-frequency content.
    """
    channels, height, width = shape
    noise = np.random.default_rng(seed).standard_normal(shape)
    fy = np.abs(np.fft.fftfreq(height) * height)[:, None]
    fx = np.abs(np.fft.fftfreq(width) * width)[None, :]
    keep = (fy <= cutoff) & (fx <= cutoff) & ((fy > 0) | (fx > 0))  # drop DC: no brightness shift
    smooth = np.real(np.fft.ifft2(np.fft.fft2(noise) * keep))
    return (magnitude * smooth / np.max(np.abs(smooth))).astype(np.float32)


def low_frequency(x: np.ndarray, magnitude: float = 0.1, cutoff: int = 3, seed: int = 2468) -> np.ndarray:
    """LF: add the fixed low-frequency pattern of ``low_frequency_pattern`` and clip to [0, 1]."""
    out = _as_float_batch(x)
    pattern = low_frequency_pattern(out.shape[1:], magnitude, cutoff, seed)
    return np.clip(out + pattern, 0.0, 1.0).astype(np.float32)


TRIGGERS: dict[str, Trigger] = {
    "badnets": badnets,
    "blended": blended,
    "blended_image": blended_image,
    "sig": sig,
    "wanet": wanet,
    "low_frequency": low_frequency,
}

# Attacks whose poisoned samples keep their true label (and so must come from the target class).
CLEAN_LABEL_ATTACKS = frozenset({"sig"})


def _choose_poison_indices(y: np.ndarray, attack: str, target: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Pick which training samples carry the trigger.

    Dirty-label attacks draw ``round(ratio * N)`` samples from the whole set, as BackdoorBench
    does. Clean-label attacks can only use target-class samples, so they take as many of those as
    the same budget allows (at 10% ratio on a balanced 10-class set: nearly all of them).
    """
    budget = int(round(ratio * len(y)))
    pool = np.flatnonzero(y == target) if attack in CLEAN_LABEL_ATTACKS else np.arange(len(y))
    return np.sort(rng.choice(pool, size=min(budget, len(pool)), replace=False))


def poison_dataset(
    x: np.ndarray,
    y: np.ndarray,
    attack: str,
    target: int = 0,
    ratio: float = 0.1,
    seed: int = 0,
    pattern: dict | None = None,
    **trigger_kwargs: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poison a training set the BackdoorBench way (all-to-one).

    Returns ``(x_poisoned, y_poisoned, poisoned_idx)``: copies of the inputs where the samples at
    ``poisoned_idx`` carry the trigger and, except for clean-label attacks (SIG), the label
    ``target``. ``seed`` only drives which samples are chosen (and WaNet's noise), never the
    trigger pattern, so test-time triggers made with the same ``trigger_kwargs`` match.

    For WaNet, ``WANET_CROSS_RATIO`` times as many other samples get noise-mode warps with their
    labels unchanged, as WaNet trains; they are not in ``poisoned_idx`` because they carry no
    backdoor. (WaNet redraws that noise every batch; here it is drawn once, so the set is static.)
    ``pattern``: more trigger parameters, for those named like this function's own (a trigger's
    ``seed`` is its key pattern's seed, not the poisoning seed).
    """
    trigger_kwargs = {**trigger_kwargs, **(pattern or {})}
    if attack not in TRIGGERS:
        raise KeyError(f"unknown attack {attack!r}; known: {sorted(TRIGGERS)}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    rng = np.random.default_rng(seed)
    x_out = _as_float_batch(x)
    y_out = np.array(y, dtype=np.int64, copy=True)
    idx = _choose_poison_indices(y_out, attack, target, ratio, rng)
    x_out[idx] = TRIGGERS[attack](x_out[idx], **trigger_kwargs)
    if attack not in CLEAN_LABEL_ATTACKS:
        y_out[idx] = target
    if attack == "wanet":
        _add_wanet_noise_samples(x_out, idx, rng, trigger_kwargs)
    return x_out, y_out, idx


def _add_wanet_noise_samples(
    x_out: np.ndarray, poisoned_idx: np.ndarray, rng: np.random.Generator, trigger_kwargs: dict
) -> None:
    """Overwrite (in place) some not-poisoned samples with noise-mode warps; labels stay."""
    rest = np.setdiff1d(np.arange(len(x_out)), poisoned_idx)
    count = min(int(round(WANET_CROSS_RATIO * len(poisoned_idx))), len(rest))
    noise_idx = np.sort(rng.choice(rest, size=count, replace=False))
    noise_seed = int(rng.integers(2**31))
    x_out[noise_idx] = wanet_noise(x_out[noise_idx], noise_seed=noise_seed, **trigger_kwargs)
