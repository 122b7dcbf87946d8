"""Samples and measurements while training: the fixed grid every `train.sample_every` steps and the `eval`
block's metric every `train.eval_every` steps, logged beside the loss (TensorBoard and metrics.jsonl).

    sampler = Sampler(model, config, mesh, rules, source)
    write_grid(sampler, state.ema_params, workdir / "samples" / "step_000500.png", key)
    scalars = evaluate(sampler, state.ema_params, config, key)     # {'digits_accuracy': 0.93}

A pixel-space model samples through `GenerationPipeline`. A model trained from a latent cache samples
latents that the cache's own VAE decodes (diffax/data/latent_cache.py's manifest names it); a
text-conditioned one is prompted with `sample.prompts` (default: some of the cache's captions), encoded once
by the cache's text encoder, and guided against the cache's empty-prompt embedding, the null conditioning
it was trained with. None of this is in the train step: the encoders run here, on the host's schedule.
An SDXL U-Net (addition_embed_type 'text_time') also gets the pooled embeddings and the time ids of the
cache's image size (diffax/data/sdxl_cache.py's `PromptEmbeddings`: the cache's captions keep their stored
embeddings, other prompts go through its two text encoders).

Evaluation kinds (`eval.kind`), over `eval.num_samples` images, labels cycling through 0..9:
  digits_accuracy  the real-digits classifier's agreement with the asked digit
                   (diffax.evaluation.digits_classifier); chance is 10%
  digits_fid       FID against all real digits in the digits feature network's space
                   (diffax.evaluation.fid); lower is better
A class-conditional model is asked for the label; a text model for `data.caption_template` of the cache
(default "a handwritten {}") filled with the digit's word.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax import parallel, xla_options
from diffax.data import sdxl_cache
from diffax.data.digits import NUM_CLASSES, NUMBER_WORDS
from diffax.data.encoders import load_text_encoder, load_vae
from diffax.image_io import save_grid
from diffax.pipelines.generation import GenerationPipeline, to_uint8
from diffax.sampling import sample
from diffax.schedulers.names import scheduler_for

EVAL_KINDS = ("digits_accuracy", "digits_fid")
DEFAULT_CAPTION = "a handwritten {}"
GRID_COLUMNS = 10


@functools.lru_cache(maxsize=16)
def takes_text(config: Any) -> bool:
    """Whether a denoiser config's model is called with `encoder_hidden_states` (a text-conditioned U-Net)."""
    return "encoder_hidden_states" in config.init_inputs()[1]


class Sampler:
    """uint8 images of the model being trained, from labels, prompts or nothing; see the module docstring."""

    def __init__(self, model: nn.Module, config: ml_collections.ConfigDict, mesh: Any,
                 rules: parallel.Rules, source: Any, param_view: Callable[[Any, jax.Array], Any] | None = None):
        """`source` is the run's data source (a latent cache's manifest and empty prompt are read from it);
        `param_view(params, t)` gives the weights of the model call at timesteps t (a fine-tuned run's view,
        `GenerationPipeline.param_view`), None: the params themselves."""
        self.model, self.config, self.mesh, self.rules = model, config, mesh, rules
        self.param_view = param_view
        self.scheduler = scheduler_for(config.sample.sampler, config.diffusion)
        self.manifest = getattr(source, "manifest", None)  # a latent cache's
        self.text = takes_text(model.config)
        self.null_cond = getattr(source, "null_cond", None)
        self._vae = self._text_encoder = None
        self._embeddings: dict[str, dict[str, np.ndarray]] = {}
        self.sdxl = None  # an SDXL U-Net's prompt embeddings (both encoders)
        if self.text and getattr(model.config, "addition_embed_type", None) == "text_time" and self.manifest:
            self.sdxl = sdxl_cache.PromptEmbeddings(source, mesh, rules)
            tc = config.train
            if (config.sample.prompts and tc.sample_every) or (config.eval.kind and tc.eval_every):
                self.sdxl.encoder_config()  # their encoders reachable, checked before training
        if not self.text:
            view = {} if param_view is None else {"param_view": param_view}  # only fine-tuned runs have one
            self.pipe = GenerationPipeline(model, self.scheduler, mesh, rules, output_uint8=self.manifest is None,
                                           **view)

    # -- the cache's encoders, loaded on first use

    def _decoder(self) -> tuple[nn.Module, Any]:
        if self._vae is None:
            vae = self.manifest["vae"]
            module, params = load_vae(vae["path"], vae["subfolder"])
            self._vae = (module, jax.device_put(params, parallel.replicated(self.mesh)))
        return self._vae

    def embed(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """{'encoder_hidden_states': [N, L, D] (, 'text_embeds': [N, P])} of `prompts` through the cache's
        text encoder (an SDXL cache's: `sdxl_cache.PromptEmbeddings`), each prompt encoded once per run."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing and self.sdxl is not None:
            self._embeddings.update(self.sdxl(missing))
            missing = []
        if missing:
            from diffax.pipelines.text_encoding import tokenize_prompts
            text = self.manifest["text"]
            if self._text_encoder is None:
                module, params, tokenizer = load_text_encoder(text["encoder"], text["subfolder"], text["tokenizer"])
                encode = jax.jit(lambda p, ids: module.apply({"params": p}, ids))
                self._text_encoder = (encode, params, tokenizer)
            encode, params, tokenizer = self._text_encoder
            out = encode(params, tokenize_prompts(tokenizer, missing, max_length=text["max_length"]))
            arrays = {"encoder_hidden_states": out.last_hidden_state}
            if out.text_embeds is not None:
                arrays["text_embeds"] = out.text_embeds
            arrays = {k: np.asarray(v, np.float32) for k, v in jax.device_get(arrays).items()}
            for i, prompt in enumerate(missing):
                self._embeddings[prompt] = {k: v[i] for k, v in arrays.items() if k in text["shapes"]}
        return {k: np.stack([self._embeddings[p][k] for p in prompts]) for k in self._embeddings[prompts[0]]}

    # -- sampling

    @functools.lru_cache(maxsize=4)
    def _text_program(self, steps: int, guided: bool):
        """Latents [N, h, w, c] from text conditioning; one program per (steps, guided)."""
        model, shape = self.model, self.model.config.sample_shape

        def generate(params, cond, uncond, key_data, guidance_scale):
            noise_key, sampler_key = jax.random.split(jax.random.wrap_key_data(key_data))
            n = jax.tree.leaves(cond)[0].shape[0]
            noise = jax.random.normal(noise_key, (n, *shape))

            def denoise(x, t, **model_cond):
                t = jnp.full((x.shape[0],), t)
                weights = params if self.param_view is None else self.param_view(params, t)
                return model.apply({"params": weights}, x, t, **model_cond)

            return sample(self.scheduler, denoise, noise, num_inference_steps=steps, key=sampler_key, cond=cond,
                          uncond=uncond if guided else None, guidance_scale=guidance_scale if guided else None)

        return parallel.jit_with_rules(generate, self.mesh, self.rules)

    @functools.cached_property
    def _decode(self):
        module, _ = self._decoder()

        def decode(params, latents):  # diffusion-scale latents [N, h, w, c] -> uint8 images [N, H, W, C]
            images = module.apply({"params": params}, module.config.unscale_latents(latents), method=module.decode)
            return to_uint8(images)

        return xla_options.jit(decode)

    def images(self, params: Any, key: jax.Array, *, labels: Sequence[int] | None = None,
               prompts: Sequence[str] | None = None, num_samples: int | None = None) -> np.ndarray:
        """uint8 images [N, H, W, C]: one per label (class-conditional), per prompt (text), or `num_samples`
        (unconditional), with the config's sampler, steps and guidance scale."""
        s = self.config.sample
        guided = s.guidance_scale not in (None, 1.0)
        if self.text:
            if prompts is None:
                raise ValueError("a text-conditioned model samples from prompts")
            if self.manifest is None or not self.manifest.get("text"):
                raise ValueError("sampling a text-conditioned model needs the latent cache's text encoder "
                                 "(data.source='latent_cache' with cache.text_encoder set when it was written)")
            # The U-Net's inputs as the train step gets them (loop.model_batch); the empty prompt's guide.
            embeds = self.embed(list(prompts))  # {'encoder_hidden_states': [N, L, D] (, 'text_embeds': [N, P])}
            null = {k: np.broadcast_to(v, embeds[k].shape) for k, v in self.null_cond.items() if k in embeds}
            if self.sdxl is not None:  # both halves at the same size, as SDXL's pipeline does
                embeds["time_ids"] = null["time_ids"] = sdxl_cache.sample_time_ids(self.manifest, len(prompts))
            latents = self.text_latents(params, key, sdxl_cache.unet_cond(embeds, self.model.config),
                                        sdxl_cache.unet_cond(null, self.model.config))
        else:
            guided = guided and self.model.config.has_null_cond
            latents = self.pipe(params, key, labels=labels, num_samples=num_samples, num_inference_steps=s.steps,
                                guidance_scale=s.guidance_scale if guided else None)
            if self.manifest is None:
                return latents  # pixels already
        return self.decode(latents)

    def text_latents(self, params: Any, key: jax.Array, cond: dict[str, np.ndarray],
                     uncond: dict[str, np.ndarray]) -> jax.Array:
        """Latents [N, h, w, c] from the U-Net's text conditioning `cond` and the empty prompt's `uncond`
        (keyword -> [N, ...], as the train step gets them), with the config's steps and guidance scale."""
        s = self.config.sample
        guided = s.guidance_scale not in (None, 1.0)
        args = parallel.global_array((cond, uncond, jax.random.key_data(key), np.float32(s.guidance_scale)),
                                     parallel.replicated(self.mesh))
        return self._text_program(s.steps, guided)(params, *args)

    def decode(self, latents: jax.Array) -> np.ndarray:
        """uint8 images [N, H, W, C] of diffusion-scale latents [N, h, w, c], through the cache's VAE."""
        _, vae_params = self._decoder()
        return np.asarray(jax.device_get(self._decode(vae_params, latents)))

    def grid_inputs(self) -> dict[str, Any]:
        """The grid's fixed inputs: 10 samples per prompt (`sample.prompts`, default up to 10 of the cache's
        captions), per class (up to 10 classes), or 100 unconditional samples."""
        if self.text:
            prompts = list(self.config.sample.prompts) or list(self.manifest.get("captions") or [""])
            return {"prompts": [p for p in prompts for _ in range(GRID_COLUMNS)]}
        n = min(self.model.config.num_classes, 10)
        if n:
            return {"labels": np.repeat(np.arange(n), GRID_COLUMNS)}
        return {"num_samples": 10 * GRID_COLUMNS}


def write_grid(sampler: Sampler, params: Any, path: Path, key: jax.Array) -> None:
    """The fixed grid as a PNG at `path` (one row per prompt or class), written by process 0."""
    images = sampler.images(params, key, **sampler.grid_inputs())
    if jax.process_index() == 0:  # every process ran the sharded program; one writes the file
        save_grid(path, images, ncols=GRID_COLUMNS, upscale=max(1, 64 // images.shape[1]))


def check_eval(config: ml_collections.ConfigDict, sampler: Sampler) -> None:
    """ValueError naming the key when `config.eval` cannot run for this model, before any training."""
    kind = config.eval.kind
    if not kind:
        if config.train.eval_every:
            raise ValueError(f"config key 'train.eval_every' is {config.train.eval_every} but eval.kind is empty; "
                             f"set eval.kind to one of {EVAL_KINDS}")
        return
    if kind not in EVAL_KINDS:
        raise ValueError(f"config key 'eval.kind' must be one of {EVAL_KINDS} or '', got {kind!r}")
    if kind == "digits_accuracy" and not sampler.text and not sampler.model.config.num_classes:
        raise ValueError("config key 'eval.kind' is 'digits_accuracy', but the model takes no labels or prompts "
                         "(an unconditional model: use 'digits_fid')")


def eval_prompts(sampler: Sampler, labels: np.ndarray) -> list[str]:
    """The prompt asking a text model for each digit: the cache's caption template with the digit's word."""
    template = ((sampler.manifest or {}).get("data") or {}).get("caption_template") or DEFAULT_CAPTION
    return [template.format(NUMBER_WORDS[label]) for label in labels]


def evaluate(sampler: Sampler, params: Any, config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, float]:
    """{eval.kind: value} for `params`, over `eval.num_samples` samples whose labels cycle through 0..9."""
    kind, n = config.eval.kind, config.eval.num_samples
    labels = np.arange(n) % NUM_CLASSES
    if sampler.text:
        images = sampler.images(params, key, prompts=eval_prompts(sampler, labels))
    elif sampler.model.config.num_classes:
        images = sampler.images(params, key, labels=labels)
    else:
        images = sampler.images(params, key, num_samples=n)
    if kind == "digits_accuracy":
        from diffax.evaluation.digits_classifier import class_accuracy
        return {kind: class_accuracy(images, labels)}
    from diffax.evaluation.fid import digits_fid
    return {kind: digits_fid(images)}
