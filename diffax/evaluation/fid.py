"""Frechet distance between feature distributions (FID), with statistics accumulated batch by batch.

    python -m diffax.evaluation.fid runs/digits/samples.npz digits              # digits features
    python -m diffax.evaluation.fid --inception=pt_inception-2015-12-05-6726825d.pth real/ fake/

The FID of two image sets is the Frechet distance between Gaussians fitted to their features:

    d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

computed as pytorch-fid does: `scipy.linalg.sqrtm` of the product, with `eps` added to both diagonals
when that square root is not finite (a singular product), and the imaginary part dropped when it is
numerical noise. Features come from any extractor: the digits feature network (`digits_features`, the
default for the digits recipes) or Inception-v3's 2048-d pool features (`diffax.evaluation.inception`,
converted from pytorch-fid's weight file, for natural images).

`FeatureStats` holds the count, mean and the sum of centred outer products in float64 and merges batches
with Chan et al.'s parallel update, so statistics of any number of samples are accumulated without keeping
the features, and a batch that is a jax.Array sharded over devices is reduced on the devices (one
all-reduce) before its [F] and [F, F] moments come to the host.

FID is biased upwards for few samples (it is an estimate of a distance from estimated covariances), so
compare numbers made with the same sample counts. Where a CPU cannot make enough samples for a stable FID,
`precision_recall` (fidelity and coverage, Kynkaanniemi et al. 2019) and the class accuracy of
`diffax.evaluation.digits_classifier` are the measures that stay meaningful at a hundred samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import warnings
from pathlib import Path
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from diffax.evaluation.digits_features import digits_features

MeanCov = tuple[np.ndarray, np.ndarray]  # (mu [F], sigma [F, F])


@jax.jit
def _device_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:  # [N, F] -> mean [F], M2 [F, F]
    # Centring on the batch mean before the outer products keeps float32 accurate for features far from 0.
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=0)
    c = x - mean
    return mean, jnp.matmul(c.T, c, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass
class FeatureStats:
    """Streaming mean and covariance of features [N, F].

    count: samples seen; mu: their mean [F] (float64); m2: the sum of outer products of the centred
    features [F, F] (float64). Empty (count 0, arrays None) until the first `update`.
    """
    count: int = 0
    mu: np.ndarray | None = None
    m2: np.ndarray | None = None

    @property
    def num_features(self) -> int | None:
        return None if self.mu is None else self.mu.shape[0]

    def update(self, features: np.ndarray | jax.Array) -> "FeatureStats":
        """Adds a batch [N, F] in place (and returns self). A jax.Array (sharded or not) is reduced on its
        devices in float32 after centring; numpy is reduced on the host in float64."""
        if features.ndim != 2:
            raise ValueError(f"FeatureStats.update: features must be [N, F], got shape {features.shape}")
        if self.mu is not None and features.shape[1] != self.mu.shape[0]:
            raise ValueError(f"FeatureStats.update: features have {features.shape[1]} channels, the statistics "
                             f"{self.mu.shape[0]}")
        n = int(features.shape[0])
        if n == 0:
            return self
        if isinstance(features, jax.Array):
            mean, m2 = (np.asarray(a, np.float64) for a in _device_moments(features))
        else:
            x = np.asarray(features, np.float64)
            mean = x.mean(axis=0)
            c = x - mean
            m2 = c.T @ c
        merged = self.merge(FeatureStats(n, mean, m2))
        self.count, self.mu, self.m2 = merged.count, merged.mu, merged.m2
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """The statistics of both sets together (a new object; Chan et al.'s pairwise update)."""
        if other.count == 0:
            return dataclasses.replace(self)
        if self.count == 0:
            return dataclasses.replace(other)
        if other.mu.shape != self.mu.shape:
            raise ValueError(f"FeatureStats.merge: {self.mu.shape[0]} against {other.mu.shape[0]} features")
        n = self.count + other.count
        delta = other.mu - self.mu
        mu = self.mu + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        return FeatureStats(n, mu, m2)

    def mean(self) -> np.ndarray:
        """The mean [F] (float64)."""
        self._check(1)
        return self.mu

    def cov(self) -> np.ndarray:
        """The unbiased covariance [F, F] (float64), as `np.cov(features, rowvar=False)`."""
        self._check(2)
        return self.m2 / (self.count - 1)

    def _check(self, least: int) -> None:
        if self.count < least:
            raise ValueError(f"FeatureStats: {self.count} samples, need at least {least}")

    def save(self, path: str | Path) -> None:
        """Writes an .npz with pytorch-fid's keys `mu` and `sigma`, plus `count` and `m2` for merging."""
        np.savez(path, mu=self.mean(), sigma=self.cov(), count=np.int64(self.count), m2=self.m2)


def feature_stats(features: np.ndarray | jax.Array) -> FeatureStats:
    """`FeatureStats` of one set of features [N, F]."""
    return FeatureStats().update(features)


StatsLike = Union[FeatureStats, MeanCov]


def _mean_cov(stats: StatsLike, name: str) -> MeanCov:
    if isinstance(stats, FeatureStats):
        return stats.mean(), stats.cov()
    mu, sigma = (np.asarray(a, np.float64) for a in stats)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"frechet_distance: {name} must be (mu [F], sigma [F, F]), got {mu.shape}, {sigma.shape}")
    return mu, sigma


def frechet_distance(a: StatsLike, b: StatsLike, *, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians of `a` and `b` (FeatureStats or (mu, sigma) each).

    pytorch-fid's computation: sqrtm(S_a S_b) by scipy; if it is not finite, eps * I is added to both
    covariances; a complex result whose diagonal has an imaginary part above 1e-3 is an error.
    """
    from scipy import linalg
    mu1, sigma1 = _mean_cov(a, "a")
    mu2, sigma2 = _mean_cov(b, "b")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: {mu1.shape[0]} against {mu2.shape[0]} features")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # A singular product is expected (dead feature channels); the finiteness check below handles it,
        # where pytorch-fid passes sqrtm's since-removed disp=False.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=4)
def _digits_reference_stats(image_size: int) -> FeatureStats:
    from diffax.data.digits import load_digits_arrays
    images, _ = load_digits_arrays(image_size, 1)
    return feature_stats(digits_features(images))


def digits_reference_stats(image_size: int = 16) -> FeatureStats:
    """Digits-feature statistics of all 1797 real digits prepared at `image_size` (computed once; each call
    returns its own copy, since `update` works in place)."""
    return dataclasses.replace(_digits_reference_stats(image_size))


def digits_fid(images: np.ndarray | jax.Array) -> float:
    """FID of digit images [N, S, S, C] (uint8, or float in [-1, 1]) against all real digits at size S,
    in the digits feature network's space."""
    return frechet_distance(feature_stats(digits_features(images)), digits_reference_stats(images.shape[1]))


# ----------------------------------------------------------------------------- precision / recall


def _pairwise_sq_dist(a: jax.Array, b: jax.Array) -> jax.Array:  # [R, F], [M, F] -> [R, M]
    d = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * jnp.matmul(
        a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(d, 0.0)


def _by_row_blocks(fn, rows: jax.Array, block_rows: int, *args: jax.Array) -> jax.Array:
    """fn(block [R, F], *args) -> [R] over `rows` [N, F] in blocks of R rows (zero-padded, cut after)."""
    n = rows.shape[0]
    r = min(block_rows, n)
    blocks = -(-n // r)
    padded = jnp.pad(rows, ((0, blocks * r - n), (0, 0))).reshape(blocks, r, rows.shape[1])
    return jax.lax.map(lambda block: fn(block, *args), padded).reshape(blocks * r)[:n]


def _kth_radius(block: jax.Array, points: jax.Array, k: int) -> jax.Array:  # [R, F], [N, F] -> [R]
    # The k+1-th smallest squared distance: the smallest is the point itself.
    return -jax.lax.top_k(-_pairwise_sq_dist(block, points), k + 1)[0][:, k]


def _inside_some_ball(block: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:  # -> [R] bool
    return jnp.any(_pairwise_sq_dist(block, centres) <= radii[None, :], axis=1)


@functools.partial(jax.jit, static_argnames=("k", "block_rows"))
def _precision_recall(real: jax.Array, fake: jax.Array, k: int, block_rows: int) -> tuple[jax.Array, jax.Array]:
    real_r = _by_row_blocks(functools.partial(_kth_radius, k=k), real, block_rows, real)
    fake_r = _by_row_blocks(functools.partial(_kth_radius, k=k), fake, block_rows, fake)
    precision = jnp.mean(_by_row_blocks(_inside_some_ball, fake, block_rows, real, real_r))
    recall = jnp.mean(_by_row_blocks(_inside_some_ball, real, block_rows, fake, fake_r))
    return precision, recall


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, *, k: int = 3,
                     block_rows: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features [N, F] and [M, F].

    Each set's manifold is the union of balls around its points reaching their k-th nearest neighbour.
    Precision: the fraction of fake samples inside the real manifold (are samples realistic?); recall: the
    fraction of real samples inside the fake manifold (do samples cover the data?). Distances are exact and
    computed `block_rows` rows at a time, so memory grows as block_rows * max(N, M), not N * M.
    """
    real, fake = np.asarray(real_feats, np.float32), np.asarray(fake_feats, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: features must be [N, F] and [M, F], got {real.shape}, {fake.shape}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} samples in each set, got {len(real)}, {len(fake)}")
    precision, recall = _precision_recall(jnp.asarray(real), jnp.asarray(fake), k, block_rows)
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- command line

DIGITS = "digits"


class _Extractor:
    """Features of uint8 image batches: the digits network, or the FID Inception from a weight file."""

    def __init__(self, inception: str | None, batch_size: int):
        self.batch_size = batch_size
        self.name = "digits features"
        self.inception_params = None
        if inception is not None:
            from diffax.evaluation.inception import load_inception_params
            self.inception_params = load_inception_params(inception)
            self.name = f"Inception-v3 features ({inception})"

    def __call__(self, images: np.ndarray) -> np.ndarray:  # [N, H, W, C] uint8 -> [N, F]
        if self.inception_params is None:
            return digits_features(images, batch_size=self.batch_size)
        from diffax.evaluation.inception import inception_features
        return inception_features(self.inception_params, images, batch_size=self.batch_size)


def _image_batches(source: str, batch_size: int):
    """uint8 [B, H, W, C] batches of a folder of images (RGB, non-recursive) or an .npz's `images`."""
    path = Path(source)
    if path.is_dir():
        from PIL import Image

        from diffax.data.folder import IMAGE_EXTENSIONS
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        for i in range(0, len(files), batch_size):
            arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files[i:i + batch_size]]
            for f, a in zip(files[i:], arrays):
                if a.shape != arrays[0].shape:
                    raise ValueError(f"{f}: {a.shape[1]}x{a.shape[0]}, while {files[i].name} is "
                                     f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; resize the images to one size")
            yield np.stack(arrays)
        return
    with np.load(path) as data:
        if "images" not in data:
            raise ValueError(f"{path}: no 'images' array (found {sorted(data.files)}); expected sample.py's "
                             f".npz, or 'mu' and 'sigma' statistics")
        images = data["images"]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def _stats_of(source: str, extract: _Extractor, digits_size: int) -> tuple[StatsLike, int | None, int]:
    """(statistics, image size or None, count) of a folder, .npz of images or statistics, or 'digits'."""
    if source == DIGITS:
        if extract.inception_params is None:
            stats = digits_reference_stats(digits_size)
        else:
            from diffax.data.digits import load_digits_arrays
            stats = feature_stats(extract(load_digits_arrays(digits_size, 3)[0]))
        return stats, digits_size, stats.count
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "mu" in data and "sigma" in data:
                count = int(data["count"]) if "count" in data else -1
                return (data["mu"], data["sigma"]), None, count
    stats, size = FeatureStats(), None
    for batch in _image_batches(source, extract.batch_size):
        stats.update(extract(batch))
        size = batch.shape[1]
    return stats, size, stats.count


def main(argv: list[str] | None = None) -> None:
    """The FID of two image sets (or the statistics of one, with --save_stats)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffax.evaluation.fid", description=__doc__.split("\n\n")[0],
        epilog="Each input is a folder of images, an .npz with 'images' (uint8 [N, H, W, C], as sample.py "
               "writes) or 'mu' and 'sigma' (statistics, as --save_stats and pytorch-fid write), or 'digits' "
               "(all real digits at the other input's size).")
    parser.add_argument("inputs", nargs="+", help="two inputs; one with --save_stats")
    parser.add_argument("--inception", metavar="PATH", help="pytorch-fid's weight file "
                        "(pt_inception-2015-12-05-6726825d.pth); default: the digits feature network")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--save_stats", metavar="OUT.npz", help="write the statistics of the one input")
    args = parser.parse_args(argv)
    want = 1 if args.save_stats else 2
    if len(args.inputs) != want:
        parser.error(f"expected {want} input(s), got {len(args.inputs)}")
    try:
        extract = _Extractor(args.inception, args.batch_size)
        # 'digits' takes the other input's image size, so that one is read first.
        order = sorted(range(want), key=lambda i: args.inputs[i] == DIGITS)
        results: dict[int, tuple[StatsLike, int | None, int]] = {}
        for i in order:
            size = next((r[1] for r in results.values() if r[1] is not None), 16)
            results[i] = _stats_of(args.inputs[i], extract, size)
        if args.save_stats:
            stats = results[0][0]
            if not isinstance(stats, FeatureStats):
                parser.error(f"{args.inputs[0]} already holds statistics")
            stats.save(args.save_stats)
            print(f"{args.inputs[0]}: {stats.count} images, {extract.name}; wrote {args.save_stats}")
            return
        fid = frechet_distance(results[0][0], results[1][0])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    counts = ", ".join(f"{args.inputs[i]}: {results[i][2] if results[i][2] >= 0 else '?'}" for i in range(2))
    print(f"FID {fid:.4f} ({extract.name}; images {counts})")


if __name__ == "__main__":
    main()
