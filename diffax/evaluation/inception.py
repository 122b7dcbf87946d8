"""Inception-v3 as FID measures with it: pytorch-fid's network in Flax, its weights converted from the
pytorch-fid weight file that the user supplies (`pt_inception-2015-12-05-6726825d.pth`, nothing is
downloaded).

    params = load_inception_params("pt_inception-2015-12-05-6726825d.pth")
    feats = inception_features(params, images)       # [N, 2048], images uint8 [N, H, W, 3] or float [0, 1]

The network is the TensorFlow FID Inception (2015-12-05) as pytorch-fid ports it: torchvision's
Inception3 blocks, with the four differences pytorch-fid patches in (the 5b-5d, 6b-6e and 7b average
pools exclude the zero padding, and 7c's pool branch max-pools), batch norm with eps 1e-3 from running
statistics, and the 2048-d output of the final average pool (the fc layer is not used). Input handling is
pytorch-fid's: images in [0, 1] resized to 299x299 with bilinear interpolation (half-pixel centres, no
antialiasing, as `F.interpolate(..., align_corners=False)`), then scaled to [-1, 1]. Parameter names
mirror the torch state dict (`Mixed_5b.branch1x1.conv.weight` -> `Mixed_5b/branch1x1/conv/kernel`), so
the converter is the generic rules of `diffax.convert.rules` and a check of every key and shape.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.convert import rules
from diffax.convert.io import CheckpointError, open_tensors
from diffax.models.layers import Conv

NUM_FEATURES = 2048
INPUT_SIZE = 299
_BN_EPS = 1e-3
# torch BatchNorm's counter: no use at inference.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
Params = dict[str, Any]


class BatchNorm(nn.Module):
    """Inference batch norm from running statistics, with torch's parameter names (scale = weight)."""
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("running_mean", nn.initializers.zeros, (self.features,))
        var = self.param("running_var", nn.initializers.ones, (self.features,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + _BN_EPS)) + bias


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm, ReLU (torchvision's BasicConv2d)."""
    features: int
    kernel_size: Sequence[int]
    strides: int = 1
    padding: Sequence[int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [N, H, W, C]
        ph, pw = self.padding
        x = Conv(self.features, tuple(self.kernel_size), strides=self.strides, padding=((ph, ph), (pw, pw)),
                 use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        return nn.relu(BatchNorm(self.features, name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool leaves the padding out of the mean (pytorch-fid's patch).
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """The last blocks; `max_pool` is the FID network's 7c, whose pool branch max-pools."""
    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 up to the final average pool: [N, H, W, 3] in [-1, 1] -> [N, 2048].

    Any input of at least 75x75 runs (the network is convolutional); FID uses 299x299 (`prepare`).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)  # [N, 35, 35, 192] at 299
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)  # [N, 17, 17, 768] at 299
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)  # [N, 8, 8, 2048] at 299
        return jnp.mean(x, axis=(1, 2))


def prepare(images: np.ndarray | jax.Array, size: int | None = INPUT_SIZE) -> jax.Array:
    """pytorch-fid's input handling: [N, H, W, C] uint8 (0..255) or float in [0, 1], C 1 or 3 ->
    float32 [N, size, size, 3] in [-1, 1] (bilinear resize as torch's, no antialiasing; size None keeps H, W).
    Grey images are repeated to RGB."""
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"inception: images must be [N, H, W, 1 or 3], got shape {images.shape}")
    x = jnp.asarray(images)
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    if x.shape[3] == 1:
        x = jnp.repeat(x, 3, axis=3)
    if size is not None and x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="linear", antialias=False)
    return 2 * x - 1


@functools.partial(jax.jit, static_argnames="size")
def _features(params: Params, images: jax.Array, size: int | None) -> jax.Array:
    return FIDInceptionV3().apply({"params": params}, prepare(images, size))


def inception_features(params: Params, images: np.ndarray | jax.Array, *, batch_size: int = 50,
                       size: int | None = INPUT_SIZE) -> np.ndarray | jax.Array:
    """The 2048-d pool features [N, 2048] float32 of images [N, H, W, C] (uint8, or float in [0, 1]).

    A numpy input is run in batches of `batch_size` (the last one padded, so one program serves all) and
    gives numpy; a jax.Array (sharded over the batch, say) is run in one call and gives a jax.Array.
    """
    if isinstance(images, jax.Array):
        return _features(params, images, size)
    images = np.asarray(images)
    prepare(images[:1], None)  # checks the shape before any batch runs
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(_features(params, batch, size))[:n])
    return np.concatenate(out) if out else np.zeros((0, NUM_FEATURES), np.float32)


@functools.lru_cache(maxsize=1)
def _abstract_params() -> Params:
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    return jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros(x.shape)))["params"]


def load_inception_params(path: str | os.PathLike) -> Params:
    """The FID Inception's params (host float32 numpy) from pytorch-fid's weight file
    (`pt_inception-2015-12-05-6726825d.pth`) or a safetensors file with the same tensor names.

    The fc layer (1008 classes) is not part of the feature network and is skipped. Every other tensor must
    fit: CheckpointError (a ValueError) names the file and each missing, unexpected or mis-shaped key.
    """
    with open_tensors(path) as tensors:
        state = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith("fc.")}
        source = str(tensors.source)
    if not state:
        raise CheckpointError(f"{source}: no Inception tensors (expected pytorch-fid's pt_inception-2015-12-05 "
                              f"weights, keys like 'Conv2d_1a_3x3.conv.weight')")
    params = rules.torch_to_flax(state, source=source)
    return rules.check_against(params, _abstract_params(), source=source)
