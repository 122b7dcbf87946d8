"""DiT: the class-conditional Diffusion Transformer of Peebles & Xie (2023), "Scalable Diffusion Models
with Transformers".

Latents [B, H, W, C] are cut into p x p patches (a stride-p conv), given a fixed 2-D sin-cos position
embedding, and run through N transformer blocks whose LayerNorms are modulated by the conditioning
c = MLP(sincos(t)) + table[y] ("adaLN-Zero": each block regresses shift/scale/gate from c, and the
regression is zero-initialised so a fresh block is the identity). A final adaLN layer and a linear map
give p*p*C_out values per token, unpatchified back to [B, H, W, C_out]; with `learn_sigma` C_out = 2C
(eps and the variance interpolation of improved DDPM, see `diffax.learned_variance`).

Parameter names mirror diffusers' `DiTTransformer2DModel` (`transformer_blocks_3/attn1/to_q/kernel`,
`pos_embed/proj/kernel`, `proj_out_1`), except that the timestep and label embedders live once at the
top (`emb/timestep_embedder`, `emb/class_embedder`) as in the reference code: diffusers keeps an
identical copy inside every block's `norm1` and only ever uses block 0's. `diffax.convert.load` / `save`
map both layouts. Each block is the shared `BasicTransformerBlock` (diffax/models/transformer.py) with
norm_type 'ada_norm_zero'.

Two details differ between the reference code and diffusers, so they are config fields:
  freq_shift  the timestep frequencies are exp(-ln(1e4) * i / (128 - shift)); the reference uses 0,
              diffusers' `CombinedTimestepLabelEmbeddings` hard-codes 1.
  norm_eps    eps of the LayerNorm before the MLP; the reference uses 1e-6, diffusers its `norm_eps`
              config key (default 1e-5). Every other adaLN LayerNorm uses 1e-6 in both.
The config's fields are diffusers' config.json keys; `DiTConfig.preset` and `DiTConfig.from_reference`
follow the reference code, `DiTConfig.from_diffusers` follows diffusers, so a converted model reproduces
whichever code it came from. Registered as 'DiTTransformer2DModel' (alias 'dit').

Label dropout for classifier-free guidance is NOT done here: the train step replaces labels by the null
id `num_classes` (the table has num_classes + 1 rows when class_dropout_prob > 0), which keeps the module
deterministic and the dropout visible in one place.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.config_base import DenoiserConfigBase
from diffax.models.layers import LayerNorm, TimestepEmbedding, conv, dense, timestep_embedding
from diffax.models.registry import ModelFamily, abstract_params, register
from diffax.models.remat import check_policy, remat_call
from diffax.models.transformer import TOKEN_AXES, BasicTransformerBlock

Dtype = Any

FREQUENCY_DIM = 256  # width of the sinusoidal timestep features, fixed in the reference and diffusers

# name -> (hidden_size, depth, num_heads), Table 1 of the paper.
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PRESETS = tuple(f"DiT-{s}/{p}" for s in SIZES for p in (2, 4, 8))

# Initialisers of the reference `DiT.initialize_weights`.
_xavier = nn.initializers.xavier_uniform()
# The reference's fused qkv Linear [3D, D] is xavier-initialised with fan_avg = 2D; split into three
# [D, D] kernels (fan_avg = D) the same variance 1/(2D) needs scale 0.5.
_qkv_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
# The patch conv is initialised like a Linear on the flattened [p*p*C, D] kernel.
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
_zeros = nn.initializers.zeros_init()
_embed_init = nn.initializers.normal(0.02)


# The reference code's constructor arguments (facebookresearch/DiT `DiT.__init__`), for `from_reference`.
REFERENCE_DEFAULTS = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                          mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)
# Keys of the older `Transformer2DModel` layout that DiT does not use, with the only value DiT accepts.
_T2D_UNUSED = {
    "cross_attention_dim": None, "num_vector_embeds": None, "only_cross_attention": False,
    "double_self_attention": False, "attention_type": "default", "caption_channels": None,
}
# Transformer2DModel's defaults differ from DiT's, so such a config must state these.
_T2D_MUST_STATE = ("attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size",
                   "activation_fn", "num_embeds_ada_norm", "attention_bias", "norm_type", "norm_elementwise_affine")
# Keys whose value must be the one DiT uses.
_REQUIRED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
             "norm_elementwise_affine": False, "dropout": 0.0}


@dataclasses.dataclass(frozen=True)
class DiTConfig(DenoiserConfigBase):
    """diffusers' `DiTTransformer2DModel` config (same keys, same defaults), plus diffax's fields.

    `preset('DiT-XL/2')` and `from_reference(hidden_size=..., depth=...)` build the reference code's
    configs (learned sigma, freq_shift 0, pre-MLP eps 1e-6). `norm_num_groups` and `upcast_attention` are
    kept for round trips only: DiT has no GroupNorm and its softmax always runs in fp32.
    """
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None  # None: in_channels; 2 * in_channels: learned sigma
    num_layers: int = 28
    dropout: float = 0.0
    norm_num_groups: int = 32
    attention_bias: bool = True
    sample_size: int = 32            # latent side the model was trained at (sets the pos-embed grid)
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000  # number of classes
    upcast_attention: bool = False
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5           # eps of the pre-MLP LayerNorm (the reference uses 1e-6)
    # diffax-only, stored under "_diffax" in config.json
    freq_shift: float = 1.0          # timestep frequency shift: 1 diffusers, 0 reference (module doc)
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # used by the train step; > 0 adds the null-class row to the table
    # runtime
    dtype: Dtype = jnp.float32       # compute dtype; norms and softmax run in fp32 regardless
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"
    remat: str | bool = "none"       # rematerialisation policy of each block (diffax/models/remat.py)

    class_name: ClassVar[str] = "DiTTransformer2DModel"
    accepted_class_names: ClassVar[tuple[str, ...]] = ("Transformer2DModel",)
    runtime_fields: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "attention_backend", "remat")
    extra_fields: ClassVar[tuple[str, ...]] = ("freq_shift", "mlp_ratio", "class_dropout_prob")

    def __post_init__(self):
        object.__setattr__(self, "remat", check_policy(self.remat))
        for key, want in _REQUIRED.items():
            if getattr(self, key) != want:
                raise ValueError(f"{key}={getattr(self, key)!r} is not supported (DiT needs {want!r})")
        for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size",
                    "patch_size", "num_embeds_ada_norm"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} is not supported (expected a positive int)")
        for key in ("norm_eps", "mlp_ratio"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{key}={value!r} is not supported (expected a positive finite number)")
        if not 0 <= self.class_dropout_prob <= 1:
            raise ValueError(f"class_dropout_prob={self.class_dropout_prob!r} must be in [0, 1]")
        if self.out_channels not in (None, self.in_channels, 2 * self.in_channels):
            raise ValueError(f"out_channels={self.out_channels} must be in_channels ({self.in_channels}) or "
                             f"twice it (learned sigma)")
        if self.hidden_size % 4:
            raise ValueError(f"num_attention_heads x attention_head_dim = {self.hidden_size} must be divisible "
                             f"by 4 (2-D sin-cos position embedding)")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is not divisible by patch_size {self.patch_size}")

    @classmethod
    def _translate(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        """Reads the older `Transformer2DModel` layout diffusers saved DiTs in (e.g. facebook/DiT-XL-2-256)."""
        if cfg.get("_class_name") != "Transformer2DModel":
            return cfg
        absent = [k for k in _T2D_MUST_STATE if k not in cfg]
        if absent:
            raise ValueError(f"{source}: a Transformer2DModel config must state {', '.join(absent)} "
                             f"(its defaults differ from DiT's)")
        for key, want in _T2D_UNUSED.items():
            if cfg.get(key, want) != want:
                raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported (DiT needs {want!r})")
        scale = cfg.get("interpolation_scale")
        if scale not in (None, 1, 1.0) or (scale is None and cfg["sample_size"] >= 128):
            # Transformer2DModel scales positions by sample_size // 64 then; DiTTransformer2DModel never does.
            raise ValueError(f"{source}: Transformer2DModel pos-embed interpolation_scale "
                             f"{scale or cfg['sample_size'] // 64} is not supported by DiT")
        dropped = {*_T2D_UNUSED, "interpolation_scale", "use_linear_projection"}
        return {k: v for k, v in cfg.items() if k not in dropped}

    @classmethod
    def from_reference(cls, **kwargs: Any) -> "DiTConfig":
        """The config of the reference code's `DiT(input_size, patch_size, in_channels, hidden_size, depth,
        num_heads, mlp_ratio, class_dropout_prob, num_classes, learn_sigma)`; runtime fields may be given too."""
        unknown = sorted(kwargs.keys() - REFERENCE_DEFAULTS.keys() - set(cls.runtime_fields))
        if unknown:
            raise ValueError(f"DiTConfig.from_reference: unknown argument(s) {unknown}; the reference DiT takes "
                             f"{sorted(REFERENCE_DEFAULTS)}")
        r = {**REFERENCE_DEFAULTS, **kwargs}
        for key in ("hidden_size", "num_heads"):
            if not isinstance(r[key], int) or r[key] < 1:
                raise ValueError(f"DiTConfig.from_reference: {key}={r[key]!r} must be a positive int")
        if r["hidden_size"] % r["num_heads"]:
            raise ValueError(f"DiTConfig: hidden_size {r['hidden_size']} is not divisible by num_heads {r['num_heads']}")
        runtime = {k: r[k] for k in cls.runtime_fields if k in r}
        return cls(num_attention_heads=r["num_heads"], attention_head_dim=r["hidden_size"] // r["num_heads"],
                   in_channels=r["in_channels"], out_channels=r["in_channels"] * (2 if r["learn_sigma"] else 1),
                   num_layers=r["depth"], sample_size=r["input_size"], patch_size=r["patch_size"],
                   num_embeds_ada_norm=r["num_classes"], norm_eps=1e-6, freq_shift=0.0, mlp_ratio=r["mlp_ratio"],
                   class_dropout_prob=r["class_dropout_prob"], **runtime)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DiTConfig":
        """A named size of the paper, 'DiT-S/2' ... 'DiT-XL/8', in the reference's conventions; `overrides`
        are config fields (diffusers keys, diffax extras or runtime fields)."""
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {', '.join(PRESETS)}")
        size, patch = name[4:].split("/")
        hidden, depth, heads = SIZES[size]
        base = cls.from_reference(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch))
        if "in_channels" in overrides and "out_channels" not in overrides:  # keep the learned sigma
            overrides["out_channels"] = 2 * overrides["in_channels"]
        try:
            return dataclasses.replace(base, **overrides)
        except TypeError as e:  # an unknown field
            raise ValueError(f"DiTConfig.preset: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        """config.json keys of the equivalent diffusers `DiTTransformer2DModel` (diffax's extras under
        "_diffax").

        diffusers cannot express `freq_shift != 1` (it hard-codes 1), so a reference-layout model exported
        this way computes different timestep frequencies in diffusers (as diffusers' own conversion of the
        released DiT checkpoints does); a warning says so.
        """
        problems = []
        if self.mlp_ratio != 4.0:
            problems.append(f"mlp_ratio={self.mlp_ratio} (diffusers' FeedForward is fixed at 4)")
        if self.class_dropout_prob <= 0:
            problems.append("class_dropout_prob=0 (diffusers' label table always has the null-class row)")
        if problems:
            raise ValueError("DiTConfig.to_diffusers: diffusers cannot represent " + "; ".join(problems))
        if self.freq_shift != 1.0:
            warnings.warn(f"DiTConfig.to_diffusers: freq_shift={self.freq_shift} but diffusers hard-codes "
                          f"downscale_freq_shift=1 for DiT, so in diffusers this model's timestep frequencies "
                          f"(and outputs) differ from diffax's and the reference code's", stacklevel=2)
        return super().to_diffusers()

    # Names the model code uses (the reference's).
    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def depth(self) -> int:
        return self.num_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def input_size(self) -> int:
        return self.sample_size

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def learn_sigma(self) -> bool:
        return self.output_channels == 2 * self.in_channels

    @property
    def num_classes(self) -> int:
        return self.num_embeds_ada_norm

    @property
    def num_embeddings(self) -> int:
        """Rows of the label table: the classes plus the null class when label dropout is used."""
        return self.num_classes + (self.class_dropout_prob > 0)

    @property
    def null_class(self) -> int:
        """The label id the train step and CFG sampling use for "no class"."""
        if self.class_dropout_prob <= 0:
            raise ValueError("DiTConfig: class_dropout_prob is 0, so the label table has no null class")
        return self.num_classes

    @property
    def num_patches(self) -> int:
        return (self.sample_size // self.patch_size) ** 2

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.sample_size, self.sample_size, self.in_channels

    @property
    def has_null_cond(self) -> bool:
        return self.class_dropout_prob > 0

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        sample = jnp.zeros((batch, self.sample_size, self.sample_size, self.in_channels), jnp.float32)
        return sample, jnp.zeros((batch,)), {"class_labels": jnp.zeros((batch,), jnp.int32)}


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid_h * grid_w, dim] (float32), tokens in row-major order.

    The first half of the channels encodes the column, the second the row (the MAE/DiT convention), each as
    [sin(pos * w), cos(pos * w)] with w = 10000^(-k / (dim/4)). Positions are scaled by base_size / grid,
    diffusers' rule for running at a resolution other than the trained one; at the trained grid
    (grid == base_size) this is exactly the reference table. Computed in float64 like both originals.
    """
    rows = np.arange(grid_h, dtype=np.float64) * (base_size / grid_h)
    cols = np.arange(grid_w, dtype=np.float64) * (base_size / grid_w)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # [dim/4]

    def one_d(pos: np.ndarray) -> np.ndarray:  # [M] -> [M, dim/2]
        out = pos[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    col_grid, row_grid = np.meshgrid(cols, rows)  # each [grid_h, grid_w]
    emb = np.concatenate([one_d(col_grid.reshape(-1)), one_d(row_grid.reshape(-1))], axis=1)
    return emb.astype(np.float32)


class PatchEmbed(nn.Module):
    """Stride-p conv to tokens plus the fixed sin-cos position embedding (diffusers' `PatchEmbed`)."""
    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, h*w, D]
        cfg = self.config
        p = cfg.patch_size
        x = conv(cfg.hidden_size, p, strides=p, padding="VALID", axes=(None, None, None, "embed"),
                 kernel_init=_patch_init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="proj")(x)
        b, h, w, d = x.shape
        pos = sincos_pos_embed_2d(d, h, w, base_size=cfg.input_size // p)
        return (x.reshape(b, h * w, d) + jnp.asarray(pos, x.dtype)[None]).astype(cfg.dtype)


class LabelEmbedding(nn.Module):
    """The class table, with the null class as row `num_classes` (diffusers' `LabelEmbedding`)."""
    config: DiTConfig

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:  # [B] int -> [B, D]
        cfg = self.config
        table = nn.Embed(cfg.num_embeddings, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=nn.with_logical_partitioning(_embed_init, (None, "embed")),
                         name="embedding_table")
        return table(labels)


class ConditionEmbedding(nn.Module):
    """c = MLP(sincos(t)) + table[y]: diffusers' `CombinedTimestepLabelEmbeddings`, stored once."""
    config: DiTConfig

    @nn.compact
    def __call__(self, timesteps: jax.Array, labels: jax.Array) -> jax.Array:  # [B], [B] -> [B, D]
        cfg = self.config
        freqs = timestep_embedding(timesteps, FREQUENCY_DIM, flip_sin_to_cos=True,
                                   downscale_freq_shift=cfg.freq_shift)  # [B, 256] fp32
        t_emb = TimestepEmbedding(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  kernel_init=_embed_init, name="timestep_embedder")(freqs.astype(cfg.dtype))
        return t_emb + LabelEmbedding(cfg, name="class_embedder")(labels)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


def dit_block(config: DiTConfig, *, name: str | None = None) -> BasicTransformerBlock:
    """One DiT block: x += gate_msa * attn(modulate(LN(x))); x += gate_mlp * mlp(modulate(LN(x))).

    diffusers' `BasicTransformerBlock(norm_type='ada_norm_zero', activation_fn='gelu-approximate',
    attention_bias=True, norm_elementwise_affine=False)` with the reference code's initialisers, called as
    `block(x [B, L, D], None, c [B, D])`.
    """
    return BasicTransformerBlock(config.num_heads, config.attention_head_dim, activation_fn="gelu-approximate", attention_bias=True,
                 norm_elementwise_affine=False, norm_type="ada_norm_zero", norm_eps=config.norm_eps,
                 ff_inner_dim=int(config.hidden_size * config.mlp_ratio), qkv_kernel_init=_qkv_init,
                 out_kernel_init=_xavier, ff_kernel_init=_xavier, attention_backend=config.attention_backend,
                 dtype=config.dtype, param_dtype=config.param_dtype, name=name)


class DiT(nn.Module):
    """The DiT denoiser. Call with sample [B, H, W, C] (NHWC latents), timesteps [B] (int or float) and
    class_labels [B] int32 (num_classes = the null class; None means all null); returns
    [B, H, W, 2C if learn_sigma else C] in float32 (eps first, then the variance values).

    `train` is accepted for the common diffax model signature; DiT has no dropout and does not drop labels
    itself (the train step does), so the output does not depend on it.
    """
    config: DiTConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, *, class_labels: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        del train  # see the class docstring
        cfg = self.config
        b, height, width, channels = sample.shape
        if class_labels is None:  # unconditional = the null class
            class_labels = jnp.full((b,), cfg.null_class, jnp.int32)
        p = cfg.patch_size
        if channels != cfg.in_channels or height % p or width % p:
            raise ValueError(f"DiT expects [B, H, W, {cfg.in_channels}] with H and W divisible by {p}; "
                             f"got {sample.shape}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        x = PatchEmbed(cfg, name="pos_embed")(sample.astype(cfg.dtype))  # [B, L, D]
        x = nn.with_logical_constraint(x, TOKEN_AXES)
        c = ConditionEmbedding(cfg, name="emb")(timesteps, class_labels)  # [B, D]

        for i in range(cfg.depth):
            x = remat_call(dit_block(cfg, name=f"transformer_blocks_{i}"), cfg.remat, x, None, c)

        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_zeros)
        shift, scale = jnp.split(dense(2 * cfg.hidden_size, axes=("embed", "mlp"), name="proj_out_1", **kw)(
            nn.silu(c))[:, None, :], 2, axis=-1)
        x = _modulate(LayerNorm(epsilon=1e-6, use_scale_bias=False, dtype=cfg.dtype)(x), shift, scale)
        out = cfg.output_channels
        x = dense(p * p * out, axes=("embed", None), name="proj_out_2", **kw)(x)  # [B, L, p*p*Co]

        h, w = height // p, width // p
        x = x.reshape(b, h, w, p, p, out).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, height, width, out).astype(jnp.float32)


def parameter_count(config: DiTConfig, *, include_pos_embed: bool = False) -> int:
    """Number of parameters of `DiT(config)`, computed from shapes only.

    `include_pos_embed` adds the fixed position table (num_patches x hidden_size), which the reference
    code keeps as a frozen `nn.Parameter` and so counts in the paper's figures (DiT-XL/2: 675,129,632).
    """
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
    return n + (config.num_patches * config.hidden_size if include_pos_embed else 0)


register(ModelFamily("DiTTransformer2DModel", DiTConfig, DiT, aliases=("dit",)))
