"""scikit-learn's handwritten digits: the data set diffax trains on by default.

1797 grayscale 8x8 images of the digits 0-9 (labels 0-9), shipped inside the
scikit-learn package, so the default run needs no download. Pixel values are
0..16; we scale them to 0..255 and upsample with `prepare_image` (bicubic, see
there why) to the model's resolution. The whole set is a few MB at 32x32, so it
is prepared once and held in memory.
"""

from __future__ import annotations

import functools

import numpy as np

from diffax.data.folder import prepare_image

NUM_CLASSES = 10
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@functools.lru_cache(maxsize=4)
def load_digits_arrays(image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as read-only arrays: images uint8 [1797, S, S, C] and labels int64 [1797] (cached)."""
    try:
        from sklearn.datasets import load_digits  # Optional: only the demo data needs scikit-learn.
    except ImportError as e:
        raise ImportError(
            "data.source='digits' needs scikit-learn: `pip install scikit-learn` "
            "(or `pip install 'diffax[demo]'`)") from e
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], 0..255
    images = np.stack([prepare_image(p, image_size, channels) for p in pixels])  # [N, S, S, C]
    labels = digits.target.astype(np.int64)  # [N]
    images.setflags(write=False)  # Cached and shared between sources: nobody may edit it.
    labels.setflags(write=False)
    return images, labels


def _one_field(template: str) -> bool:
    """Whether `template.format(word)` fills exactly one `{}`."""
    try:
        return template.count("{}") == 1 and template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError):
        return False


class DigitsSource:
    """A grain random-access source over scikit-learn's 8x8 digits.

    Records are `{'image': uint8 [S, S, C], 'label': int64 scalar in 0..9}`, plus `'caption'` (a str)
    with a caption template.
    """

    def __init__(self, *, image_size: int = 16, channels: int = 1, caption_template: str | None = None):
        """Loads and resizes the digits (cached per (image_size, channels)).

        Args:
            image_size: side of the square output images (8 keeps the originals).
            channels: 1 (grayscale) or 3 (the gray value repeated as RGB).
            caption_template: e.g. "a handwritten {}": each record's caption is the template formatted with
                its digit's English word ("a handwritten seven"); None: no captions.

        Raises:
            ValueError: a caption template without exactly one `{}`.
        """
        if caption_template is not None and not _one_field(caption_template):
            raise ValueError(f"data.caption_template must hold one '{{}}' for the digit's word, got "
                             f"{caption_template!r}")
        self.image_size = image_size
        self.channels = channels
        self.caption_template = caption_template
        self.num_classes: int = NUM_CLASSES
        self.class_names: list[str] = [str(d) for d in range(NUM_CLASSES)]
        self._images, self._labels = load_digits_arrays(image_size, channels)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        record = {'image': self._images[index], 'label': self._labels[index]}
        if self.caption_template is not None:
            record['caption'] = self.caption_template.format(NUMBER_WORDS[self._labels[index]])
        return record

    def __repr__(self) -> str:
        return f'DigitsSource(image_size={self.image_size}, channels={self.channels})'
