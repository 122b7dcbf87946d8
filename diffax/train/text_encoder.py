"""Training the text encoder with the U-Net: `train.text_encoder='full'` or `'lora'` (diffusers'
`--train_text_encoder` of train_text_to_image / DreamBooth, and its LoRA scripts' text-encoder LoRA).

    python train.py --config=configs/sd15_finetune.py --workdir=runs/sd15_te \
        --config.train.init_from=models/stable-diffusion-v1-5 --config.data.path=data/my_images_sd15 \
        --config.train.text_encoder=full            # or: train.finetune=lora train.text_encoder=lora

A latent cache stores each caption's token ids beside its frozen embeddings (diffax/data/latent_cache.py).
A run that trains the text encoder ignores the embeddings: the model it trains is `WithTextEncoder`, the
U-Net run on the hidden states of a CLIP text encoder applied to the batch's token ids inside the loss, so
one parameter tree `{'unet': ..., 'text_encoder': ...}` gets the gradients, and the optimizer, EMA,
fine-tuning mask and checkpoints handle it as any other tree. Label dropout swaps an example's token ids for
the empty prompt's (the cache's manifest holds them), so the encoder learns the null conditioning that
classifier-free guidance samples with.

The text encoder starts from `train.init_from`'s text_encoder/ (a diffusers pipeline folder); it must be
the model the cache's tokenizer was made for. Modes (train.text_encoder must match train.finetune):

  full  every weight of both models trains. The run ends by writing WORKDIR/export/, the pipeline folder
        with the trained unet/ and text_encoder/ (the other components copied from train.init_from), which
        diffusers' `from_pretrained` and `diffax.pipelines.load` read.
  lora  both bases are frozen; the U-Net gets LoRA factors on `train.lora.targets`, the text encoder on its
        attention projections (q_proj, k_proj, v_proj, out_proj), with the same rank and alpha. The export
        WORKDIR/export/pytorch_lora_weights.safetensors holds `unet.` and `text_encoder.` keys, which
        diffusers' `load_lora_weights` and `diffax.pipelines`' LoRA loading apply to both models.

Grids (train.sample_every) encode their prompts and the empty prompt with the EMA text encoder.

SDXL (a U-Net with addition_embed_type 'text_time'; diffusers' train_text_to_image_lora_sdxl.py and
train_dreambooth_lora_sdxl.py `--train_text_encoder`): the model is `WithTextEncoders`, both encoders of
train.init_from (text_encoder/ and text_encoder_2/) run on the cache's two token-id arrays and give the U-Net
their concatenated penultimate hidden states and text_encoder_2's pooled `text_embeds`, as the frozen cache
does (`diffax.pipelines.text_encoding.encode_prompt_sdxl`); the time ids come from the cache. Params are
{'unet', 'text_encoder', 'text_encoder_2'}; LoRA puts factors on both encoders' attention projections and the
file adds `text_encoder_2.` keys; the full export writes text_encoder/ and text_encoder_2/. Its grids are not
drawn while training (train.sample_every and train.eval_every must be 0): sample the export.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax import parallel
from diffax.models import boxed_init, logical_specs
from diffax.pipelines.text_encoding import encode_prompt_sdxl
from diffax.train import evaluate, finetune
from diffax.train.state import TrainState, init_train_state, place_train_state

MODES = ("frozen", "full", "lora")
# The text encoder's LoRA'd kernels: its attention projections, diffusers' text_encoder_target_modules.
LORA_TARGETS = r"/(q_proj|k_proj|v_proj|out_proj)/kernel$"
UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"

Params = dict[str, Any]


class WithTextEncoder(nn.Module):
    """The U-Net conditioned on a text encoder's last hidden states of token ids: one module whose params are
    {'unet': ..., 'text_encoder': ...}. `config` is the U-Net's, which the train step and objective read."""
    unet: nn.Module
    text_encoder: nn.Module

    @property
    def config(self) -> Any:
        return self.unet.config

    def __call__(self, sample: jax.Array, timesteps: jax.Array, *, input_ids: jax.Array, train: bool = False
                 ) -> jax.Array:
        """sample [B, h, w, c], timesteps [B], input_ids [B, L] int -> the U-Net's prediction [B, h, w, c']."""
        hidden = self.text_encoder(input_ids).last_hidden_state  # [B, L, D]
        return self.unet(sample, timesteps, encoder_hidden_states=hidden, train=train)


class WithTextEncoders(nn.Module):
    """SDXL's U-Net conditioned on its two text encoders: one module whose params are {'unet': ...,
    'text_encoder': ..., 'text_encoder_2': ...}. `config` is the U-Net's."""
    unet: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module  # a CLIPTextModelWithProjection: the pooled embedding

    @property
    def config(self) -> Any:
        return self.unet.config

    def __call__(self, sample: jax.Array, timesteps: jax.Array, *, input_ids: jax.Array, input_ids_2: jax.Array,
                 time_ids: jax.Array, train: bool = False) -> jax.Array:
        """sample [B, h, w, c], timesteps [B], input_ids / input_ids_2 [B, L] int (the two tokenizers'), time_ids
        [B, 6] -> the U-Net's prediction [B, h, w, c']."""
        params = self.variables["params"]
        # The encoders applied unbound to this module's params: the SDXL prompt encoding of the pipelines.
        encoders = [(m.clone(parent=None), params[name]) for m, name in
                    ((self.text_encoder, TEXT_ENCODER), (self.text_encoder_2, TEXT_ENCODER_2))]
        context, pooled = encode_prompt_sdxl(encoders, [input_ids, input_ids_2])  # [B, L, D1 + D2], [B, P]
        return self.unet(sample, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, train=train)


def is_composite(model: nn.Module) -> bool:
    """Whether `model` runs its text encoder(s) on token ids (WithTextEncoder or WithTextEncoders)."""
    return isinstance(model, (WithTextEncoder, WithTextEncoders))


def encoder_names(model: nn.Module) -> tuple[str, ...]:
    """The text-encoder components of a WithTextEncoder(s) model, as its params and pipeline folder name them."""
    return (TEXT_ENCODER, TEXT_ENCODER_2) if isinstance(model, WithTextEncoders) else (TEXT_ENCODER,)


def is_sdxl(unet: nn.Module) -> bool:
    """Whether `unet` is an SDXL U-Net (addition_embed_type 'text_time': pooled embeddings and time ids)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


class TextEncoderError(finetune.FinetuneError):
    """A text-encoder training option, base or cache that does not fit; the message names the key or file."""


def is_trained(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains the text encoder (train.text_encoder 'full' or 'lora')."""
    return config.train.get("text_encoder", "frozen") != "frozen"


def check_options(config: ml_collections.ConfigDict, source: Any) -> None:
    """TextEncoderError naming the key when train.text_encoder cannot run with this config and data."""
    tc = config.train
    if tc.text_encoder not in MODES:
        raise TextEncoderError(f"config key 'train.text_encoder' must be one of {', '.join(MODES)}, got "
                               f"{tc.text_encoder!r}")
    if tc.finetune != tc.text_encoder:
        raise TextEncoderError(f"config key 'train.text_encoder' is {tc.text_encoder!r} but train.finetune is "
                               f"{tc.finetune!r}: the two models train the same way ('full' with 'full', "
                               f"'lora' with 'lora')")
    if not tc.init_from or not (Path(tc.init_from) / TEXT_ENCODER).is_dir():
        raise TextEncoderError(f"config key 'train.text_encoder' is {tc.text_encoder!r}: set train.init_from to "
                               f"a diffusers pipeline folder with {TEXT_ENCODER}/ (got {tc.init_from!r})")
    if getattr(source, "null_input_ids", None) is None:
        raise TextEncoderError(f"config key 'train.text_encoder' is {tc.text_encoder!r} but data.path="
                               f"{config.data.path!r} is not a latent cache with token ids (written with a text "
                               f"encoder by this diffax's `python -m diffax.data.cache`): write the cache again")


def check_sdxl_options(config: ml_collections.ConfigDict, source: Any) -> None:
    """TextEncoderError naming the key when an SDXL run cannot train its two text encoders with this config
    and data (besides `check_options`)."""
    tc = config.train
    if not (Path(tc.init_from) / TEXT_ENCODER_2).is_dir():
        raise TextEncoderError(f"config key 'train.text_encoder' is {tc.text_encoder!r} for an SDXL U-Net: "
                               f"train.init_from={tc.init_from!r} must be an SDXL pipeline folder with "
                               f"{TEXT_ENCODER_2}/")
    if getattr(source, "null_input_ids_2", None) is None:
        raise TextEncoderError(f"config key 'train.text_encoder' is {tc.text_encoder!r} for an SDXL U-Net but "
                               f"data.path={config.data.path!r} holds no second tokenizer's token ids (written by "
                               f"this diffax's `python -m diffax.data.cache` with both encoders): write it again")
    if tc.sample_every or tc.eval_every:
        raise TextEncoderError("config keys 'train.sample_every' / 'train.eval_every' must be 0 when an SDXL run "
                               "trains its text encoders: its grids are not drawn while training; sample the "
                               "export")


def load_text_encoder(init_from: str, width: int | None, length: int, subfolder: str = TEXT_ENCODER
                      ) -> tuple[nn.Module, Params]:
    """(CLIP text module, host params) of the pipeline folder's `subfolder`, checked against the hidden width
    the U-Net reads from it (`width`; None: not checked) and the cache's token length."""
    from diffax import convert
    module, params = convert.load(init_from, subfolder=subfolder)
    where = f"train.init_from={init_from}: {subfolder}/"
    if not type(module).__name__.startswith("CLIPText"):
        raise TextEncoderError(f"{where} holds a {module.config.class_name}, not a CLIP text encoder")
    if width is not None and module.config.hidden_size != width:
        raise TextEncoderError(f"{where} has hidden_size {module.config.hidden_size} but the U-Net reads "
                               f"{width} features from it (its cross_attention_dim)")
    if module.config.max_position_embeddings < length:
        raise TextEncoderError(f"{where} holds {module.config.max_position_embeddings} positions, fewer than "
                               f"the cache's {length} tokens per caption")
    return module, jax.tree.map(np.asarray, jax.device_get(params))


@dataclasses.dataclass(eq=False)
class TextEncoderFinetune(finetune.Finetune):
    """The Finetune of a run that trains {'unet', 'text_encoder'}: full state shardings from both models'
    logical axes, and exports of both."""

    def create_state(self, model: nn.Module, tx: Any, mesh: Any, rules: parallel.Rules
                     ) -> tuple[TrainState, Any]:
        """As `Finetune.create_state`; for full training both models' params, EMA and Adam moments are laid
        out by their logical axes (the optimizer state inherits the partitioning boxes)."""
        if self.mode != "full":
            return super().create_state(model, tx, mesh, rules)

        def boxed(key: jax.Array) -> Params:
            return {UNET: boxed_init(model.unet.config, key),
                    **{n: boxed_init(getattr(model, n).config, key) for n in encoder_names(model)}}

        abstract_boxed = jax.eval_shape(lambda k: init_train_state(boxed(k), tx), jax.random.key(0))
        abstract = nn.meta.unbox(abstract_boxed)
        shardings = parallel.logical_shardings(nn.get_partition_spec(abstract_boxed), mesh, rules, shapes=abstract)
        state = place_train_state(self.trainable, tx, shardings)
        return state, shardings

    def export(self, workdir: str | Path, trainable: Any, config: ml_collections.ConfigDict,
               model: nn.Module) -> Path | None:
        """full: WORKDIR/export/ as a diffusers pipeline folder with the trained unet/ and text_encoder/ (SDXL:
        and text_encoder_2/); lora: WORKDIR/export/pytorch_lora_weights.safetensors with `unet.` and
        `text_encoder.` (and `text_encoder_2.`) keys."""
        out = Path(workdir) / finetune.EXPORT_DIR
        trainable = jax.device_get(trainable)
        if self.mode == "lora":
            return finetune.export_lora_components(out / finetune.LORA_FILE, trainable,
                                                   alpha=float(config.train.lora.alpha))
        return export_pipeline(out, config.train.init_from, model, trainable)


def export_pipeline(out: str | Path, init_from: str | Path, model: WithTextEncoder | WithTextEncoders,
                    params: Params) -> Path:
    """Writes the pipeline folder `out`: `init_from` copied but for unet/ and the text encoders' folders, which
    are `params`' converted (diffusers' and transformers' layouts). An existing `out` is replaced."""
    from diffax import convert
    out, src = Path(out), Path(init_from)
    trained = (UNET,) + encoder_names(model)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=lambda folder, names: trained if Path(folder) == src else ())
    for name in trained:
        convert.save(out / name, getattr(model, name), params[name])
    return out


def prepare(config: ml_collections.ConfigDict, unet: nn.Module, tuning: finetune.Finetune | None, source: Any
            ) -> tuple[WithTextEncoder | WithTextEncoders, TextEncoderFinetune]:
    """(the model the run trains, its Finetune): `tuning` (finetune.prepare's, holding the U-Net's base and,
    for LoRA, its factors) extended by the text encoder of train.init_from (an SDXL U-Net: both encoders)."""
    check_options(config, source)
    tc = config.train
    length = len(source.null_input_ids)
    if is_sdxl(unet):
        check_sdxl_options(config, source)
        # the U-Net reads the two encoders' hidden states side by side: their widths add up to its own
        module_1, params_1 = load_text_encoder(tc.init_from, None, length)
        module_2, params_2 = load_text_encoder(tc.init_from, unet.config.cross_attention_dim -
                                               module_1.config.hidden_size, length, TEXT_ENCODER_2)
        if not module_2.config.with_projection:
            raise TextEncoderError(f"train.init_from={tc.init_from}: {TEXT_ENCODER_2}/ holds no projection; SDXL's "
                                   f"second text encoder is a CLIPTextModelWithProjection (its pooled embedding)")
        model = WithTextEncoders(unet, module_1, module_2)
        bases = {TEXT_ENCODER: params_1, TEXT_ENCODER_2: params_2}
    else:
        module, params = load_text_encoder(tc.init_from, unet.config.cross_attention_dim, length)
        model = WithTextEncoder(unet, module)
        bases = {TEXT_ENCODER: params}
    record = dict(tuning.base_record)
    te_print = finetune.fingerprint(bases if is_sdxl(unet) else bases[TEXT_ENCODER])
    # One checksum of all bases, so a resumed run or sample.py recognises a changed text encoder too.
    record.update(text_encoder=tc.text_encoder, text_encoder_fingerprint=te_print,
                  fingerprint=hashlib.sha256((record["fingerprint"] + te_print).encode()).hexdigest()[:16])
    if tc.text_encoder == "full":
        trainable = {UNET: tuning.trainable, **bases}
        return model, TextEncoderFinetune("full", None, trainable, None, None, 1, record)
    trainable, specs = {UNET: tuning.trainable}, {UNET: tuning.frozen_specs}
    for i, (name, params) in enumerate(bases.items()):
        key = jax.random.fold_in(jax.random.key(config.seed), 2 + i)
        trainable[name] = finetune.init_lora(params, finetune.lora_targets(params, LORA_TARGETS), tc.lora.rank, key)
        specs[name] = logical_specs(getattr(model, name).config)
    frozen = {UNET: tuning.frozen, **bases}
    return model, TextEncoderFinetune("lora", frozen, trainable, tuning.view, specs, 1, record)


def null_cond(source: Any) -> dict[str, np.ndarray]:
    """The empty prompt's token ids {'input_ids': [L] int32} (an SDXL cache: and 'input_ids_2'): the label
    dropout's null conditioning. SDXL's time ids are left out, so dropout keeps each example's own."""
    out = {"input_ids": source.null_input_ids}
    if getattr(source, "null_input_ids_2", None) is not None:
        out["input_ids_2"] = source.null_input_ids_2
    return out


def model_cond(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword inputs of a latent-cache batch: its token ids [B, L] (an SDXL cache: the second
    tokenizer's 'input_ids_2' [B, L] and the cached 'time_ids' [B, 6] too)."""
    out = {"input_ids": batch["input_ids"]}
    if "input_ids_2" in batch:
        out.update(input_ids_2=batch["input_ids_2"], time_ids=batch["cond"]["time_ids"])
    return out


class Sampler(evaluate.Sampler):
    """`evaluate.Sampler` of a WithTextEncoder run: the U-Net samples on the hidden states of the prompts (and
    of the empty prompt) through the text encoder of the params it is given, not the cache's frozen one."""

    def __init__(self, model: WithTextEncoder, config: ml_collections.ConfigDict, mesh: Any, rules: parallel.Rules,
                 source: Any, param_view: Callable[[Any, jax.Array], Any] | None = None):
        """`param_view(params, t)`: the composite weights of a fine-tuning run's params (LoRA merged); None:
        the params are the weights."""
        # The text encoder's weights of the sampled params (LoRA merged; XLA drops the U-Net's merge).
        self._text_weights = (lambda p: p[TEXT_ENCODER]) if param_view is None else jax.jit(
            lambda p: param_view(p, jnp.zeros((1,), jnp.int32))[TEXT_ENCODER])
        super().__init__(model.unet, config, mesh, rules, source,
                         param_view=lambda p, t: (p if param_view is None else param_view(p, t))[UNET])
        te = model.text_encoder
        self._encode = jax.jit(lambda p, ids: te.apply({"params": p}, ids).last_hidden_state)  # [N, L, D]
        self._null_ids = source.null_input_ids
        self._text_params = self._tokenizer = None

    def embed(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """{'encoder_hidden_states': [N, L, D]} of `prompts` through the text encoder being trained."""
        from diffax.pipelines.loading import load_tokenizer
        from diffax.pipelines.text_encoding import tokenize_prompts
        if self._tokenizer is None:  # the cache's tokenizer, which made the token ids trained on
            self._tokenizer = load_tokenizer(self.manifest["text"]["tokenizer"])
        ids = tokenize_prompts(self._tokenizer, list(prompts), max_length=len(self._null_ids))
        return {"encoder_hidden_states": np.asarray(jax.device_get(self._encode(self._text_params, ids)))}

    def images(self, params: Any, key: jax.Array, **inputs: Any) -> np.ndarray:
        """`evaluate.Sampler.images`, the prompts and the null conditioning encoded with `params`' encoder."""
        self._text_params = self._text_weights(params)
        self.null_cond = {"encoder_hidden_states": np.asarray(self._encode(self._text_params, self._null_ids[None]))[0]}
        return super().images(params, key, **inputs)
