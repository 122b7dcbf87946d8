"""Tests for diffax.evaluation.inception: pytorch-fid's FID Inception-v3 in Flax, converted from its
weight file, against pytorch-fid's own network (pytorch_fid/inception.py, unchanged) on random weights.

pytorch-fid imports torchvision, whose PyPI build for torch 2.13 needs CUDA libraries; the test gives it
diffax's own torch implementation of the torchvision Inception blocks it builds on
(tests/inception_reference.py).
"""
import importlib
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffax.convert.io import CheckpointError
from diffax.evaluation.fid import frechet_distance, main as fid_main
from diffax.evaluation.inception import NUM_FEATURES, inception_features, load_inception_params, prepare
from tests import inception_reference


def _random_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the pytorch-fid file's layout: He-normal convolutions (activations keep their scale
    through the 90-odd layers) and batch-norm statistics far from the identity."""
    g = torch.Generator().manual_seed(seed)
    net = inception_reference.inception_v3(num_classes=1008, aux_logits=False, init_weights=False)
    sd = {}
    for key, value in net.state_dict().items():
        if key.endswith("conv.weight"):
            fan_in = math.prod(value.shape[1:])
            value = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            value = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            value = torch.randn(value.shape, generator=g) * 0.2
        elif key.startswith("fc."):
            value = torch.randn(value.shape, generator=g) * 0.01
        sd[key] = value
    return sd


@pytest.fixture
def pytorch_fid_inception(monkeypatch):
    """pytorch-fid's inception module, imported over tests/inception_reference.py in place of torchvision."""
    inception_reference.install_as_torchvision(monkeypatch)
    monkeypatch.delitem(sys.modules, "pytorch_fid.inception", raising=False)
    monkeypatch.delitem(sys.modules, "pytorch_fid.fid_score", raising=False)
    module = importlib.import_module("pytorch_fid.inception")
    yield module
    for name in ("pytorch_fid.inception", "pytorch_fid.fid_score"):  # they hold the stand-in torchvision
        sys.modules.pop(name, None)


def test_features_match_pytorch_fid_on_random_weights(pytorch_fid_inception, tmp_path, monkeypatch):
    sd = _random_fid_state_dict()
    path = tmp_path / "pt_inception-random.pth"
    torch.save(sd, path)
    # pytorch-fid fetches its weights by URL; here its loader returns the random file's state dict.
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(path))
    torch_net = pytorch_fid_inception.InceptionV3([3]).eval()
    params = load_inception_params(path)

    # uint8 images at 40x40 (pytorch-fid feeds [0, 1] floats; it resizes to 299 and scales to [-1, 1]).
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    with torch.no_grad():
        want = torch_net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0].numpy()
    got = inception_features(params, images, batch_size=2)
    assert got.shape == (2, NUM_FEATURES) and want.shape == (2, NUM_FEATURES)
    assert np.abs(want).max() > 0.1  # the random network's features are not vanishing
    # fp32 through 94 convolutions and a 299x299 resize: within 1e-4 of the largest feature.
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)

    # The command line's statistics of the same images, from the same file (same shapes: no new compile).
    np.savez(tmp_path / "images.npz", images=images)
    fid_main(["--inception", str(path), "--batch_size=2", "--save_stats", str(tmp_path / "stats.npz"),
              str(tmp_path / "images.npz")])
    with np.load(tmp_path / "stats.npz") as stats:
        np.testing.assert_allclose(stats["mu"], want.mean(0), atol=1e-4 * np.abs(want).max())
        assert int(stats["count"]) == 2


@pytest.mark.parametrize("n1,n2", [(500, 300), (20, 30)])  # the second: singular covariances (64 features)
def test_frechet_distance_matches_pytorch_fid(pytorch_fid_inception, n1, n2):
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(n1)
    a, b = rng.normal(size=(n1, 64)), rng.normal(size=(n2, 64)) * 1.3 + 0.2
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    want = calculate_frechet_distance(*stats[0], *stats[1])
    assert frechet_distance(*stats) == pytest.approx(want, rel=1e-12)


def test_resize_matches_torch_bilinear():
    # Up and down to 299, non-square: torch's bilinear with align_corners=False and no antialiasing.
    x = np.random.default_rng(1).uniform(0, 1, (1, 37, 450, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).numpy() * 2 - 1
    np.testing.assert_allclose(np.asarray(prepare(x)), want, atol=2e-6)
    grey = np.full((1, 8, 8, 1), 255, np.uint8)
    np.testing.assert_array_equal(np.asarray(prepare(grey, None)), np.ones((1, 8, 8, 3), np.float32))


def test_bad_weight_files_name_the_file_and_keys(tmp_path):
    sd = _random_fid_state_dict()
    del sd["Mixed_7c.branch_pool.conv.weight"]
    sd["Mixed_7c.branch_pool.conv.bias"] = torch.zeros(192)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"broken\.pth: missing: Mixed_7c/branch_pool/conv/kernel") as e:
        load_inception_params(path)
    assert "unexpected: Mixed_7c/branch_pool/conv/bias" in str(e.value)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(CheckpointError, match=r"other\.pth: no Inception tensors"):
        load_inception_params(other)
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, 1 or 3\]"):
        prepare(np.zeros((2, 8, 8), np.uint8))
