"""diffax.pipelines.canny against OpenCV's cv2.Canny (aperture 3, L1 gradient), the reference detector of
diffusers' ControlNet docs. The edges are integer arithmetic on both sides, so they must agree pixel for pixel;
only the optional Gaussian blur rounds differently from cv2.GaussianBlur's fixed point."""
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
from sklearn.datasets import load_sample_image  # noqa: E402

from diffax.pipelines.canny import canny  # noqa: E402


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    # Two photographs shipped with scikit-learn, cropped to [2, 160, 200, 3] to keep the test small.
    return np.stack([load_sample_image(n)[100:260, 200:400] for n in ("china.jpg", "flower.jpg")])


@pytest.mark.parametrize("low, high", [(100, 200), (50, 150), (10, 30), (99.5, 200.7), (200, 100)])
def test_photos_equal_opencv(photos, low, high):
    ours = canny(photos, low, high)
    assert ours.shape == photos.shape and ours.dtype == np.uint8
    assert np.array_equal(ours[..., 0], ours[..., 2])
    for image, edges in zip(photos, ours):
        ref = cv2.Canny(image, low, high)
        assert 0.01 < (ref > 0).mean() < 0.5  # a real edge map, not an empty or full one
        np.testing.assert_array_equal(edges[..., 0], ref)


def test_noise_ties_and_gray_equal_opencv():
    # Noise and a few-level blocky image stress the tie rules of non-maximum suppression; odd sizes the borders.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (17, 23, 3), dtype=np.uint8),
              (rng.integers(0, 4, (31, 9, 3)) * 60).astype(np.uint8),
              rng.integers(0, 256, (12, 15, 1), dtype=np.uint8)]
    for image in images:
        ref = cv2.Canny(image if image.shape[-1] == 3 else image[..., 0], 100, 200)
        np.testing.assert_array_equal(canny(image)[..., 0], ref)


def test_float_input_and_single_image(photos):
    image = photos[0]
    np.testing.assert_array_equal(canny(image.astype(np.float32) / 255), canny(image))
    np.testing.assert_array_equal(canny(image), canny(photos)[0])


def test_blur_agrees_with_opencv_gaussian(photos):
    # Measured: 0.9983 (china) and 0.9998 (flower) of the full photographs; the blur's rounding differs from
    # OpenCV's fixed-point filter by one level at a few pixels, which moves a few edge pixels.
    for image in photos:
        ref = cv2.Canny(cv2.GaussianBlur(image, (7, 7), 1.0, borderType=cv2.BORDER_REPLICATE), 100, 200)
        agree = (canny(image, sigma=1.0)[..., 0] == ref).mean()
        assert agree > 0.99, agree


def test_bad_input_is_one_line_error():
    with pytest.raises(ValueError, match="canny: image must be"):
        canny(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        canny(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        canny(np.zeros((8, 8, 3), np.int64))
