"""The stored form of one quantized kernel (or embedding table), and its way back to floats inside a matmul
or convolution (or a row lookup).

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

An embedding table [N, D] (`layers.Embed`: N rows looked up by id) is stored row by row, so that a lookup
gathers integer rows and their scales and never the whole table:

    embedding        int8  [N, Dp]       bits=8
                     uint8 [N, Dp / 2]   bits=4: column 2j in the low nibble, 2j+1 in the high one
    embedding_scale  fp32  [N, G]        one scale per row (G=1) or per group of gs = Dp / G columns

with w[n, d] = embedding[n, d] * embedding_scale[n, d // gs]: the kernel layout above, of the transposed
table (D plays the contraction rows, N the output channels).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

KERNEL_SCALE = "kernel_scale"  # the scale's name beside `kernel` in a layer's parameters
EMBEDDING_SCALE = "embedding_scale"  # and beside an embedding table's `embedding`


def scale_name(leaf: str) -> str:
    """The name of the scale stored beside a quantized leaf: 'kernel' -> 'kernel_scale',
    'embedding' -> 'embedding_scale'."""
    return f"{leaf}_scale"


def pack_int4(q: jax.Array, axis: int = 0) -> jax.Array:
    """Integers in [-8, 7] (any int dtype) with 2R entries along `axis` -> uint8 with R there, entry 2i in
    the low nibble and 2i+1 in the high one ([2R, N] -> [R, N] for axis=0)."""
    q = jnp.moveaxis(q, axis, 0)
    if q.shape[0] % 2:
        raise ValueError(f"pack_int4: needs an even number of rows, got shape {q.shape}")
    u = q.astype(jnp.int8).astype(jnp.uint8) & 0xF  # two's-complement nibbles
    return jnp.moveaxis(u[0::2] | (u[1::2] << 4), 0, axis)


def unpack_int4(packed: jax.Array, axis: int = 0) -> jax.Array:
    """uint8 from `pack_int4(q, axis)` -> int8 in [-8, 7], twice as long along `axis` ([R, N] -> [2R, N])."""
    packed = jnp.moveaxis(packed, axis, 0)
    low = (packed & 0xF).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    both = jnp.stack([low, high], axis=1).reshape(2 * packed.shape[0], *packed.shape[1:])
    return jnp.moveaxis((both ^ 8) - 8, 0, axis)  # sign-extends a 4-bit two's-complement value


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


def lookup_rows(table: jax.Array, scale: jax.Array, ids: jax.Array, features: int,
                dtype: Any = jnp.float32) -> jax.Array:
    """Rows `ids` [...] of a stored embedding table (embedding, embedding_scale) -> [..., features] floats:
    the integer rows and their scales are gathered first, then multiplied in fp32, so the float table never
    exists. Ids outside the table give NaN rows, as `jnp.take` gives for a float table."""
    rows = jnp.take(table, ids, axis=0)  # [..., Dp] int8 or [..., Dp / 2] uint8
    scales = jnp.take(scale, ids, axis=0)  # [..., G]
    q = unpack_int4(rows, axis=-1) if stored_bits(table) == 4 else rows  # [..., Dp]
    dp, groups = q.shape[-1], scales.shape[-1]
    w = q.astype(jnp.float32).reshape(*ids.shape, groups, dp // groups) * scales.astype(jnp.float32)[..., None]
    return w.reshape(*ids.shape, dp)[..., :features].astype(dtype)


def dequantize_table(table: jax.Array, scale: jax.Array, shape: Sequence[int],
                     dtype: Any = jnp.float32) -> jax.Array:
    """The whole float table [N, D] of `shape` from its stored (embedding, embedding_scale): for export and
    checks (the layer itself only gathers rows, `lookup_rows`)."""
    n, d = tuple(shape)
    dp = table.shape[1] * (2 if stored_bits(table) == 4 else 1)
    if table.ndim != 2 or table.shape[0] != n or scale.shape[0] != n or dp < d or dp % scale.shape[1]:
        raise ValueError(f"quantized table {tuple(table.shape)} {table.dtype} with scale {tuple(scale.shape)} "
                         f"does not hold a float table of shape {tuple(shape)}")
    return lookup_rows(table, scale, jnp.arange(n), d, dtype)
