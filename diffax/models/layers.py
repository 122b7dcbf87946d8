"""Building blocks shared by every diffax model: partitioned Dense/Conv, fp32 norms, timestep embeddings.

One layer for every weight: every projection and convolution in diffax/models is made by `dense` or `conv`
here, never by `nn.Dense` / `nn.Conv` / a raw `self.param` kernel elsewhere, so that LoRA adapters and
quantized (int8) weights hook in at these two functions once for every model (as MaxText threads
quantization through its DenseGeneral). Embedding tables (`nn.Embed`, or `Embed` here where a table is
worth quantizing) and norm scales are the only other parameters.

Every parameter is created through `nn.with_logical_partitioning`, so a model's parameters carry logical
axis names from the start (DESIGN: "sharding is configuration"). `diffax.parallel` maps those names to mesh
axes; on a single device they are ignored. `nn.meta.unbox` turns the boxed tree into plain arrays.

Logical axis names used across diffax, for parameters:
  'embed'    model width entering a layer (d_model / in channels of a linear layer)
  'mlp'      hidden width of an MLP or the out features of a projection
  'heads'    attention heads x head dim (q/k/v/out projections)
  'conv_in', 'conv_out'  input / output channels of a conv kernel
  'norm'     per-channel norm scale and bias
  None       replicated (small vectors, kernel spatial dims)
and for activations (`nn.with_logical_constraint`, a no-op outside `nn.logical_axis_rules`):
  'batch'    the batch axis
  'length'   the token axis of [B, L, ...] activations; 'embed' / 'mlp' / 'heads' as above
  IMAGE_AXES ('batch', None, None, 'activation_channels') for NHWC feature maps between U-Net blocks;
             'activation_channels' is replicated by the default rules: a conv needs all its input
             channels, so channel-sharded maps would be gathered again at every conv.
"""
from __future__ import annotations

import contextvars
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.qtensor import EMBEDDING_SCALE, dequantize_kernel, lookup_rows

Dtype = Any
Axes = tuple[str | None, ...]

IMAGE_AXES: Axes = ("batch", None, None, "activation_channels")  # [B, H, W, C] feature maps


# The input of the Dense / Conv being traced, so that its quantized kernel can be made to wait for it.
_LAYER_INPUT: contextvars.ContextVar = contextvars.ContextVar("layer_input", default=None)


class _QuantizableKernel:
    """Reads a quantized kernel where the parameters hold one: beside an int8 / packed-int4 `kernel` sits
    its fp32 `kernel_scale` (layout in `diffax.models.qtensor`), and `kernel` is dequantised to the float
    shape flax asks for, in the compute dtype, as the operand of this layer's matmul or convolution. The
    parameters stay integers in device memory; float parameters take flax's own path unchanged."""

    def param(self, name: str, init_fn: Any, *init_args: Any, unbox: bool = True, **init_kwargs: Any) -> Any:
        # XLA:CPU computes with fp32 weights, and its default scheduler converts every weight (int8 or
        # bf16) as early as it can, at the start of the program, holding all the fp32 copies at once (an
        # optimization_barrier is stripped before scheduling there). Scaling by a one made from this
        # layer's input makes each conversion wait until the layer is reached.
        if name == "kernel" and self.has_variable("params", "kernel_scale"):
            stored, scale = (nn.meta.unbox(self.get_variable("params", n)) for n in ("kernel", "kernel_scale"))
            scale = scale * one_after(_LAYER_INPUT.get(), scale.dtype)
            return dequantize_kernel(stored, scale, init_args[0], self.dtype or jnp.float32)
        kernel = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        if name == "kernel" and jax.default_backend() == "cpu" and kernel.dtype in (jnp.bfloat16, jnp.float16):
            kernel = kernel * one_after(_LAYER_INPUT.get(), kernel.dtype)
        return kernel

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """flax's layer, with `inputs` visible to `param` while it runs."""
        token = _LAYER_INPUT.set(inputs)
        try:
            return super().__call__(inputs)
        finally:
            _LAYER_INPUT.reset(token)


def _ones_from(x: jax.Array) -> jax.Array:
    """Exactly 1 in x's shape, computed from x, which XLA cannot fold: 0 * x is not folded for floats (it
    is NaN at inf and NaN), and nan_to_num makes it 0 in every case."""
    return 1 + jnp.nan_to_num(0 * x, nan=0.0, posinf=0.0, neginf=0.0)


def one_after(x: jax.Array, dtype: Dtype) -> jax.Array:
    """[] exactly 1 in `dtype`, computed from `x`, so that XLA cannot compute what it scales before `x` exists.
    Scaling by it is exact (w * 1 == w, -0.0 included) and costs one scalar multiply fused into the consumer.
    """
    return _ones_from(x.reshape(-1)[0]).astype(dtype)


def materialize(x: jax.Array) -> jax.Array:
    """`x` unchanged, computed once and kept in memory by XLA:CPU instead of being recomputed by each consumer.

    XLA's CPU fusion pass copies cheap elementwise producers into every consumer. Along a residual stream
    (x + f(x), block after block) it copies the whole chain of earlier blocks' additions into each
    consumer, in the forward values the backward pass reads and in the gradient flowing back, so a train
    step's work grows with the square of the depth (DiT-XL/2's step spent most of its time in fusions of
    500 operands). A division is an op XLA does not duplicate: dividing by a one it cannot fold ends the
    chain here, in the forward pass and (the cotangent is divided too) in the backward pass. x / 1 is x bit
    for bit. Call it on the stream between blocks; other backends, and non-float arrays, pass through.
    """
    if jax.default_backend() != "cpu" or not jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    return x / jax.lax.stop_gradient(_ones_from(x))


class Dense(_QuantizableKernel, nn.Dense):
    """`nn.Dense` that also runs on a quantized kernel (see `_QuantizableKernel`).

    Inputs [..., in] are multiplied as rows [N, in]: the kernel gradient of a dot over several leading axes
    contracts two or more dimensions, which XLA's CPU backend runs ~30x slower than the same product over
    one (DiT-S/2's [2, 256, 384] x [384, 1536]: 43 ms against 1.5 ms for the forward dot).
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))  # [N, out]
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


def conv_kernel_waits(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """`lax.conv_general_dilated(lhs, rhs, *args, **kwargs)` whose backward pass reads the kernel only once
    the output's cotangent exists, and writes the kernel gradient once, in the kernel's layout. For XLA:CPU.

    The input gradient of a convolution runs on the kernel transposed (and flipped), a copy XLA:CPU makes
    from the parameter alone. Its default scheduler starts such copies as early as it can, at the start of
    the program, so a train step held every conv kernel twice until its layer's backward pass came: 2.5 GiB
    of SD 1.5's U-Net. Scaling the kernel by `one_after(dy)` ties each copy to its layer's backward pass.
    The kernel gradient comes out of YNNPACK as [O, H, W, I]; the train step read it both in that layout
    and as an HWIO copy, and kept both (2.1 GiB). `materialize` writes it once, as HWIO.
    Values and gradients are those of the plain convolution.
    """
    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, *args, **kwargs)

    @jax.custom_vjp
    def call(x: jax.Array, w: jax.Array) -> jax.Array:
        return conv(x, w)

    def forward(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        return conv(x, w), (x, w)

    def backward(saved: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, w = saved
        dx, dw = jax.vjp(conv, x, w * one_after(dy, w.dtype))[1](dy)
        return dx, materialize(dw)

    call.defvjp(forward, backward)
    return call(lhs, rhs)


class Conv(_QuantizableKernel, nn.Conv):
    """`nn.Conv` that also runs on a quantized kernel (see `_QuantizableKernel`); on CPU its backward pass
    reads the kernel when its layer is reached (`conv_kernel_waits`)."""


class Embed(nn.Embed):
    """`nn.Embed` that also runs on a quantized table: beside an int8 / packed-int4 `embedding` sits its
    fp32 `embedding_scale` (one per row or per group of columns; layout in `diffax.models.qtensor`), and a
    lookup gathers the integer rows and their scales and multiplies them (`lookup_rows`): the float table is
    never made, since most of its rows (a 49408-token vocabulary) are not looked up."""

    def setup(self):
        if self.has_variable("params", EMBEDDING_SCALE):
            self.embedding = None  # read in __call__: flax's param() would check the table's float shape
        else:
            super().setup()

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.embedding is not None:
            return super().__call__(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        stored, scale = (nn.meta.unbox(self.get_variable("params", n)) for n in ("embedding", EMBEDDING_SCALE))
        return lookup_rows(stored, scale, inputs, self.features, self.dtype or jnp.float32)


def dot_general_f32(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                    preferred_element_type: Any = None) -> jax.Array:
    """`lax.dot_general` accumulated in fp32 and returned in the operands' dtype (fp32 in, fp32 out, as
    before). For XLA:CPU: a bf16 dot with a bf16 result is rewritten to convert both operands to fp32 and
    multiply in fp32, while one with an fp32 result keeps its bf16 operands, which YNNPACK multiplies 1.5-1.9x
    faster than fp32 on CPUs with bf16 instructions (docs/performance.md, "bf16 on a CPU")."""
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))


def dense(features: int, *, axes: Axes = ("embed", "mlp"), use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal(),
          name: str | None = None) -> Dense:
    """A `Dense` whose kernel [in, out] carries logical axes `axes` and whose bias carries `axes[-1]`."""
    return Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        dot_general=dot_general_f32 if jax.default_backend() == "cpu" else None,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


def conv(features: int, kernel_size: int | Sequence[int] = 3, *, strides: int = 1, padding: Any = "SAME",
         axes: Axes = (None, None, "conv_in", "conv_out"), use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal(),
         name: str | None = None) -> Conv:
    """An NHWC `Conv` with an HWIO kernel carrying logical axes.

    `padding` follows flax; pass an int p for torch's symmetric `padding=p` (a stride-2 3x3 conv with p=1
    differs from 'SAME' on even inputs, so parity with torch needs the explicit form).
    """
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return Conv(
        features, ks, strides=(strides, strides), padding=padding, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, name=name,
        conv_general_dilated=conv_kernel_waits if jax.default_backend() == "cpu" else None,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


def _affine(norm: nn.Module, y: jax.Array, c: int) -> jax.Array:
    """y * scale + bias in fp32 with per-channel params named as torch's weight / bias (-> scale / bias)."""
    scale = norm.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (c,),
                       norm.param_dtype)
    bias = norm.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,),
                      norm.param_dtype)
    return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class GroupNorm(nn.Module):
    """GroupNorm over the channel (last) axis computed in fp32, like torch.nn.GroupNorm.

    Uses the two-pass variance (E[(x-mu)^2]) rather than flax's fast E[x^2]-mu^2, which loses precision
    on activations with a large mean and would break parity with torch.
    """
    num_groups: int = 32
    epsilon: float = 1e-5
    use_scale_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, ..., C]
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}")
        xf = x.astype(jnp.float32)
        grouped = xf.reshape(x.shape[0], -1, self.num_groups, c // self.num_groups)  # [B, N, G, C/G]
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(xf.shape)
        if self.use_scale_bias:
            y = _affine(self, y, c)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in fp32 (two-pass variance); `use_scale_bias=False` is torch's
    `elementwise_affine=False`, as used before adaLN modulation."""
    epsilon: float = 1e-5
    use_scale_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., C]
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale_bias:
            y = _affine(self, y, x.shape[-1])
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last axis in fp32, times a per-channel `scale` (torch's `weight`)
    unless `use_scale=False`: diffusers' `RMSNorm` (no bias)."""
    epsilon: float = 1e-6
    use_scale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., C]
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                               (x.shape[-1],), self.param_dtype)
            y = y * scale.astype(jnp.float32)
        return y.astype(self.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, the formula of diffusers'
    `get_timestep_embedding` (and of the DiT reference with flip_sin_to_cos=True, shift=0).

    timesteps: [B] -> [B, dim] float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = scale * timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2: diffusers' `TimestepEmbedding` (names match its state dict)."""
    features: int
    out_features: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, C_in] -> [B, features]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        x = dense(self.features, axes=("embed", "mlp"), name="linear_1", **kw)(x)
        x = nn.silu(x)
        return dense(self.out_features or self.features, axes=("mlp", "embed"), name="linear_2", **kw)(x)


def unbox(tree: Any) -> Any:
    """Plain arrays from a tree of `nn.Partitioned` boxes (a no-op on plain trees)."""
    return nn.meta.unbox(tree)
