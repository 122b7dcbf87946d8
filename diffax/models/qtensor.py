"""The stored form of one quantized kernel, and its way back to floats inside a matmul or convolution.

A float kernel of shape [..., out] (Dense [in, out], Conv HWIO [kh, kw, in, out]) is viewed as a matrix
[K, out] with K = prod(shape[:-1]), the contraction size. Its quantized form is two arrays:

    kernel        int8  [Kp, out]       bits=8: one integer in [-128, 127] per weight
                  uint8 [Kp / 2, out]   bits=4: two integers in [-8, 7] per byte, row 2i in the low nibble
                                        and row 2i+1 in the high nibble
    kernel_scale  fp32  [G, out]        one scale per output channel (G=1) or per group of
                                        gs = Kp / G consecutive rows of each output channel

Kp is K rounded up to G equal groups (and to an even number for int4; `quantize.stored_rows`); the
padded rows are 0.
The weight is w[k, o] = kernel[k, o] * kernel_scale[k // gs, o]. Everything above can be read back from
the two arrays and the float shape, which the layer knows from its own attributes, so a quantized
parameter tree needs no side information to run.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

KERNEL_SCALE = "kernel_scale"  # the scale's name beside `kernel` in a layer's parameters


def pack_int4(q: jax.Array) -> jax.Array:
    """[2R, N] integers in [-8, 7] (any int dtype) -> [R, N] uint8, row 2i in the low nibble."""
    if q.shape[0] % 2:
        raise ValueError(f"pack_int4: needs an even number of rows, got shape {q.shape}")
    u = q.astype(jnp.int8).astype(jnp.uint8) & 0xF  # two's-complement nibbles
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """[R, N] uint8 from `pack_int4` -> [2R, N] int8 in [-8, 7]."""
    low = (packed & 0xF).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    both = jnp.stack([low, high], axis=1).reshape(2 * packed.shape[0], *packed.shape[1:])
    return (both ^ 8) - 8  # sign-extends a 4-bit two's-complement value


def stored_bits(kernel: Any) -> int:
    """8 for an int8 stored kernel, 4 for a packed uint8 one."""
    dtype = jnp.dtype(kernel.dtype)
    if dtype == jnp.int8:
        return 8
    if dtype == jnp.uint8:
        return 4
    raise ValueError(f"a quantized kernel is int8 (8 bits) or uint8 (4 bits packed), not {dtype}")


def dequantize_kernel(kernel: jax.Array, scale: jax.Array, shape: Sequence[int],
                      dtype: Any = jnp.float32) -> jax.Array:
    """The float kernel of `shape` from its stored (kernel, kernel_scale), computed in fp32, cast to `dtype`.

    Inside a jitted model this is fused into the consumer where XLA can, and otherwise lives only as the
    temporary operand of one matmul: the parameters themselves stay integers in device memory.
    """
    shape = tuple(shape)
    k, out = math.prod(shape[:-1]), shape[-1]
    q = unpack_int4(kernel) if stored_bits(kernel) == 4 else kernel  # [Kp, out]
    kp, groups = q.shape[0], scale.shape[0]
    if q.shape[1] != out or scale.shape[1] != out or kp < k or kp % groups:
        raise ValueError(f"quantized kernel {tuple(kernel.shape)} {kernel.dtype} with scale {tuple(scale.shape)} "
                         f"does not hold a float kernel of shape {shape}")
    w = q.astype(jnp.float32).reshape(groups, kp // groups, out) * scale.astype(jnp.float32)[:, None, :]
    return w.reshape(kp, out)[:k].reshape(shape).astype(dtype)
