"""The text-to-image latent diffusion recipe's own steps: a frozen text encoder, the pipeline export, and the
class accuracy of prompt-conditioned samples in diffax and in diffusers.

    python -m diffax.train.latent_diffusion --config=configs/ldm_digits.py --action=text_encoder
    python -m diffax.train.latent_diffusion --config=configs/ldm_digits.py --action=export \
        --workdir=runs/ldm_digits/unet --out=runs/ldm_digits/export
    python -m diffax.train.latent_diffusion --config=configs/ldm_digits.py --action=evaluate \
        --out=runs/ldm_digits/export --grid=docs/images/ldm_digits_samples.png

`make demo-ldm` runs them between `train.py` (the VAE, then the U-Net) and `python -m diffax.data.cache`.

Text encoder: a small CLIPTextModel with random weights, kept frozen, over a CLIPTokenizer whose vocabulary is
the captions' words (`diffax.data.tokenizer`). A frozen random transformer is an injective-enough map: each
caption's hidden states differ (`write_text_encoder` checks it), and the U-Net's cross-attention learns to
read them. Export: the U-Net's EMA weights, the VAE, text encoder, tokenizer and a DDIM scheduler on the
training schedule, as the folder diffusers' `StableDiffusionPipeline.from_pretrained` and
`diffax.pipelines.load` both read. Evaluation: both frameworks sample the same prompts from the same initial
latents, and the digits classifier (`diffax.evaluation.digits_classifier`) scores each.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from diffax import convert
from diffax.data.digits import NUMBER_WORDS
from diffax.data.tokenizer import caption_words, word_tokenizer
from diffax.models import build_model
from diffax.models.clip import CLIPTextConfig, CLIPTextModel
from diffax.models.registry import init_params
from diffax.schedulers import to_diffusers_config
from diffax.schedulers.names import scheduler_for

# diffusers' StableDiffusionPipeline rewrites a scheduler config with clip_sample=True or steps_offset != 1 (with
# a deprecation warning) before sampling; the export holds what it runs, so both frameworks read one schedule.
# (Latents are not bounded to [-1, 1], so clipping x0 would be wrong for them anyway.)
SD_SCHEDULER_FIXES = {"clip_sample": False, "steps_offset": 1}
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def digit_captions(template: str) -> list[str]:
    """The ten captions of the digits, `template` filled with each number word ("a handwritten seven")."""
    return [template.format(word) for word in NUMBER_WORDS]


def write_text_encoder(folder: str | Path, captions: Sequence[str], *, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 4, max_length: int = 8, seed: int = 0) -> dict[str, float]:
    """Writes `folder/tokenizer` (a CLIPTokenizer over the captions' words, padding to `max_length` tokens)
    and `folder/text_encoder` (a random CLIPTextModel of that width and depth, as a transformers folder).

    Returns {'min_distance', 'mean_norm'}: the smallest distance between two captions' hidden states
    (flattened [L * D]) and their mean norm. ValueError when two captions (the empty one included) encode to
    the same states, which would make them indistinguishable to the U-Net.
    """
    folder = Path(folder)
    tokenizer = word_tokenizer(folder / TOKENIZER_DIR, caption_words(captions), max_length=max_length)
    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=4 * hidden_size, projection_dim=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_length,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])
    module = CLIPTextModel(config)
    params = init_params(config, jax.random.key(seed))
    prompts = [*captions, ""]
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    states = np.asarray(module.apply({"params": params}, ids).last_hidden_state).reshape(len(prompts), -1)
    distances = np.linalg.norm(states[:, None] - states[None], axis=-1)[np.triu_indices(len(prompts), 1)]
    if distances.min() < 1e-3:
        raise ValueError(f"{folder / TEXT_ENCODER_DIR}: two captions encode to the same hidden states "
                         f"(distance {distances.min():.2g}); change the seed or widen the encoder")
    convert.save(folder / TEXT_ENCODER_DIR, module, params)
    return {"min_distance": float(distances.min()), "mean_norm": float(np.linalg.norm(states, axis=-1).mean())}


def scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The export's scheduler: `config.sample.sampler` on the training schedule, as a diffusers config, with
    `SD_SCHEDULER_FIXES` applied where the sampler has those fields."""
    scheduler = scheduler_for(config.sample.sampler, config.diffusion)
    fields = {f.name for f in dataclasses.fields(scheduler)}
    fixes = {k: v for k, v in SD_SCHEDULER_FIXES.items() if k in fields}
    return to_diffusers_config(dataclasses.replace(scheduler, **fixes))


def export_pipeline(out: str | Path, unet: tuple[Any, Any], *, vae: str | Path, text_encoder: str | Path,
                    tokenizer: str | Path, scheduler: dict[str, Any]) -> Path:
    """Writes a diffusers StableDiffusionPipeline folder at `out`: `unet` (module, params) converted, the
    diffusers / transformers folders `vae`, `text_encoder` and `tokenizer` copied, the scheduler config, and
    model_index.json without a safety checker. An existing `out` is replaced."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    module, params = unet
    convert.save(out / "unet", module, params)
    for name, src in (("vae", vae), (TEXT_ENCODER_DIR, text_encoder), (TOKENIZER_DIR, tokenizer)):
        if not Path(src).is_dir():
            raise ValueError(f"{src}: missing (the {name} to export); run the recipe's earlier steps first")
        shutil.copytree(src, out / name)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return out


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] floats in [0, 1] -> uint8, rounding to nearest."""
    return np.clip(np.round(np.asarray(images, np.float64) * 255.0), 0, 255).astype(np.uint8)


def prompt_noise(folder: str | Path, num_prompts: int, per_prompt: int, seed: int) -> np.ndarray:
    """Standard-normal initial latents NHWC [num_prompts * per_prompt, h, w, C] for the pipeline in `folder`
    at its default size, the same for both frameworks."""
    unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
    size = unet["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_prompts * per_prompt, h, w, unet["in_channels"])).astype(np.float32)


def diffax_images(folder: str | Path, prompts: list[str], noise: np.ndarray, *, steps: int,
                  guidance_scale: float) -> np.ndarray:
    """`diffax.pipelines.load(folder)`'s images float32 [N, H, W, C] in [0, 1], `noise` rows in prompt order
    (each prompt len(noise) / len(prompts) times)."""
    from diffax import pipelines

    pipe = pipelines.load(folder, cache_dir=False, compilation_cache=False)
    per_prompt = len(noise) // len(prompts)
    return np.asarray(pipe(prompts, num_images_per_prompt=per_prompt, latents=noise, num_inference_steps=steps,
                           guidance_scale=guidance_scale, output_type="np").images)


def diffusers_images(folder: str | Path, prompts: list[str], noise: np.ndarray, *, steps: int,
                     guidance_scale: float) -> np.ndarray:
    """diffusers' (PyTorch) StableDiffusionPipeline images of the same call as `diffax_images`."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    per_prompt = len(noise) // len(prompts)
    latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return np.asarray(pipe(prompts, num_images_per_prompt=per_prompt, latents=latents, num_inference_steps=steps,
                               guidance_scale=guidance_scale, output_type="np").images)


def evaluate(folder: str | Path, template: str, *, per_prompt: int = 10, steps: int = 25, guidance_scale: float = 3.0,
             seed: int = 0, frameworks: Sequence[str] = ("diffax", "diffusers"),
             grid: str | Path | None = None) -> dict[str, Any]:
    """Class accuracy of the pipeline in `folder` on the ten digit captions, `per_prompt` images each, in each
    of `frameworks`, from the same initial latents; with both, the largest pixel difference between them.
    `grid`: a PNG of the diffax samples, one row per digit."""
    from diffax.evaluation.digits_classifier import class_accuracy
    from diffax.image_io import save_grid

    prompts = digit_captions(template)
    labels = np.repeat(np.arange(len(prompts)), per_prompt)
    noise = prompt_noise(folder, len(prompts), per_prompt, seed)
    samplers = {"diffax": diffax_images, "diffusers": diffusers_images}
    result: dict[str, Any] = {"num_samples": len(labels), "steps": steps, "guidance_scale": guidance_scale}
    images = {}
    for name in frameworks:
        t0 = time.perf_counter()
        images[name] = samplers[name](folder, prompts, noise, steps=steps, guidance_scale=guidance_scale)
        result[f"{name}_seconds"] = time.perf_counter() - t0
        result[f"{name}_accuracy"] = class_accuracy(_to_uint8(images[name]), labels)
    if len(images) == 2:
        a, b = images.values()
        result["max_abs_difference"] = float(np.abs(a - b).max())
    if grid is not None:
        first = images[frameworks[0]]
        # [digit, sample] rows: each row one prompt
        save_grid(grid, _to_uint8(first), ncols=per_prompt, upscale=max(1, 64 // first.shape[1]),
                  parameters={"prompts": prompts, "steps": steps, "guidance_scale": guidance_scale})
    return result


def main(argv: list[str]) -> None:
    """The command line (see the module docstring)."""
    from absl import app, flags
    from ml_collections import config_flags

    from diffax.cli import parse_flags, run_reporting_errors
    from diffax.train.checkpoint import restore_for_sampling

    config_flags.DEFINE_config_file("config", None, "The recipe (configs/ldm_digits.py).", lock_config=True)
    flags.DEFINE_enum("action", None, ["text_encoder", "export", "evaluate"], "What to do.")
    flags.DEFINE_string("workdir", None, "export: the U-Net's training workdir.")
    flags.DEFINE_string("out", None, "export / evaluate: the pipeline folder.")
    flags.DEFINE_string("grid", None, "evaluate: a PNG grid of the diffax samples.")
    flags.DEFINE_integer("per_prompt", 10, "evaluate: images per digit caption.")
    flags.DEFINE_string("json", None, "evaluate: also write the results to this JSON file.")
    flags.mark_flags_as_required(["config", "action"])
    FLAGS = flags.FLAGS

    def run(args: list[str]) -> None:
        del args
        config = FLAGS.config
        cache = config.cache
        template = config.data.caption_template
        if not template:
            raise ValueError("config key 'data.caption_template' is empty: the recipe's captions need it")
        if FLAGS.action == "text_encoder":
            root = Path(cache.text_encoder).parent
            if Path(cache.text_encoder) != root / TEXT_ENCODER_DIR or Path(cache.tokenizer) != root / TOKENIZER_DIR:
                raise ValueError(f"config keys 'cache.text_encoder' and 'cache.tokenizer' must be the folders "
                                 f"{TEXT_ENCODER_DIR}/ and {TOKENIZER_DIR}/ of one parent, got {cache.text_encoder!r} "
                                 f"and {cache.tokenizer!r}")
            # The U-Net's cross-attention reads the encoder's hidden states: the two widths are one number.
            stats = write_text_encoder(root, digit_captions(template), hidden_size=config.model.cross_attention_dim,
                                       seed=config.seed)
            print(f"wrote {cache.text_encoder} and {cache.tokenizer}: " +
                  ", ".join(f"{k} {v:.4g}" for k, v in stats.items()), flush=True)
        elif FLAGS.action == "export":
            if not (FLAGS.workdir and FLAGS.out):
                raise ValueError("--action=export needs --workdir (the U-Net's) and --out")
            saved, params, step = restore_for_sampling(FLAGS.workdir)
            out = export_pipeline(FLAGS.out, (build_model(saved.model), params), vae=cache.vae,
                                  text_encoder=cache.text_encoder, tokenizer=cache.tokenizer,
                                  scheduler=scheduler_config(saved))
            print(f"exported step {step} of {FLAGS.workdir} as a StableDiffusionPipeline folder: {out}", flush=True)
        else:
            if not FLAGS.out:
                raise ValueError("--action=evaluate needs --out (the pipeline folder)")
            result = evaluate(FLAGS.out, template, per_prompt=FLAGS.per_prompt, steps=config.sample.steps,
                              guidance_scale=config.sample.guidance_scale, seed=config.seed, grid=FLAGS.grid)
            for name in ("diffax", "diffusers"):
                print(f"{name}: {result['num_samples']} prompt-conditioned samples, class accuracy "
                      f"{result[f'{name}_accuracy']:.1%} (chance 10%), {result[f'{name}_seconds']:.1f} s", flush=True)
            print(f"largest pixel difference diffax vs diffusers: {result['max_abs_difference']:.2e}", flush=True)
            if FLAGS.json:
                Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
                Path(FLAGS.json).write_text(json.dumps(result, indent=2) + "\n")

    app.run(run_reporting_errors(run), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    main(sys.argv)
