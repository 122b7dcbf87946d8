"""Attention and transformer blocks shared by every diffax model, in diffusers' shape and with its names.

  module                  mirrors (diffusers)                                  parameters
  Attention               models.attention_processor.Attention                 to_q, to_k, to_v, to_out_0,
                                                                               [norm_q, norm_k], [group_norm]
  FeedForward             models.attention.FeedForward                         net_0/proj, net_2
  GELU, GEGLU             models.activations.GELU / GEGLU (FeedForward.net_0)  proj
  AdaLayerNormZero        models.normalization.AdaLayerNormZero, minus `emb`   linear
  BasicTransformerBlock   models.attention.BasicTransformerBlock               norm1, attn1, [norm2, attn2],
                                                                               norm3, ff

so `diffax.convert.rules.torch_to_flax` maps their torch state dicts with the generic rules alone
(`attn1.to_out.0.weight` -> `attn1/to_out_0/kernel`, `ff.net.0.proj.weight` -> `ff/net_0/proj/kernel`).
Input widths (diffusers' `query_dim`, `cross_attention_dim`, `dim`) are read from the arrays.

Who uses them: DiT's blocks are `BasicTransformerBlock(norm_type='ada_norm_zero',
activation_fn='gelu-approximate')`; the U-Net's (and VAE's) spatial attention is `Attention` with
`norm_num_groups` and `residual_connection` (diffusers' `_from_deprecated_attn_block` attention); Stable
Diffusion's cross-attention blocks are `BasicTransformerBlock(cross_attention_dim=..., activation_fn='geglu')`.

Parameters carry logical axes (q/k/v kernels ('embed', 'heads'), out ('heads', 'embed'), MLP ('embed',
'mlp') then ('mlp', 'embed')) and activations are constrained at the same places ('batch', 'length',
'heads' / 'mlp' / 'embed'); the constraints are no-ops outside `nn.logical_axis_rules`. Every weight is
made by `layers.dense`. Softmax and norms run in fp32 whatever the compute dtype, so diffusers'
`upcast_attention` / `upcast_softmax` have no counterpart. Attention masks are not supported.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.attention import dot_product_attention
from diffax.models.layers import GroupNorm, LayerNorm, RMSNorm, dense

Dtype = Any
Initializer = nn.initializers.Initializer

QK_NORMS = (None, "layer_norm", "rms_norm")
ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")
NORM_TYPES = ("layer_norm", "ada_norm_zero")

_lecun = nn.initializers.lecun_normal()
TOKEN_AXES = ("batch", "length", "embed")  # [B, L, D] activations between blocks


class Attention(nn.Module):
    """Multi-head attention, self or cross: diffusers' `Attention` with its parameter names.

    q projects from `hidden_states`, k and v from `encoder_hidden_states` when given (cross-attention),
    else from `hidden_states`. A 4-D input [B, H, W, C] attends over its H*W positions and keeps its shape.

    Fields follow diffusers' constructor: `heads`, `dim_head`, `bias` (q/k/v bias), `out_bias`,
    `qk_norm` ('layer_norm' / 'rms_norm' over each head's dim_head, params `norm_q` / `norm_k`, affine
    iff `elementwise_affine`), `norm_num_groups` (a GroupNorm `group_norm` on the input before the
    projections), `eps` (of those norms), `residual_connection` (adds the input to the output),
    `rescale_output_factor` (divides the output), `dropout` (after `to_out_0`, with `train=True`).
    `kernel_init` initialises q/k/v, `out_kernel_init` the output projection; biases start at zero.
    """
    heads: int
    dim_head: int
    bias: bool = False
    out_bias: bool = True
    qk_norm: str | None = None
    elementwise_affine: bool = True
    norm_num_groups: int | None = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    dropout: float = 0.0
    kernel_init: Initializer = _lecun
    out_kernel_init: Initializer = _lecun
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"Attention: qk_norm={self.qk_norm!r} is not supported (expected one of {QK_NORMS})")
        if self.heads < 1 or self.dim_head < 1:
            raise ValueError(f"Attention: heads={self.heads} and dim_head={self.dim_head} must be positive")

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        # hidden_states: [B, L, C] or [B, H, W, C]; encoder_hidden_states: [B, Lk, C_ctx] -> hidden_states' shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, c = hidden_states.shape[0], hidden_states.shape[-1]
        x = hidden_states.reshape(b, -1, c)  # [B, L, C]
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.eps, name="group_norm", **kw)(x)
        context = x if encoder_hidden_states is None else encoder_hidden_states
        inner = self.heads * self.dim_head

        def project(name: str, y: jax.Array) -> jax.Array:  # [B, L, C_in] -> [B, L, heads, dim_head]
            y = dense(inner, axes=("embed", "heads"), use_bias=self.bias, kernel_init=self.kernel_init,
                      name=name, **kw)(y)
            return y.reshape(b, -1, self.heads, self.dim_head)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        if self.qk_norm is not None:
            norm = LayerNorm if self.qk_norm == "layer_norm" else RMSNorm
            q = norm(self.eps, self.elementwise_affine, name="norm_q", **kw)(q)
            k = norm(self.eps, self.elementwise_affine, name="norm_k", **kw)(k)
        q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", None)) for t in (q, k, v))
        o = dot_product_attention(q, k, v, backend=self.attention_backend).reshape(b, -1, inner)
        o = dense(c, axes=("heads", "embed"), use_bias=self.out_bias, kernel_init=self.out_kernel_init,
                  name="to_out_0", **kw)(o)
        o = nn.Dropout(self.dropout)(o, deterministic=not train).reshape(hidden_states.shape)
        if self.residual_connection:
            o = o + hidden_states
        return o / self.rescale_output_factor


class GELU(nn.Module):
    """Linear `proj` then GELU (`approximate`: tanh form, diffusers' 'gelu-approximate'): diffusers' `GELU`."""
    features: int
    approximate: bool = False
    use_bias: bool = True
    kernel_init: Initializer = _lecun
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., C] -> [..., features]
        x = dense(self.features, axes=("embed", "mlp"), use_bias=self.use_bias, kernel_init=self.kernel_init,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        return nn.gelu(x, approximate=self.approximate)


class GEGLU(nn.Module):
    """Linear `proj` to 2 x features, split into value and gate, value * GELU(gate) (exact GELU): diffusers'
    `GEGLU`. The value half comes first, as in diffusers' `chunk(2, dim=-1)`."""
    features: int
    use_bias: bool = True
    kernel_init: Initializer = _lecun
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., C] -> [..., features]
        x = dense(2 * self.features, axes=("embed", "mlp"), use_bias=self.use_bias, kernel_init=self.kernel_init,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(x, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net_0 (activation with its projection) -> dropout -> net_2 (Linear back to the input width):
    diffusers' `FeedForward` with `dim_out=None`, `final_dropout=False`. `inner_dim` defaults to
    `mult` x the input width."""
    activation_fn: str = "geglu"
    inner_dim: int | None = None
    mult: int = 4
    bias: bool = True
    dropout: float = 0.0
    kernel_init: Initializer = _lecun
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"FeedForward: activation_fn={self.activation_fn!r} is not supported "
                             f"(expected one of {ACTIVATIONS})")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:  # [B, L, D] -> [B, L, D]
        dim = x.shape[-1]
        inner = self.inner_dim or int(dim * self.mult)
        kw = dict(use_bias=self.bias, kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.activation_fn == "geglu":
            h = GEGLU(inner, name="net_0", **kw)(x)
        else:
            h = GELU(inner, approximate=self.activation_fn == "gelu-approximate", name="net_0", **kw)(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return dense(dim, axes=("mlp", "embed"), name="net_2", **kw)(h)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: `linear` regresses six modulation vectors from silu(emb); the input is normalised
    (LayerNorm without affine params, eps 1e-6) and modulated by the first two.

    diffusers' `AdaLayerNormZero` without its `emb` embedder (diffax models compute the conditioning
    embedding once, outside the blocks). `linear` is zero-initialised, so a fresh block is the identity.
    Returns (x_modulated [B, L, D], gate_msa, shift_mlp, scale_mlp, gate_mlp), each vector [B, 1, D].
    """
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, ...]:  # [B, L, D], [B, D_emb]
        d = x.shape[-1]
        mod = dense(6 * d, axes=("embed", "mlp"), kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="linear")(nn.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            m[:, None, :] for m in jnp.split(mod, 6, axis=-1))
        h = LayerNorm(epsilon=1e-6, use_scale_bias=False, dtype=self.dtype, name="norm")(x)
        return h * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


class BasicTransformerBlock(nn.Module):
    """norm1 -> attn1 (self) -> [norm2 -> attn2 (cross)] -> norm3 -> ff, each with a residual:
    diffusers' `BasicTransformerBlock` with its field names and defaults.

    norm_type:
      'layer_norm'     Stable Diffusion: LayerNorms `norm1` / `norm2` / `norm3` (eps `norm_eps`, affine iff
                       `norm_elementwise_affine`).
      'ada_norm_zero'  DiT: `norm1` is an `AdaLayerNormZero` driven by `emb` [B, D] (the conditioning
                       embedding diffusers computes inside `norm1.emb`); its gates scale the attention and
                       MLP outputs and its shift/scale modulate `norm3`'s output.
    `cross_attention_dim` adds `norm2` + `attn2`, whose k/v project from `encoder_hidden_states`
    [B, Lk, cross_attention_dim]. `activation_fn`: 'geglu' (SD), 'gelu', 'gelu-approximate' (DiT).
    `attention_bias` is the q/k/v bias, `attention_out_bias` the output projection's; `ff_inner_dim`
    defaults to 4 x the width. `qkv_kernel_init` / `out_kernel_init` / `ff_kernel_init` override the
    initialisers (DiT's reference init). diffusers' `only_cross_attention`, `double_self_attention`,
    positional embeddings, gated attention and the other norm types are not implemented.
    """
    num_attention_heads: int
    attention_head_dim: int
    cross_attention_dim: int | None = None
    dropout: float = 0.0
    activation_fn: str = "geglu"
    attention_bias: bool = False
    only_cross_attention: bool = False
    double_self_attention: bool = False
    norm_elementwise_affine: bool = True
    norm_type: str = "layer_norm"
    norm_eps: float = 1e-5
    ff_inner_dim: int | None = None
    ff_bias: bool = True
    attention_out_bias: bool = True
    qkv_kernel_init: Initializer = _lecun
    out_kernel_init: Initializer = _lecun
    ff_kernel_init: Initializer = _lecun
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"BasicTransformerBlock: norm_type={self.norm_type!r} is not supported "
                             f"(expected one of {NORM_TYPES})")
        for key in ("only_cross_attention", "double_self_attention"):
            if getattr(self, key):
                raise ValueError(f"BasicTransformerBlock: {key}=True is not supported (expected False)")
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"BasicTransformerBlock: activation_fn={self.activation_fn!r} is not supported "
                             f"(expected one of {ACTIVATIONS})")

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None,
                 emb: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """hidden_states [B, L, D]; encoder_hidden_states [B, Lk, cross_attention_dim] (required iff
        `cross_attention_dim` is set); emb [B, D_emb] (required iff norm_type='ada_norm_zero'). -> [B, L, D]."""
        self._check_inputs(encoder_hidden_states, emb)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = dict(epsilon=self.norm_eps, use_scale_bias=self.norm_elementwise_affine, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        attn = dict(heads=self.num_attention_heads, dim_head=self.attention_head_dim, bias=self.attention_bias,
                    out_bias=self.attention_out_bias, dropout=self.dropout, kernel_init=self.qkv_kernel_init,
                    out_kernel_init=self.out_kernel_init, attention_backend=self.attention_backend, **kw)
        x = hidden_states
        ada = self.norm_type == "ada_norm_zero"
        if ada:
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(name="norm1", **kw)(x, emb)
        else:
            h = LayerNorm(name="norm1", **ln)(x)
        a = Attention(name="attn1", **attn)(h, train=train)
        x = x + (gate_msa * a if ada else a)

        if self.cross_attention_dim is not None:
            h = LayerNorm(name="norm2", **ln)(x)
            x = x + Attention(name="attn2", **attn)(h, encoder_hidden_states, train=train)

        h = LayerNorm(name="norm3", **ln)(x)
        if ada:
            h = h * (1 + scale_mlp) + shift_mlp
        f = FeedForward(self.activation_fn, self.ff_inner_dim, bias=self.ff_bias, dropout=self.dropout,
                        kernel_init=self.ff_kernel_init, name="ff", **kw)(h, train=train)
        x = x + (gate_mlp * f if ada else f)
        return nn.with_logical_constraint(x, TOKEN_AXES)

    def _check_inputs(self, encoder_hidden_states: jax.Array | None, emb: jax.Array | None) -> None:
        where = f"BasicTransformerBlock {self.name or ''}".rstrip()
        if self.cross_attention_dim is None and encoder_hidden_states is not None:
            raise ValueError(f"{where}: encoder_hidden_states given but cross_attention_dim is None (no attn2)")
        if self.cross_attention_dim is not None:
            if encoder_hidden_states is None:
                raise ValueError(f"{where}: encoder_hidden_states [B, Lk, {self.cross_attention_dim}] are required "
                                 f"(cross_attention_dim is set)")
            if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.cross_attention_dim:
                raise ValueError(f"{where}: encoder_hidden_states must be [B, Lk, {self.cross_attention_dim}] "
                                 f"(cross_attention_dim), got {encoder_hidden_states.shape}")
        if (emb is None) == (self.norm_type == "ada_norm_zero"):
            raise ValueError(f"{where}: emb [B, D] is required with norm_type='ada_norm_zero' and only then "
                             f"(norm_type={self.norm_type!r}, emb {'missing' if emb is None else 'given'})")
