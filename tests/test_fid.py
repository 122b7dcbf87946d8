"""Tests for diffax.evaluation.fid: the Frechet distance, streaming statistics, the digits features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import linalg

from diffax.data.digits import load_digits_arrays
from diffax.evaluation.digits_features import digits_features, digits_logits, heldout_split, load_params
from diffax.evaluation.fid import (FeatureStats, digits_fid, digits_reference_stats, feature_stats,
                                   frechet_distance, precision_recall)


def _random_cov(rng: np.random.Generator, f: int) -> np.ndarray:
    a = rng.normal(size=(f, f))
    return a @ a.T / f + 0.1 * np.eye(f)


def _frechet_eigh(mu1, s1, mu2, s2) -> float:
    """The same distance by symmetric eigendecompositions: Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2)."""
    w, v = linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    inner = linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.maximum(inner, 0))))


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    # Commuting (diagonal) covariances: the closed form |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    np.testing.assert_allclose(frechet_distance((mu1, np.diag(s1)), (mu2, np.diag(s2))), expected, rtol=1e-10)
    # The same Gaussian is at distance 0; a shift by d is at |d|^2.
    c1 = _random_cov(rng, 16)
    assert abs(frechet_distance((mu1.repeat(2), c1), (mu1.repeat(2), c1))) < 1e-8
    assert frechet_distance((np.zeros(16), c1), (np.full(16, 0.5), c1)) == pytest.approx(16 * 0.25, abs=1e-8)
    # General (non-commuting) covariances against the eigendecomposition form.
    c2 = _random_cov(rng, 16)
    m1, m2 = rng.normal(size=16), rng.normal(size=16)
    np.testing.assert_allclose(frechet_distance((m1, c1), (m2, c2)), _frechet_eigh(m1, c1, m2, c2), rtol=1e-9)
    # Estimated from samples of those Gaussians: the estimate approaches the true distance.
    x1 = rng.multivariate_normal(m1, c1, 200_000)
    x2 = rng.multivariate_normal(m2, c2, 200_000)
    np.testing.assert_allclose(frechet_distance(feature_stats(x1), feature_stats(x2)),
                               _frechet_eigh(m1, c1, m2, c2), rtol=0.01)


def test_singular_covariances_take_the_eps_fallback():
    # Rank-1 covariances: sqrtm of their product is not finite; pytorch-fid's eps offset makes it so.
    u = np.zeros(4)
    u[0] = 1.0
    s1 = np.outer(u, u)
    s2 = np.outer(u[::-1], u[::-1])
    d = frechet_distance((np.zeros(4), s1), (np.zeros(4), s2))
    assert np.isfinite(d) and d == pytest.approx(2.0, abs=1e-2)


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    # Far from zero: a naive sum of squares in float64 would lose ~8 digits here.
    x = 1e4 + rng.normal(size=(1000, 12)) @ rng.normal(size=(12, 12))
    stats = FeatureStats()
    for lo, hi in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
        stats.update(x[lo:hi])
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    merged = feature_stats(x[:400]).merge(feature_stats(x[400:]))
    np.testing.assert_allclose(merged.cov(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    assert FeatureStats().merge(merged).count == 1000 and merged.merge(FeatureStats()).count == 1000
    # jax arrays reduce on the device in float32 (centred per batch), then merge in float64.
    device = FeatureStats()
    for i in range(0, 1000, 250):
        device.update(jnp.asarray(x[i:i + 250] - 1e4))
    np.testing.assert_allclose(device.cov(), np.cov(x, rowvar=False), rtol=1e-5, atol=1e-5)


def test_sharded_batches_accumulate_like_numpy(num_devices):
    assert num_devices == 8  # tests/conftest.py
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(512, 24)) * 3 + 5).astype(np.float32)
    stats = FeatureStats()
    for i in range(0, 512, 128):
        batch = jax.device_put(x[i:i + 128], NamedSharding(mesh, P("data")))
        assert len(batch.sharding.device_set) == 8
        stats.update(batch)
    np.testing.assert_allclose(stats.mean(), x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.cov(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-5, atol=1e-5)
    # The digits features of a sharded batch are computed where it lies, and agree with the host path.
    images, _ = load_digits_arrays(16, 1)
    sharded = jax.device_put(np.asarray(images[:64]), NamedSharding(mesh, P("data")))
    feats = digits_features(sharded)
    assert isinstance(feats, jax.Array) and feats.shape == (64, 64)
    np.testing.assert_allclose(np.asarray(feats), digits_features(images[:64]), rtol=1e-5, atol=1e-5)


def test_shipped_digits_network_classifies_held_out_digits():
    images, labels = load_digits_arrays(16, 1)
    _, held = heldout_split(len(labels))
    accuracy = np.mean(digits_logits(images[held]).argmax(-1) == labels[held])
    assert accuracy > 0.97
    assert float(load_params()[1]["heldout_accuracy"]) == pytest.approx(accuracy, abs=1e-3)


def test_digits_fid_separates_real_digits_from_noise():
    images, _ = load_digits_arrays(16, 1)
    feats = digits_features(images)
    half = np.random.default_rng(0).permutation(len(images))
    real_vs_real = frechet_distance(feature_stats(feats[half[:898]]), feature_stats(feats[half[898:]]))
    noise = np.random.default_rng(0).integers(0, 256, (500, 16, 16, 1), dtype=np.uint8)
    noise_fid = digits_fid(noise)
    assert real_vs_real < 15 and noise_fid > 20 * real_vs_real, (real_vs_real, noise_fid)
    # Blurred digits lie between the two.
    blurred = ((images[:500].astype(np.float32) + np.roll(images[:500], 2, axis=1)) / 2).astype(np.uint8)
    assert real_vs_real < digits_fid(blurred) < noise_fid
    # 32x32 RGB digits (float in [-1, 1]) are resized to the network's 16x16 and compare with real 32x32.
    rgb32, _ = load_digits_arrays(32, 3)
    assert digits_fid(rgb32[:900].astype(np.float32) / 127.5 - 1) < 2 * real_vs_real
    reference = digits_reference_stats(16)
    assert reference.count == len(images)
    reference.update(feats[:10])  # a copy: the cached statistics stay those of the real digits
    assert digits_reference_stats(16).count == len(images)


def _precision_recall_numpy(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, in float64 with full distance matrices."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    real_r = np.sort(dist(real, real), axis=1)[:, k]
    fake_r = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)
    return np.mean((d <= real_r[:, None]).any(0)), np.mean((d <= fake_r[None, :]).any(1))


@pytest.mark.parametrize("block_rows", [7, 1024])
def test_precision_recall_matches_the_definition(block_rows):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(size=(45, 5)) * 1.5 + 0.5
    got = precision_recall(real, fake, k=3, block_rows=block_rows)
    want = _precision_recall_numpy(real, fake, 3)
    assert 0.2 < want[0] < 0.9 and 0.2 < want[1] < 0.99  # neither measure is trivially 0 or 1 here
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_precision_recall():
    images, _ = load_digits_arrays(16, 1)
    feats = digits_features(images)
    half = np.random.default_rng(0).permutation(len(images))
    p, r = precision_recall(feats[half[:898]], feats[half[898:]])
    assert p > 0.8 and r > 0.8
    # Samples of a single class are realistic (precision) but cover one tenth of the data (recall).
    _, labels = load_digits_arrays(16, 1)
    p, r = precision_recall(feats, feats[labels == 3][:150])
    assert p > 0.8 and r < 0.3
    noise = np.random.default_rng(0).integers(0, 256, (300, 16, 16, 1), dtype=np.uint8)
    p, r = precision_recall(feats, digits_features(noise))
    assert p < 0.1 and r < 0.1


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"must be \[N, F\]"):
        FeatureStats().update(np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="5 channels, the statistics 4"):
        feature_stats(np.zeros((3, 4))).update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="need at least 2"):
        feature_stats(np.zeros((1, 4))).cov()
    with pytest.raises(ValueError, match="4 against 5 features"):
        frechet_distance((np.zeros(4), np.eye(4)), (np.zeros(5), np.eye(5)))
    with pytest.raises(ValueError, match=r"images must be \[N, S, S, 1 or 3\]"):
        digits_features(np.zeros((2, 16, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))


def test_command_line(tmp_path, capsys):
    from PIL import Image

    from diffax.evaluation.fid import main
    images, labels = load_digits_arrays(16, 1)
    half = np.random.default_rng(0).permutation(len(images))
    np.savez(tmp_path / "a.npz", images=images[half[:898]], labels=labels[half[:898]])
    folder = tmp_path / "b"
    folder.mkdir()
    for i in half[898:1198]:
        Image.fromarray(images[i][..., 0]).save(folder / f"{i:04d}.png")
    main([str(tmp_path / "a.npz"), str(folder)])
    out = capsys.readouterr().out
    fid = float(out.split()[1])
    want = frechet_distance(feature_stats(digits_features(images[half[:898]])),
                            feature_stats(digits_features(images[np.sort(half[898:1198])])))
    assert fid == pytest.approx(want, abs=1e-3) and "a.npz: 898" in out and "b: 300" in out
    # Statistics written once and reused; 'digits' is every real digit at the other input's size.
    main(["--save_stats", str(tmp_path / "b_stats.npz"), str(folder)])
    main([str(tmp_path / "b_stats.npz"), "digits"])
    main([str(folder), "digits"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1] == lines[2].split()[1]
    with np.load(tmp_path / "b_stats.npz") as stats:  # pytorch-fid's keys
        assert stats["mu"].shape == (64,) and stats["sigma"].shape == (64, 64) and int(stats["count"]) == 300
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "zzz.png")
    with pytest.raises(SystemExit, match=r"zzz\.png: 8x8, while .* is 16x16"):
        main([str(folder), "digits", "--batch_size=1000"])
    np.savez(tmp_path / "latents.npz", latents=np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(SystemExit, match=r"latents\.npz: no 'images' array"):
        main([str(tmp_path / "latents.npz"), "digits"])
    with pytest.raises(SystemExit, match="missing: no such file"):
        main([str(tmp_path / "missing"), "digits"])
