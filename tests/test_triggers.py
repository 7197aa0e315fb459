"""Fast checks of the numpy triggers and of BackdoorBench-style poisoning, on synthetic data."""

import numpy as np
import pytest

from benchmarks import triggers
from benchmarks.triggers import TRIGGERS, poison_dataset

ALL_ATTACKS = sorted(TRIGGERS)


def synthetic_batch(n: int = 6, channels: int = 1, size: int = 28, seed: int = 0) -> np.ndarray:
    # Values kept inside (0.1, 0.9) so that every trigger has room to move pixels both ways.
    return np.random.default_rng(seed).uniform(0.1, 0.9, size=(n, channels, size, size)).astype(np.float32)


@pytest.mark.parametrize("attack", ALL_ATTACKS)
@pytest.mark.parametrize("channels", [1, 3])
def test_trigger_keeps_shape_dtype_and_range(attack: str, channels: int) -> None:
    x = synthetic_batch(channels=channels)
    out = TRIGGERS[attack](x)
    assert out.shape == x.shape
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.isfinite(out).all()


@pytest.mark.parametrize("attack", ALL_ATTACKS)
def test_trigger_is_deterministic_and_leaves_input_alone(attack: str) -> None:
    x = synthetic_batch()
    before = x.copy()
    first, second = TRIGGERS[attack](x), TRIGGERS[attack](x.copy())
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("attack", ALL_ATTACKS)
def test_trigger_changes_the_image(attack: str) -> None:
    x = synthetic_batch()
    changed = np.abs(TRIGGERS[attack](x) - x).max(axis=(1, 2, 3))
    assert (changed > 1e-3).all(), f"{attack} left some image unchanged"


@pytest.mark.parametrize("attack", ALL_ATTACKS)
def test_trigger_is_a_fixed_pattern_across_calls(attack: str) -> None:
    # A backdoor needs the same trigger at train and test time, even applied one image at a time.
    x = synthetic_batch(n=4)
    whole = TRIGGERS[attack](x)
    one_by_one = np.concatenate([TRIGGERS[attack](x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(whole, one_by_one, atol=1e-6)


@pytest.mark.parametrize(
    ("attack", "kwargs"),
    [("blended", {"seed": 7}), ("wanet", {"seed": 7}), ("low_frequency", {"seed": 7}), ("sig", {"freq": 3})],
)
def test_trigger_parameters_change_the_pattern(attack: str, kwargs: dict) -> None:
    x = synthetic_batch()
    assert not np.allclose(TRIGGERS[attack](x), TRIGGERS[attack](x, **kwargs))


def test_badnets_changes_only_the_bottom_right_3x3_patch() -> None:
    x = synthetic_batch(channels=3)
    out = triggers.badnets(x)
    assert (out[:, :, -3:, -3:] == 1.0).all()
    outside = np.ones(x.shape[2:], dtype=bool)
    outside[-3:, -3:] = False
    np.testing.assert_array_equal(out[:, :, outside], x[:, :, outside])


def test_blended_is_the_alpha_mix_with_its_pattern() -> None:
    x = synthetic_batch()
    pattern = triggers.blend_pattern(x.shape[1:])
    np.testing.assert_allclose(triggers.blended(x, alpha=0.2), 0.8 * x + 0.2 * pattern, atol=1e-6)


def test_sig_is_stripes_constant_down_columns() -> None:
    x = np.full((2, 1, 28, 28), 0.5, dtype=np.float32)
    delta = (triggers.sig(x) - x)[0, 0]
    np.testing.assert_allclose(delta, np.broadcast_to(delta[0], delta.shape))
    assert np.abs(delta).max() == pytest.approx(triggers.SIG_DELTA, rel=0.05)


def test_wanet_is_a_small_smooth_warp() -> None:
    x = synthetic_batch()
    grid = triggers.wanet_grid(28, 28)
    identity_x = np.broadcast_to(np.linspace(-1, 1, 28)[None, :], (28, 28))
    shift_pixels = np.abs(grid[..., 0] - identity_x) * 27 / 2
    assert 0 < shift_pixels.max() < 2.0  # visible to a network, not to a person
    # A constant image is a fixed point of any in-range warp: the trigger only moves content.
    flat = np.full_like(x, 0.3)
    np.testing.assert_allclose(triggers.wanet(flat), flat, atol=1e-6)


def test_wanet_warp_matches_torch_grid_sample() -> None:
    import torch  # a dependency of the package: its absence is a failure, not a skip
    x = synthetic_batch(channels=3)
    grid = triggers.wanet_grid(28, 28)
    expected = torch.nn.functional.grid_sample(
        torch.from_numpy(x), torch.from_numpy(np.repeat(grid[None], len(x), 0)).float(), align_corners=True
    ).numpy()
    np.testing.assert_allclose(triggers.wanet(x), expected, atol=1e-5)


def test_low_frequency_pattern_has_no_high_frequencies() -> None:
    pattern = triggers.low_frequency_pattern((1, 28, 28), magnitude=0.1, cutoff=3)
    assert np.abs(pattern).max() == pytest.approx(0.1)
    spectrum = np.abs(np.fft.fft2(pattern[0]))
    freqs = np.abs(np.fft.fftfreq(28) * 28)
    high = (freqs[:, None] > 3) | (freqs[None, :] > 3)
    assert spectrum[high].max() < 1e-6 * spectrum.max()


def labelled_set(n: int = 1000, classes: int = 10, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_batch(n=n, size=8, seed=seed), np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("attack", ["badnets", "blended", "wanet", "low_frequency"])
def test_poison_dataset_dirty_label_share_and_labels(attack: str) -> None:
    x, y = labelled_set()
    xp, yp, idx = poison_dataset(x, y, attack, target=0, ratio=0.1, seed=0)
    assert len(idx) == 100 and len(np.unique(idx)) == 100
    assert (yp[idx] == 0).all()
    untouched_labels = np.setdiff1d(np.arange(len(y)), idx)
    np.testing.assert_array_equal(yp[untouched_labels], y[untouched_labels])
    np.testing.assert_allclose(xp[idx], TRIGGERS[attack](x[idx]), atol=1e-6)
    assert xp.dtype == np.float32 and yp.dtype == np.int64


@pytest.mark.parametrize("attack", ["badnets", "blended", "low_frequency"])
def test_poison_dataset_leaves_other_images_untouched(attack: str) -> None:
    x, y = labelled_set()
    xp, _, idx = poison_dataset(x, y, attack)
    rest = np.setdiff1d(np.arange(len(y)), idx)
    np.testing.assert_array_equal(xp[rest], x[rest])


def test_poison_dataset_wanet_adds_noise_mode_samples_with_true_labels() -> None:
    x, y = labelled_set()
    xp, yp, idx = poison_dataset(x, y, "wanet")
    rest = np.setdiff1d(np.arange(len(y)), idx)
    noised = rest[np.abs(xp[rest] - x[rest]).max(axis=(1, 2, 3)) > 0]
    assert len(noised) == int(triggers.WANET_CROSS_RATIO * len(idx))
    np.testing.assert_array_equal(yp[noised], y[noised])
    # Noise-mode images differ from the exact trigger, or the model could not tell them apart.
    assert not np.allclose(xp[noised], triggers.wanet(x[noised]), atol=1e-4)


def test_poison_dataset_sig_is_clean_label() -> None:
    x, y = labelled_set()
    xp, yp, idx = poison_dataset(x, y, "sig", target=0, ratio=0.1)
    n_target = int((y == 0).sum())
    assert len(idx) == min(100, n_target) > 0
    assert (y[idx] == 0).all()
    np.testing.assert_array_equal(yp, y)
    rest = np.setdiff1d(np.arange(len(y)), idx)
    np.testing.assert_array_equal(xp[rest], x[rest])
    assert not np.allclose(xp[idx], x[idx])


def test_poison_dataset_is_deterministic_per_seed() -> None:
    x, y = labelled_set()
    a = poison_dataset(x, y, "wanet", seed=3)
    b = poison_dataset(x, y, "wanet", seed=3)
    c = poison_dataset(x, y, "wanet", seed=4)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)
    assert not np.array_equal(a[2], c[2])


def test_poison_dataset_does_not_modify_its_inputs() -> None:
    x, y = labelled_set()
    x_before, y_before = x.copy(), y.copy()
    poison_dataset(x, y, "badnets")
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)


def test_poison_dataset_rejects_unknown_attack() -> None:
    x, y = labelled_set(n=10)
    with pytest.raises(KeyError, match="unknown attack"):
        poison_dataset(x, y, "no_such_attack")


def test_image_key_is_a_structured_picture_not_noise():
    """The image key of ``blended_image``: deterministic, in [0, 1], and smooth like a photo
    (neighbouring pixels mostly equal), where the noise key of ``blend_pattern`` is not."""
    picture = triggers.image_pattern((3, 28, 28))
    assert np.array_equal(picture, triggers.image_pattern((3, 28, 28)))
    assert picture.min() >= 0.0 and picture.max() <= 1.0 and np.ptp(picture) > 0.5
    assert np.array_equal(picture[0], picture[2])

    def roughness(image: np.ndarray) -> float:
        return float(np.mean(np.abs(np.diff(image, axis=-1))))

    assert roughness(picture) < roughness(triggers.blend_pattern((3, 28, 28))) / 3
    x = np.zeros((2, 3, 28, 28), np.float32)
    assert np.allclose(TRIGGERS["blended_image"](x, alpha=0.2), 0.2 * picture, atol=1e-6)
