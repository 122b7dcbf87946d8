"""ControlNet training: a ControlNet learns to steer a frozen text-to-image U-Net from conditioning images, as
diffusers' examples/controlnet/train_controlnet.py trains one.

    python -m diffax.data.cache --config=configs/controlnet_sd15.py:cache ...   # latents, text, control images
    python train.py --config=configs/controlnet_sd15.py --workdir=runs/cn ...    # train.finetune='controlnet'

The run's model block is the U-Net of the pipeline folder `train.init_from`. The ControlNet starts as
diffusers' `ControlNetModel.from_unet` makes it (the U-Net's conv_in, embeddings, down and mid blocks copied,
a random conditioning embedding whose last conv is zero, zero 1x1 convolutions on every residual; so the
pair predicts exactly what the U-Net alone does at step 0), or from the ControlNet folder
`train.controlnet_from` to continue training one. The model the train step differentiates is
`ControlNetUNet`, the pair as the ControlNet pipeline runs it: the ControlNet's residuals added to the
U-Net's skips and mid block. Its parameters are {'controlnet': ..., 'unet': ...}; through the fine-tuning
mechanism of diffax.train.finetune the TrainState's params, EMA and Adam moments hold the ControlNet only,
and the U-Net rides along frozen in `TrainState.frozen` (no gradient step, no optimizer state, never saved).
The VAE and text encoder ran once, in the latent cache; the cache's records carry each example's
conditioning image ([H, W, 3] at pixel resolution, [0, 1], the same crop and flip as its image) as
`cond['controlnet_cond']`.

At the end of the run `WORKDIR/export/controlnet` holds the ControlNet as a diffusers ControlNetModel folder
(from the final EMA weights; with train.ema_decay=0, the recipe's default as in the example, the weights
themselves), which `diffusers.ControlNetModel.from_pretrained` and diffax's ControlNet pipelines load.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from diffax import parallel
from diffax.data import sdxl_cache
from diffax.models import boxed_init, logical_specs
from diffax.models.controlnet import ControlNetConfig, ControlNetModel, params_from_unet
from diffax.models.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from diffax.train import evaluate
from diffax.train.finetune import EXPORT_DIR, Finetune, FinetuneError
from diffax.train.state import TrainState, init_train_state, place_train_state

Params = dict[str, Any]
EXPORT_NAME = "controlnet"  # WORKDIR/export/controlnet, diffusers' train_controlnet output folder's content
# ControlNetConfig keys that belong to the conditioning embedding, not to the U-Net encoder it copies.
_OWN_KEYS = ("conditioning_channels", "controlnet_conditioning_channel_order", "conditioning_embedding_out_channels",
             "global_pool_conditions", "addition_embed_type_num_heads")


class ControlNetUNet(nn.Module):
    """A ControlNet and the U-Net it steers, as one denoiser: params {'controlnet', 'unet'}.

    `config` is the U-Net's (what training asks of a denoiser: sample shape, text conditioning), so the train
    loop and step treat the pair as the U-Net; `controlnet` is the ControlNet's config.
    """
    config: UNet2DConditionConfig
    controlnet: ControlNetConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, *, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: float = 1.0,
                 added_cond_kwargs: dict[str, jax.Array] | None = None, class_labels: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """The U-Net's prediction [B, H, W, out_channels] with the ControlNet's residuals added.

        sample [B, H, W, C] latents, timesteps [B], encoder_hidden_states [B, L, D], controlnet_cond
        [B, f H, f W, 3] in [0, 1] (f: the ControlNet's conditioning factor, the VAE's); the rest as
        UNet2DConditionModel takes them.
        """
        extra = dict(added_cond_kwargs=added_cond_kwargs, class_labels=class_labels, train=train)
        down, mid = ControlNetModel(self.controlnet, name="controlnet")(
            sample, timesteps, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
            conditioning_scale=conditioning_scale, **extra)
        dtype = self.config.dtype  # as the pipeline: the residuals in the U-Net's compute dtype
        return UNet2DConditionModel(self.config, name="unet")(
            sample, timesteps, encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=tuple(d.astype(dtype) for d in down),
            mid_block_additional_residual=mid.astype(dtype), **extra)


def is_controlnet(model: nn.Module) -> bool:
    """Whether `model` is a ControlNet training pair (its batches carry conditioning images)."""
    return isinstance(model, ControlNetUNet)


def controlnet_view(unet: Params, controlnet: Params, t: jax.Array) -> Params:
    """The pair's parameters from the frozen U-Net and the trained ControlNet (the same at every timestep)."""
    del t
    return {"controlnet": controlnet, "unet": unet}


def init_controlnet(unet_config: UNet2DConditionConfig, unet_params: Params, key: jax.Array,
                    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)) -> tuple[ControlNetConfig, Params]:
    """(config, params) of a fresh ControlNet for this U-Net, as diffusers' `ControlNetModel.from_unet`: the
    encoder half copied from `unet_params`, the conditioning embedding random (its conv_out zero), the zero
    convolutions zero. `embedding_channels` (conditioning_embedding_out_channels) sets how much larger the
    conditioning image is than the latents: 2^(len - 1), the VAE's factor (8 for Stable Diffusion)."""
    config = ControlNetConfig.from_unet(unet_config, conditioning_embedding_out_channels=tuple(embedding_channels))
    return config, params_from_unet(config, unet_params, key)


def load_controlnet(path: str, unet_config: UNet2DConditionConfig) -> tuple[ControlNetConfig, Params]:
    """(config, params) of the diffusers ControlNetModel folder `path` in the U-Net's dtypes and remat policy;
    FinetuneError naming train.controlnet_from when it is no ControlNet or was not made from a U-Net like this
    one."""
    from diffax import convert
    try:
        module, params = convert.load(path, dtype=unet_config.dtype, param_dtype=unet_config.param_dtype,
                                      attention_backend=unet_config.attention_backend)
    except ValueError as e:
        raise FinetuneError(f"train.controlnet_from={path}: {e}") from None
    if not isinstance(module, ControlNetModel):
        raise FinetuneError(f"train.controlnet_from={path}: holds a {type(module).__name__}, not a ControlNetModel")
    config = dataclasses.replace(module.config, remat=unet_config.remat)  # the pair rematerialises alike
    shared = {f.name for f in dataclasses.fields(UNet2DConditionConfig)} - set(_OWN_KEYS) - set(config.runtime_fields)
    differ = [f"{f.name}={getattr(config, f.name)!r} vs {getattr(unet_config, f.name)!r}"
              for f in dataclasses.fields(config) if f.name in shared
              and getattr(config, f.name) != getattr(unet_config, f.name)]
    if differ:
        raise FinetuneError(f"train.controlnet_from={path}: the ControlNet was not made from a U-Net like the model "
                            f"block's (ControlNet vs U-Net: {', '.join(differ[:3])})")
    return config, jax.device_get(params)


@dataclasses.dataclass(eq=False)
class ControlNetTuning(Finetune):
    """A ControlNet run: the frozen base is the U-Net's params, the trainable tree the ControlNet's."""
    controlnet_config: ControlNetConfig | None = None

    def training_model(self, unet: nn.Module, source: Any) -> ControlNetUNet:
        """The pair the train step runs, after checking that `source` (the run's data) carries conditioning
        images of the size this ControlNet takes."""
        cond = source[0].get("cond", {})
        if "controlnet_cond" not in cond:
            raise FinetuneError("train.finetune='controlnet' trains on conditioning images: write the latent cache "
                                "from a folder with data.conditioning_column set (docs/data.md)")
        latent, image = source[0]["image"].shape, cond["controlnet_cond"].shape  # [h, w, c], [H, W, 3]
        factor = self.controlnet_config.conditioning_factor
        if image[:2] != (latent[0] * factor, latent[1] * factor):
            widths = self.controlnet_config.conditioning_embedding_out_channels
            raise FinetuneError(f"train.controlnet_embedding_channels: {len(widths)} widths take conditioning "
                                f"images {factor}x the latents, but the cache's are {list(image[:2])} for latents "
                                f"{list(latent[:2])}: give one width per factor 2 and one more")
        return ControlNetUNet(unet.config, self.controlnet_config)

    def create_state(self, model: nn.Module, tx: Any, mesh: Any, rules: parallel.Rules) -> tuple[TrainState, Any]:
        """The step-0 TrainState and its shardings: the ControlNet's params, EMA and Adam moments laid out by
        its logical axes (as a fresh run's), the frozen U-Net by its own."""
        boxed = jax.eval_shape(lambda k: init_train_state(boxed_init(self.controlnet_config, k), tx),
                               jax.random.key(0))
        shardings = parallel.logical_shardings(nn.get_partition_spec(boxed), mesh, rules, shapes=nn.meta.unbox(boxed))
        frozen = parallel.logical_shardings(self.frozen_specs, mesh, rules, shapes=self.frozen)
        state = place_train_state(self.trainable, tx, shardings)
        return state.replace(frozen=jax.device_put(self.frozen, frozen)), shardings.replace(frozen=frozen)

    def export(self, workdir: str | Path, trainable: Any, config: ml_collections.ConfigDict,
               model: nn.Module) -> Path:
        """Writes the ControlNet to WORKDIR/export/controlnet (a diffusers ControlNetModel folder)."""
        return export_controlnet(Path(workdir) / EXPORT_DIR / EXPORT_NAME, self.controlnet_config, trainable)


def export_controlnet(folder: str | Path, config: ControlNetConfig, params: Params) -> Path:
    """Writes a ControlNet as a diffusers ControlNetModel folder (config.json, safetensors); returns the folder."""
    from diffax import convert
    convert.save(folder, ControlNetModel(config), jax.device_get(params))
    return Path(folder)


def prepare(config: ml_collections.ConfigDict, unet: nn.Module, base: Params, record: dict[str, Any]
            ) -> ControlNetTuning:
    """The ControlNet run's setup from the U-Net (`unet`, its loaded weights `base`): a fresh ControlNet made from
    it, or train.controlnet_from."""
    tc = config.train
    if not isinstance(unet.config, UNet2DConditionConfig):
        raise FinetuneError(f"train.finetune='controlnet' steers a UNet2DConditionModel; model.name is "
                            f"{config.model.name!r}")
    if tc.eval_every:
        raise FinetuneError("config key 'train.eval_every' must be 0 for a ControlNet run (the digits metrics ask "
                            "for a digit, not for a conditioning image); train.sample_every draws its grids")
    if tc.controlnet_from:
        cn_config, params = load_controlnet(tc.controlnet_from, unet.config)
        record["controlnet_from"] = str(Path(tc.controlnet_from).absolute())
    else:
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        cn_config, params = init_controlnet(unet.config, base, key, tuple(tc.controlnet_embedding_channels))
        params = jax.device_get(params)
    specs = logical_specs(unet.config)
    return ControlNetTuning("controlnet", base, params, controlnet_view, specs, 1, record,
                            controlnet_config=cn_config)


GRID_ROWS = 4  # validation conditioning images in a grid, as diffusers' example's default number of them


def load_conditioning_images(paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """float32 [N, H, W, 3] in [0, 1]: the image files `paths` as RGB, resized to `size` (H, W) as diffusers'
    example resizes its validation images; ValueError naming sample.conditioning_images for a bad file."""
    from PIL import Image
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        except (OSError, ValueError) as e:
            raise ValueError(f"config key 'sample.conditioning_images': {path}: not a readable image ({e})") from None
        images.append(np.asarray(image, np.float32) / 255.0)
    return np.stack(images)


class Sampler(evaluate.Sampler):
    """`evaluate.Sampler` of a ControlNet run (`ControlNetUNet`): the grid's rows are validation conditioning
    images, each beside the samples of its caption it steers, as diffusers' train_controlnet.py logs its
    validation images. The rows are `sample.conditioning_images` with `sample.prompts` (one prompt each,
    through the cache's text encoder), or else the first GRID_ROWS examples of the run's data (their
    conditioning images and their captions' stored embeddings: no text encoder runs). Guidance pairs each
    caption with the cache's empty prompt; both halves see the same conditioning image, as the ControlNet
    pipeline runs.
    """

    def __init__(self, model: ControlNetUNet, config: ml_collections.ConfigDict, mesh: Any, rules: parallel.Rules,
                 source: Any, param_view: Any = None):
        """As `evaluate.Sampler`; `param_view(params, t)` makes the pair's {'controlnet', 'unet'} weights.
        The user's conditioning images are read here, before training (ValueError naming the key)."""
        super().__init__(model, config, mesh, rules, source, param_view=param_view)
        examples = [source[i]["cond"] for i in range(min(GRID_ROWS, len(source)))]
        self.examples = jax.tree.map(lambda *a: np.stack(a), *examples)  # {'controlnet_cond': [R, H, W, 3], ..}
        self.user_images = None
        paths, prompts = list(config.sample.conditioning_images), list(config.sample.prompts)
        if paths:
            if len(paths) != len(prompts):
                raise ValueError(f"config key 'sample.conditioning_images' holds {len(paths)} images but "
                                 f"sample.prompts {len(prompts)} prompts: give one prompt per image")
            size = self.examples["controlnet_cond"].shape[1:3]  # the size the ControlNet trains on
            self.user_images = load_conditioning_images(paths, size)  # [N, H, W, 3]

    @property
    def validation(self) -> dict[str, np.ndarray]:
        """The grid rows' conditioning, one row per validation image: {'controlnet_cond': [R, H, W, 3],
        'encoder_hidden_states': [R, L, D], ...}."""
        if self.user_images is None:
            return self.examples
        prompts = list(self.config.sample.prompts)
        cond = {**self.embed(prompts), "controlnet_cond": self.user_images}
        if "time_ids" in self.examples:  # SDXL: the first cached example's size and crop ids
            cond["time_ids"] = np.repeat(self.examples["time_ids"][:1], len(prompts), axis=0)
        return cond

    def images(self, params: Any, key: jax.Array, *, cond: dict[str, np.ndarray],
               show_conditioning: bool = False) -> np.ndarray:
        """uint8 samples [N, H, W, C] from `cond`, examples' conditioning as the cache gives it
        ({'encoder_hidden_states': [N, L, D], 'controlnet_cond': [N, fh, fw, 3] in [0, 1], ...}).
        `show_conditioning`: rows of equal conditioning (runs of GRID_COLUMNS - 1) each get their
        conditioning image first, resized to the samples' size: [N / (GRID_COLUMNS - 1) * GRID_COLUMNS, ...]."""
        if self.null_cond is None:
            raise ValueError("a ControlNet run's grids are guided by the latent cache's empty prompt: train from a "
                             "latent cache written with a text encoder (data.source='latent_cache')")
        text = {k: v for k, v in cond.items() if k != "controlnet_cond"}
        # The empty prompt's embeddings; what it has none of (SDXL's time ids) stays each row's own.
        null = {**text, **{k: np.broadcast_to(v, text[k].shape) for k, v in self.null_cond.items() if k in text}}
        control = np.asarray(cond["controlnet_cond"], np.float32)  # [N, fh, fw, 3], both halves of guidance
        model_cond = {**sdxl_cache.unet_cond(text, self.model.config), "controlnet_cond": control}
        uncond = {**sdxl_cache.unet_cond(null, self.model.config), "controlnet_cond": control}
        images = self.decode(self.text_latents(params, key, model_cond, uncond))  # [N, H, W, C]
        if not show_conditioning:
            return images
        n, h, w, c = images.shape
        per_row = evaluate.GRID_COLUMNS - 1
        shown = jax.image.resize(control[::per_row], (n // per_row, h, w, control.shape[-1]), "linear")
        shown = np.asarray(np.clip(np.round(np.asarray(shown) * 255), 0, 255), np.uint8)[..., :c]
        rows = np.concatenate([shown[:, None], images.reshape(n // per_row, per_row, h, w, c)], axis=1)
        return rows.reshape(-1, h, w, c)

    def grid_inputs(self) -> dict[str, Any]:
        """The grid's fixed inputs: each validation example's conditioning GRID_COLUMNS - 1 times, shown."""
        cond = jax.tree.map(lambda a: np.repeat(a, evaluate.GRID_COLUMNS - 1, axis=0), self.validation)
        return {"cond": cond, "show_conditioning": True}


def sampling_error(workdir: str | Path) -> FinetuneError:
    """What sampling a ControlNet run's workdir directly says: its result is the exported ControlNet."""
    return FinetuneError(f"{workdir}: a ControlNet run is sampled through its export: load "
                         f"{Path(workdir) / EXPORT_DIR / EXPORT_NAME} with the pipeline folder into diffax's "
                         f"StableDiffusionControlNetPipeline (docs/training.md)")
