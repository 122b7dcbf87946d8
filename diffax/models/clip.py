"""CLIP's text encoder, the prompt encoder of Stable Diffusion: transformers' `CLIPTextModel` and
`CLIPTextModelWithProjection` in Flax, with their parameter names, and transformers' CLIP tokenizer.

    tokenizer = load_tokenizer("sd-folder/tokenizer")                    # vocab.json + merges.txt
    ids = tokenize(tokenizer, ["a photo of a cat"])                     # [B, 77] int32
    module, params = diffax.convert.load("sd-folder/text_encoder")       # a transformers folder
    out = module.apply({"params": params}, ids, output_hidden_states=True)
    out.last_hidden_state   # [B, 77, D] after final_layer_norm: SD 1.x / 2.x cross-attention context
    out.hidden_states[-2]   # [B, 77, D] the penultimate layer (SDXL's context, clip_skip=1)
    out.pooler_output       # [B, D] the EOS token's state;  out.text_embeds [B, projection_dim] (SDXL)

The architecture (Radford et al. 2021): token + learned position embeddings, pre-LayerNorm transformer
layers with causal self-attention, a final LayerNorm. The three text encoders of the Stable Diffusion
family are this one module at three sizes:
  SD 1.x  OpenAI ViT-L/14      CLIPTextModel                hidden_act 'quick_gelu', 12 layers of 768
  SD 2.x  OpenCLIP ViT-H/14    CLIPTextModel                hidden_act 'gelu', 23 layers of 1024
  SDXL    OpenCLIP ViT-bigG/14 CLIPTextModelWithProjection  hidden_act 'gelu', 32 layers of 1280
(SDXL's first encoder is SD 1.x's.) The config is transformers' `config.json`; the family is read from its
`architectures[0]`, as transformers writes no `_class_name`. Parameter names are transformers' state-dict
names (`text_model/encoder/layers_3/self_attn/q_proj/kernel` for
`text_model.encoder.layers.3.self_attn.q_proj.weight`), so `diffax.convert` needs the generic rules only.

The encoder runs deterministically: Stable Diffusion keeps it frozen, so `attention_dropout` and `dropout`
are read and written back but never applied.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.attention import BACKENDS, dot_product_attention
from diffax.models.config_base import DiffusersConfig
from diffax.models.layers import Embed, LayerNorm, dense, materialize
from diffax.models.registry import ModelFamily, register
from diffax.models.transformer import TOKEN_AXES

Dtype = Any

MODEL_TYPE = "clip_text_model"
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation
    "gelu": lambda x: nn.gelu(x, approximate=False),        # OpenCLIP: exact (erf) GELU
}
# The bookkeeping keys transformers writes into every config.json (its generic `PretrainedConfig` fields,
# transformers 4 and 5): read and ignored. `dtype` / `torch_dtype` say how the file stores its weights, not
# how diffax computes.
TRANSFORMERS_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "num_labels", "problem_type", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "tie_word_embeddings", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "gradient_checkpointing",
})
# eos_token_id of configs saved before transformers fixed it (every Stable Diffusion text encoder): such
# models pool the token with the highest id, which is CLIP's end-of-text token.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class TransformersConfig(DiffusersConfig):
    """A config that transformers writes: config.json names the class in `architectures` and the model in
    `model_type`, beside transformers' bookkeeping keys (`TRANSFORMERS_KEYS` plus `ignored_keys`)."""
    model_type: ClassVar[str]
    description: ClassVar[str]               # what the model is, for errors: 'a CLIP text encoder'
    ignored_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def _translate(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        """Drops transformers' bookkeeping keys; a config of another transformers model is refused."""
        model_type = cfg.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"{source}: model_type is {model_type!r}, not {cls.model_type!r} ({cls.description})")
        return {k: v for k, v in cfg.items() if k not in TRANSFORMERS_KEYS | cls.ignored_keys}

    def to_diffusers(self) -> dict[str, Any]:
        """transformers' config.json (`architectures`, `model_type`, the config's keys), which
        `transformers.<class_name>.from_pretrained` reads and `from_diffusers` reads back to an equal config."""
        out = super().to_diffusers()
        del out["_class_name"]
        return {"architectures": [self.class_name], "model_type": self.model_type, **out}


class CLIPTowerConfig(TransformersConfig):
    """What the configs of CLIP's text and image towers share (no fields of its own): the checks of their
    transformer's keys and the width of a head."""

    def check_transformer(self, bad: Callable[[str, str], ValueError]) -> None:
        """Raises `bad(key, expected)` for the first unsupported value among the keys both towers have:
        hidden_size (a multiple of num_attention_heads), hidden_act, layer_norm_eps, the dropouts, the
        initializer scales and attention_backend."""
        if self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", f"a multiple of num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise bad("hidden_act", " or ".join(repr(a) for a in ACTIVATIONS))
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise bad("layer_norm_eps", "a float in (0, 1)")
        for key in ("attention_dropout", "dropout"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise bad(key, "a float in [0, 1)")
        for key in ("initializer_range", "initializer_factor"):
            if not (isinstance(getattr(self, key), (int, float)) and math.isfinite(getattr(self, key))):
                raise bad(key, "a finite float")
        if self.attention_backend not in BACKENDS:
            raise bad("attention_backend", " or ".join(repr(b) for b in BACKENDS))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class _CLIPTextFields(CLIPTowerConfig):
    """The keys of transformers' `CLIPTextConfig` (same defaults: OpenAI CLIP ViT-B/32's text tower)."""
    model_type: ClassVar[str] = MODEL_TYPE
    description: ClassVar[str] = "a CLIP text encoder"
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512    # width of `text_projection` (used by the WithProjection family)
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0      # kept for round trips; never applied (module docstring)
    dropout: float = 0.0                # written by transformers 4; kept for round trips
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407           # 2 (LEGACY_EOS_TOKEN_ID): pool at the highest token id
    # runtime
    dtype: Dtype = jnp.float32          # compute dtype; LayerNorms and softmax run in fp32 regardless
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"

    with_projection: ClassVar[bool] = False

    def __post_init__(self):
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{key}={getattr(self, key)!r} is not supported (expected {expected})")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "a positive int")
        self.check_transformer(bad)
        projection = self.projection_dim
        if projection is not None and (not isinstance(projection, int) or projection < 1):
            raise bad("projection_dim", "a positive int")
        if self.with_projection and projection is None:
            raise bad("projection_dim", f"a positive int ({self.class_name} projects to it)")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise bad(key, "a non-negative int" + ("" if key == "eos_token_id" else " or null"))

    def init_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """((input_ids [1, max_position_embeddings] int32,), {})."""
        return (jnp.zeros((1, self.max_position_embeddings), jnp.int32),), {}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_CLIPTextFields):
    """transformers' `CLIPTextModel` config (SD 1.x / 2.x text encoders): last_hidden_state and pooler_output."""
    class_name: ClassVar[str] = "CLIPTextModel"


@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjectionConfig(_CLIPTextFields):
    """transformers' `CLIPTextModelWithProjection` config (SDXL's second text encoder): adds `text_embeds`,
    the pooled state through `text_projection` (no bias)."""
    class_name: ClassVar[str] = "CLIPTextModelWithProjection"
    with_projection: ClassVar[bool] = True


@flax.struct.dataclass
class CLIPTextOutput:
    """transformers' output names. hidden_states: None, or (embeddings, layer 1, ..., layer N) each
    [B, L, D], the last before final_layer_norm; text_embeds: None without a projection."""
    last_hidden_state: jax.Array        # [B, L, D]
    pooler_output: jax.Array            # [B, D]
    text_embeds: jax.Array | None = None  # [B, projection_dim]
    hidden_states: tuple[jax.Array, ...] | None = None


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q_proj / k_proj / v_proj / out_proj (all with bias) and a mask (None:
    every token attends everywhere, as in CLIP's vision tower, diffax.models.clip_vision)."""
    config: _CLIPTextFields

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # [B, L, D], [B|1, 1, L, L] -> [B, L, D]
        cfg = self.config
        b, length, d = x.shape
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        # transformers' init: q/k/v std D^-0.5 (2N)^-0.5, out D^-0.5 (times initializer_factor).
        in_std = d ** -0.5 * (2 * cfg.num_hidden_layers) ** -0.5 * cfg.initializer_factor

        def project(name: str) -> jax.Array:  # [B, L, heads, head_dim]
            y = dense(d, axes=("embed", "heads"), kernel_init=_normal(in_std), name=name, **kw)(x)
            return nn.with_logical_constraint(y.reshape(b, length, cfg.num_attention_heads, cfg.head_dim),
                                              ("batch", "length", "heads", None))

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        o = dot_product_attention(q, k, v, backend=cfg.attention_backend, mask=mask).reshape(b, length, d)
        return dense(d, axes=("heads", "embed"), kernel_init=_normal(d ** -0.5 * cfg.initializer_factor),
                     name="out_proj", **kw)(o)


class CLIPMLP(nn.Module):
    """fc1 -> hidden_act -> fc2."""
    config: _CLIPTextFields

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        d, f = cfg.hidden_size, cfg.initializer_factor
        h = dense(cfg.intermediate_size, axes=("embed", "mlp"), kernel_init=_normal((2 * d) ** -0.5 * f),
                  name="fc1", **kw)(x)
        h = nn.with_logical_constraint(ACTIVATIONS[cfg.hidden_act](h), ("batch", "length", "mlp"))
        out_std = d ** -0.5 * (2 * cfg.num_hidden_layers) ** -0.5 * f
        return dense(d, axes=("mlp", "embed"), kernel_init=_normal(out_std), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""
    config: _CLIPTextFields

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # [B, L, D] -> [B, L, D]
        cfg = self.config
        ln = dict(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        x = x + CLIPAttention(cfg, name="self_attn")(LayerNorm(name="layer_norm1", **ln)(x), mask)
        x = x + CLIPMLP(cfg, name="mlp")(LayerNorm(name="layer_norm2", **ln)(x))
        return nn.with_logical_constraint(x, TOKEN_AXES)


class CLIPTextEmbeddings(nn.Module):
    """token_embedding(input_ids) + position_embedding(0..L-1)."""
    config: _CLIPTextFields

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:  # [B, L] -> [B, L, D]
        cfg = self.config
        std = 0.02 * cfg.initializer_factor
        embed = dict(features=cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        # 'vocab' has no default sharding rule: the table is split over its width ('embed') only.
        vocab_init = nn.with_logical_partitioning(_normal(std), ("vocab", "embed"))
        tokens = Embed(cfg.vocab_size, embedding_init=vocab_init, name="token_embedding", **embed)(input_ids)
        positions = Embed(cfg.max_position_embeddings, name="position_embedding",
                          embedding_init=nn.with_logical_partitioning(_normal(std), (None, "embed")),
                          **embed)(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    """layers_0 ... layers_{N-1}; returns the last output and every layer's input and output."""
    config: _CLIPTextFields

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, list[jax.Array]]:  # [B, L, D]
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = materialize(CLIPEncoderLayer(self.config, name=f"layers_{i}")(x, mask))
            states.append(x)
        return x, states


class CLIPTextTransformer(nn.Module):
    """embeddings -> encoder -> final_layer_norm, and the pooled end-of-text state."""
    config: _CLIPTextFields

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                 output_hidden_states: bool) -> CLIPTextOutput:
        cfg = self.config
        length = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L, L] causal
        if attention_mask is not None:  # padding: no query attends to a padded key
            mask = mask & (attention_mask != 0)[:, None, None, :]  # [B, 1, L, L]
        x = nn.with_logical_constraint(CLIPTextEmbeddings(cfg, name="embeddings")(input_ids), TOKEN_AXES)
        x, states = CLIPEncoder(cfg, name="encoder")(x, mask)
        last = LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         name="final_layer_norm")(x)
        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)  # [B]
        else:  # the first end-of-text token (padding may repeat it)
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # [B]
        pooled = last[jnp.arange(input_ids.shape[0]), eos]  # [B, D]
        return CLIPTextOutput(last, pooled, None, tuple(states) if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` (by the config's class); see the
    module docstring."""
    config: _CLIPTextFields

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids [B, L] int token ids (L <= max_position_embeddings); attention_mask [B, L], 1 for tokens
        and 0 for padding (None: no padding mask; the causal mask always applies). -> CLIPTextOutput."""
        cfg = self.config
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"{cfg.class_name}: input_ids must be [B, L] integer token ids, got "
                             f"{input_ids.dtype}{list(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"{cfg.class_name}: {input_ids.shape[1]} tokens, more than max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"{cfg.class_name}: attention_mask {attention_mask.shape} must be input_ids' shape "
                             f"{input_ids.shape}")
        out = CLIPTextTransformer(cfg, name="text_model")(input_ids, attention_mask, output_hidden_states)
        if not cfg.with_projection:
            return out
        std = cfg.hidden_size ** -0.5 * cfg.initializer_factor
        embeds = dense(cfg.projection_dim, axes=("embed", "mlp"), use_bias=False, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, kernel_init=_normal(std), name="text_projection")(out.pooler_output)
        return out.replace(text_embeds=embeds)


# ----------------------------------------------------------------------------- tokenizer

TOKENIZER_FILES = ("vocab.json", "merges.txt")


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """transformers' `CLIPTokenizer` of a tokenizer folder (`vocab.json`, `merges.txt`, and the
    tokenizer_config.json / special_tokens_map.json beside them when present: SD 2.x pads with '!').
    Needs transformers (no torch). ValueError naming the missing file otherwise."""
    folder = Path(folder)
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name}: missing (a CLIP tokenizer folder holds "
                             f"{' and '.join(TOKENIZER_FILES)})")
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        raise ValueError(f"{folder}: reading a CLIP tokenizer needs transformers: pip install transformers") from None
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:  # a vocab.json or merges.txt that does not parse
        raise ValueError(f"{folder}: not a readable CLIP tokenizer ({type(e).__name__}: {e})") from None


def tokenize(tokenizer: Any, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
    """[B, max_length] int32 token ids of `prompts`, padded and truncated to `max_length` as diffusers'
    pipelines do (`padding='max_length', truncation=True`; a truncated prompt keeps its end-of-text token).
    77 is every Stable Diffusion text encoder's `max_position_embeddings`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)


register(ModelFamily("CLIPTextModel", CLIPTextConfig, CLIPTextModel, aliases=("clip_text",)))
register(ModelFamily("CLIPTextModelWithProjection", CLIPTextWithProjectionConfig, CLIPTextModel,
                     aliases=("clip_text_projection",)))
