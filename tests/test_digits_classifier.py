"""Tests for diffax.evaluation.digits_classifier: the judge of class-conditional digit samples."""

import numpy as np
import pytest

from diffax.data.digits import load_digits_arrays
from diffax.evaluation.digits_classifier import class_accuracy, main, npz_class_accuracy


def _noisy(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, std, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size,channels", [(16, 1), (32, 3)])
def test_right_labels_score_high_and_wrong_labels_low(size, channels):
    images, labels = load_digits_arrays(size, channels)
    # Generated digits are never clean: the judge must hold up under visible pixel noise.
    images = _noisy(images, std=40.0)
    assert class_accuracy(images, labels) > 0.95
    assert class_accuracy(images, (labels + 1) % 10) < 0.05  # every label wrong
    shuffled = np.random.default_rng(1).permutation(labels)
    assert abs(class_accuracy(images, shuffled) - 0.1) < 0.05  # labels independent of images: chance


def test_pure_noise_is_not_any_particular_digit():
    noise = np.random.default_rng(0).integers(0, 256, (500, 16, 16, 1), dtype=np.uint8)
    labels = np.arange(500) % 10
    assert class_accuracy(noise, labels) < 0.3


def test_npz_round_trip_and_cli(tmp_path, capsys):
    images, labels = load_digits_arrays(16, 1)
    path = tmp_path / "samples.npz"
    np.savez(path, images=images[:50], labels=labels[:50])
    accuracy, n = npz_class_accuracy(path)
    assert n == 50 and accuracy > 0.95
    main([str(path)])
    assert "50 samples, class accuracy" in capsys.readouterr().out


def test_bad_input_names_the_file_and_key(tmp_path):
    path = tmp_path / "latents.npz"
    np.savez(path, latents=np.zeros((2, 4, 4, 4), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"latents\.npz: no 'images' array"):
        npz_class_accuracy(path)
    images, labels = load_digits_arrays(16, 1)
    with pytest.raises(ValueError, match="uint8"):
        class_accuracy(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="digits 0..9"):
        class_accuracy(images[:3], np.array([0, 1, 10]))
    with pytest.raises(ValueError, match=r"labels must be \[3\]"):
        class_accuracy(images[:3], labels[:2])
    with pytest.raises(SystemExit, match="No such file"):
        main([str(tmp_path / "missing.npz")])
