"""Class accuracy of digit samples: does the model draw the digit it was asked for?

    python -m diffax.evaluation.digits_classifier runs/digits/samples.npz

An RBF support-vector classifier fitted on all 1797 real scikit-learn digits, at the samples' resolution and
prepared exactly as the training data (`diffax.data.digits`), labels each generated image; the accuracy is the
fraction whose predicted digit is the label it was sampled with. On real digits the classifier is ~99% right
(held-out split), so a low score means the samples, not the judge. Chance is 10%: a model that ignores its
label scores near it however clean its strokes are, which is what a loss curve cannot show.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

from diffax.data.digits import NUM_CLASSES, load_digits_arrays


def _features(images: np.ndarray) -> np.ndarray:  # [N, S, S, C] uint8 -> [N, S*S] float in [0, 1]
    gray = images.astype(np.float64).mean(axis=-1)  # RGB digits repeat the gray value; grayscale keeps it
    return gray.reshape(len(images), -1) / 255.0


@functools.lru_cache(maxsize=4)
def digits_classifier(image_size: int):
    """An SVC fitted on every real digit at `image_size` (cached; fitting takes about a second)."""
    from sklearn.svm import SVC  # Optional dependency, like the digits themselves.
    images, labels = load_digits_arrays(image_size, channels=1)
    return SVC(gamma="scale").fit(_features(images), labels)


def class_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `images` ([N, S, S, C] uint8, square, C 1 or 3) that the real-digits classifier
    labels as `labels` ([N] ints in 0..9)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise ValueError(f"images must be [N, S, S, 1 or 3], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255) as sample.py writes them, got {images.dtype}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [{len(images)}], got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be digits 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    predicted = digits_classifier(images.shape[1]).predict(_features(images))
    return float(np.mean(predicted == labels))


def npz_class_accuracy(path: str | Path) -> tuple[float, int]:
    """(accuracy, number of samples) of an .npz written by sample.py (`images`, `labels`)."""
    with np.load(path) as data:
        for key in ("images", "labels"):
            if key not in data:
                raise ValueError(f"{path}: no '{key}' array (found {sorted(data.files)}); "
                                 f"write it with sample.py --out=....npz from a digits model")
        images, labels = data["images"], data["labels"]
    try:
        return class_accuracy(images, labels), len(labels)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def main(argv: list[str]) -> None:
    """Print the class accuracy of each .npz named on the command line."""
    if not argv:
        sys.exit(__doc__)
    for path in argv:
        try:
            accuracy, n = npz_class_accuracy(path)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        print(f"{path}: {n} samples, class accuracy {accuracy:.1%} (chance 10%)")


if __name__ == "__main__":
    main(sys.argv[1:])
