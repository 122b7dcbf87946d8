"""Training a KL autoencoder (diffusers' AutoencoderKL) from nothing: the first stage of latent diffusion.

    python train.py --config=configs/ldm_digits_vae.py --workdir=runs/ldm_digits/vae

The objective is Rombach et al.'s (2022) without the perceptual and adversarial terms, which a few thousand
16x16 digits do not need: the reconstruction error of a posterior sample, plus a small KL term towards the
standard normal that keeps the latent space smooth and bounded,

    loss = mean |x - decode(z)|  +  kl_weight * KL(q(z|x) || N(0, I)) / (pixels per image),   z ~ q(z|x)

(MSE instead of L1 with `autoencoder.reconstruction='mse'`). Dividing the per-image KL by the pixel count
gives `kl_weight` the meaning it has in the LDM code, where both terms are sums over an image.

The training loop (`diffax.train.loop`) runs this objective (`make_loss_fn`) through the same step,
checkpoints, resume, metrics and non-finite guard as a denoiser.
At the end of the run `export` writes the EMA weights as a diffusers AutoencoderKL folder whose
`scaling_factor` is 1 / std of the data's latents (as Stable Diffusion chose 0.18215), so the second stage's
latents have unit variance.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax import convert
from diffax.models.registry import make_module
from diffax.models.vae import AutoencoderKLConfig

RECONSTRUCTION_LOSSES = ("l1", "mse")
EXPORT_DIR = "export"


def is_autoencoder(model: nn.Module) -> bool:
    """Whether `model` is an AutoencoderKL, which trains with `AutoencoderObjective` instead of a diffusion
    objective."""
    return isinstance(model.config, AutoencoderKLConfig)


@dataclasses.dataclass(frozen=True)
class AutoencoderObjective:
    """Reconstruction of a posterior sample plus a weighted KL term (see the module docstring)."""
    reconstruction: str = "l1"   # l1 | mse
    kl_weight: float = 1e-6

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"autoencoder.reconstruction must be one of {RECONSTRUCTION_LOSSES}, got "
                             f"{self.reconstruction!r}")
        if not self.kl_weight >= 0:
            raise ValueError(f"autoencoder.kl_weight must be >= 0, got {self.kl_weight!r}")

    def loss(self, model: nn.Module, params: Any, batch: dict[str, Any], key: jax.Array,
             train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean loss over the batch and its terms. batch: {'image': [B, H, W, C] in [-1, 1]} (other keys,
        such as 'cond', are ignored)."""
        del train  # the autoencoder has no dropout
        x = batch["image"]
        posterior = model.apply({"params": params}, x, method="encode")
        z = posterior.sample(key)                                     # [B, h, w, latent_channels]
        x_rec = model.apply({"params": params}, z, method="decode")   # [B, H, W, C]
        err = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
        rec = jnp.abs(err).mean() if self.reconstruction == "l1" else jnp.square(err).mean()
        pixels = np.prod(x.shape[1:])
        kl = (posterior.kl().astype(jnp.float32) / pixels).mean()
        loss = rec + self.kl_weight * kl
        return loss, {"loss": loss, "reconstruction": rec, "kl": kl}


def make_objective(config: ml_collections.ConfigDict) -> AutoencoderObjective:
    """The objective from the run config's `autoencoder` block; ValueError naming the key when the config asks
    an autoencoder run for what only a denoiser can do (sample grids, sample evaluations)."""
    for key in ("sample_every", "eval_every"):
        if config.train.get(key, 0):
            raise ValueError(f"config key 'train.{key}' is {config.train[key]}: an AutoencoderKL run draws no "
                             f"samples (grids and evaluations sample a denoiser); set it to 0")
    block = config.autoencoder
    return AutoencoderObjective(reconstruction=block.reconstruction, kl_weight=float(block.kl_weight))


def make_loss_fn(model: nn.Module, config: ml_collections.ConfigDict
                 ) -> Callable[[Any, dict[str, Any], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """loss_fn(params, batch, key) of `make_objective(config)` for the train step (`diffax.train.step`)."""
    objective = make_objective(config)
    return lambda params, batch, key: objective.loss(model, params, batch, key)


def check_data(model: nn.Module, image_shape: tuple[int, ...]) -> None:
    """ValueError naming the config keys when the data's images [H, W, C] do not fit the autoencoder."""
    cfg = model.config
    h, w, c = image_shape
    if c != cfg.in_channels or c != cfg.out_channels:
        raise ValueError(f"data images have {c} channels but the autoencoder takes {cfg.in_channels} and makes "
                         f"{cfg.out_channels} (data.channels vs model.in_channels / model.out_channels)")
    if h % cfg.downsample_factor or w % cfg.downsample_factor:
        raise ValueError(f"data images are {h}x{w}, not divisible by the autoencoder's downsampling "
                         f"{cfg.downsample_factor} (data.image_size vs model.block_out_channels)")


def source_images(source: Any) -> np.ndarray:
    """Every image of a data source as float32 [N, H, W, C] in [-1, 1], as the train iterator scales them."""
    return np.stack([np.asarray(source[i]["image"]) for i in range(len(source))]).astype(np.float32) / 127.5 - 1.0


def latent_statistics(model: nn.Module, params: Any, images: np.ndarray, key: jax.Array,
                      batch_size: int = 256) -> dict[str, float]:
    """{'latent_std', 'latent_mean', 'reconstruction_l1'}: the std and mean of raw posterior samples of
    `images` [N, H, W, C] (one draw each), and the mean absolute error of decoding the posterior means."""

    @jax.jit
    def stats(x: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        posterior = model.apply({"params": params}, x, method="encode")
        z = posterior.sample(k)
        x_rec = model.apply({"params": params}, posterior.mode(), method="decode")
        return z.sum(), jnp.square(z).sum(), jnp.abs(x_rec - x).sum()

    total = total_sq = err = 0.0
    for i, start in enumerate(range(0, len(images), batch_size)):
        s, sq, e = jax.device_get(stats(jnp.asarray(images[start:start + batch_size]), jax.random.fold_in(key, i)))
        total, total_sq, err = total + float(s), total_sq + float(sq), err + float(e)
    cfg = model.config
    per_latent = images.shape[1] // cfg.downsample_factor * images.shape[2] // cfg.downsample_factor
    n = len(images) * per_latent * cfg.latent_channels
    mean = total / n
    return {"latent_mean": mean, "latent_std": float(np.sqrt(max(total_sq / n - mean ** 2, 0.0))),
            "reconstruction_l1": err / images.size}


def export(model: nn.Module, params: Any, source: Any, folder: str | Path, seed: int = 0) -> dict[str, float]:
    """Writes `params` as a diffusers AutoencoderKL folder with `scaling_factor` = 1 / std of the source's
    latents; returns the latent statistics (`latent_statistics`) and the scaling factor."""
    stats = latent_statistics(model, params, source_images(source), jax.random.key(seed))
    if not stats["latent_std"] > 0:
        raise ValueError(f"{folder}: the autoencoder's latents have std {stats['latent_std']}; it did not train")
    config = dataclasses.replace(model.config, scaling_factor=float(1.0 / stats["latent_std"]))
    convert.save(folder, make_module(config), params)
    return {**stats, "scaling_factor": config.scaling_factor}
