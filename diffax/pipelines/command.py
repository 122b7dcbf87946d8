"""`sample.py --model=PATH`: the pipelines from the command line, one PNG per image named by its seed.

    python sample.py --model=sd-folder --prompt="a photo of a cat" --num_images=4 --out=cats/
    python sample.py --model=sd-folder --prompt="..." --image=in.png --strength=0.6 --out=out/
    python sample.py --model=sd-folder --prompt="..." --image=in.png --mask=mask.png --out=out/
    python sample.py --model=sd-folder --prompt="..." --controlnet=cn-folder --control_image=edges.png --out=out/
    python sample.py --model=sdxl-folder --refiner=refiner-folder --prompt="..." --out=out/
    python sample.py --model=sd-folder --prompt="..." --lora=style.safetensors:0.8 --out=out/
    python sample.py --model=sd-folder --prompt="..." --quantize=int8 --out=out/

`generate` does the work with plain arguments (sample.py maps its flags onto them), so it runs from Python too.
The task follows from the inputs: an `image` makes a text-to-image folder an img2img pipeline, a `mask` an
inpainting one (latent blending for an ordinary U-Net), `controlnet` attaches ControlNets, `refiner` hands the
base's last `1 - high_noise_frac` of the schedule to an SDXL refiner. Every PNG carries the call's arguments
in its `parameters` text chunk (`diffax.image_io.read_parameters`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from diffax import compilation
from diffax.image_io import save_png
from diffax.pipelines.base import PIPELINES, Pipeline, PipelineInputError

# A text-to-image pipeline class -> the class of the same model family for each other task.
TASK_CLASSES = {
    "StableDiffusionPipeline": {"img2img": "StableDiffusionImg2ImgPipeline",
                                "inpaint": "StableDiffusionInpaintPipeline"},
    "StableDiffusionXLPipeline": {"img2img": "StableDiffusionXLImg2ImgPipeline",
                                  "inpaint": "StableDiffusionXLInpaintPipeline"},
}


@dataclasses.dataclass
class Request:
    """One command-line request: the pipeline call's arguments (None: the pipeline's default)."""
    prompt: str
    negative_prompt: str | None = None
    image: str | None = None            # img2img / inpainting init image (a file)
    mask: str | None = None             # inpainting mask (a file; white repaints)
    strength: float | None = None
    control_image: str | None = None    # ControlNet conditioning image (a file)
    canny: bool = False                 # run the built-in Canny edge detector on control_image first
    controlnet_scale: float = 1.0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    num_images: int = 1
    batch_size: int = 8
    high_noise_frac: float = 0.8        # base -> refiner hand-off point


def parse_lora(spec: str) -> tuple[str, float]:
    """'path' or 'path:scale' -> (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:  # a ':' inside the path, no scale
        return spec, 1.0


def _class_name(pipe: Pipeline) -> str:
    return next((name for name, cls in PIPELINES.items() if cls is type(pipe)), type(pipe).__name__)


def for_task(pipe: Pipeline, task: str) -> Pipeline:
    """`pipe`'s components, tokenizers, scheduler, mesh and safety checker as the `task` ('img2img' or
    'inpaint') pipeline of its family; `pipe` itself when it already is one (an inpainting folder)."""
    name = _class_name(pipe)
    if task in name.lower() or (task == "img2img" and "inpaint" in name.lower()):
        return pipe
    target = TASK_CLASSES.get(name, {}).get(task)
    if target is None or target not in PIPELINES:
        raise PipelineInputError(f"{pipe.source}: no {task} pipeline for {name}")
    return PIPELINES[target].from_pipe(pipe)


def _read_image(path: str, what: str) -> Any:
    from PIL import Image
    if not Path(path).is_file():
        raise FileNotFoundError(f"--{what}: no such file {path}")
    with Image.open(path) as image:
        return image.convert("RGB") if what != "mask" else image.convert("L")


def _control_image(request: Request) -> Any:
    image = _read_image(request.control_image, "control_image")
    if request.canny:
        from diffax.pipelines.canny import canny
        image = canny(np.asarray(image))
    return image


def _call_arguments(pipe: Pipeline, request: Request) -> dict[str, Any]:
    """The keyword arguments of `pipe`'s call for `request` (the seed and count are added per batch)."""
    kwargs: dict[str, Any] = {"prompt": request.prompt, "negative_prompt": request.negative_prompt,
                              "height": request.height, "width": request.width}
    for key, value in (("num_inference_steps", request.num_inference_steps),
                       ("guidance_scale", request.guidance_scale), ("strength", request.strength)):
        if value is not None:
            kwargs[key] = value
    if request.image is not None:
        kwargs["image"] = _read_image(request.image, "image")
        if request.height is None and request.width is None:  # the image's own size, not the model's default
            kwargs["width"], kwargs["height"] = kwargs["image"].size
    if request.mask is not None:
        kwargs["mask_image"] = _read_image(request.mask, "mask")
    if request.control_image is not None:
        key = "control_image" if request.image is not None else "image"
        kwargs[key] = _control_image(request)
        kwargs["controlnet_conditioning_scale"] = request.controlnet_scale
    return kwargs


def build_pipeline(model: str, request: Request, *, controlnets: Sequence[str] = (), refiner: str | None = None,
                   loras: Sequence[str] = (), sampler: str | None = None, sampler_options: dict | None = None,
                   dtype: Any = None, safety_checker: bool = True, attention_backend: str = "auto",
                   quantize: str | None = None, quantize_group_size: int | None = None
                   ) -> tuple[Pipeline, Pipeline | None]:
    """(pipeline, refiner or None) for a request: loaded, switched to its task, ControlNets and LoRAs attached,
    the sampler swapped. quantize ('int8' / 'int4'): the denoisers, ControlNets and text encoders quantized
    last (`Pipeline.quantize`), after the LoRAs are fused into their float weights."""
    from diffax.pipelines import load
    from diffax.quant import mode_bits
    if quantize is not None:
        mode_bits(quantize, "--quantize")  # before minutes of loading
    pipe = load(model, dtype=dtype, safety_checker=safety_checker, attention_backend=attention_backend)
    if request.mask is not None:
        if request.image is None:
            raise PipelineInputError("--mask needs --image (the picture to repaint)")
        pipe = for_task(pipe, "inpaint")
    elif request.image is not None:
        pipe = for_task(pipe, "img2img")
    if controlnets:
        if request.control_image is None:
            raise PipelineInputError("--controlnet needs --control_image")
        from diffax.pipelines.controlnet import with_controlnet
        pipe = with_controlnet(pipe, list(controlnets) if len(controlnets) > 1 else controlnets[0], dtype=dtype)
    elif request.control_image is not None and not pipe.has("controlnet"):
        raise PipelineInputError("--control_image needs --controlnet (or a ControlNet pipeline folder)")
    for i, spec in enumerate(loras):
        path, scale = parse_lora(spec)
        pipe.load_lora_weights(path, adapter_name=f"lora_{i}", scale=scale)
    if len(loras) > 1:
        pipe.set_adapters([f"lora_{i}" for i in range(len(loras))], [parse_lora(s)[1] for s in loras])
    second = None
    if refiner is not None:
        second = load(refiner, dtype=dtype, safety_checker=safety_checker, attention_backend=attention_backend)
    if sampler is not None:
        for p in (pipe, second):
            if p is not None:
                p.set_scheduler(sampler, **(sampler_options or {}))
    if quantize is not None:
        if loras:  # LoRA merges into float weights: fold the adapters in before the weights become integers
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        for p in (pipe, second):
            if p is not None:
                p.quantize(quantize, group_size=quantize_group_size)
    return pipe, second


class _Progress:
    """A tqdm bar over every denoising step of the run (all batches, base and refiner), on a terminal."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="denoise", unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty() or jax.process_index() != 0)

    def __call__(self, step: int, total: int) -> None:
        del step, total
        self.bar.update(1)


def generate(pipe: Pipeline, request: Request, out: str | Path, *, refiner: Pipeline | None = None,
             made_with: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs `request` in batches of `batch_size` images and writes `<out>/<seed>.png` for image seeds
    seed .. seed + num_images - 1. Returns {'paths', 'nsfw', 'compile_seconds', 'sample_seconds'}."""
    if request.num_images < 1 or request.batch_size < 1:
        raise PipelineInputError(f"--num_images and --batch_size must be >= 1, got {request.num_images} and "
                                 f"{request.batch_size}")
    out = Path(out)
    if out.suffix:
        raise PipelineInputError(f"--out: with --model it is a directory for the PNGs, got {out}")
    kwargs = _call_arguments(pipe, request)
    seeds = list(range(request.seed, request.seed + request.num_images))
    steps = kwargs.get("num_inference_steps", 50)
    num_batches = -(-len(seeds) // request.batch_size)
    progress = _Progress(total=num_batches * steps * (2 if refiner is not None else 1))
    for p in (pipe, refiner):
        if p is not None:
            p.progress = progress
    paths, nsfw, start = [], [], time.perf_counter()
    with compilation.compile_seconds() as seconds, contextlib.closing(progress.bar):
        for first in range(0, len(seeds), request.batch_size):
            batch = seeds[first:first + request.batch_size]
            if refiner is None:
                result = pipe(**kwargs, seed=batch, num_images_per_prompt=len(batch), output_type="np")
            else:
                latents = pipe(**kwargs, seed=batch, num_images_per_prompt=len(batch),
                               denoising_end=request.high_noise_frac,
                               output_type="latent").images
                result = refiner(prompt=request.prompt, negative_prompt=request.negative_prompt, image=latents,
                                 num_inference_steps=steps, denoising_start=request.high_noise_frac,
                                 seed=batch, num_images_per_prompt=len(batch), output_type="np",
                                 **({"guidance_scale": request.guidance_scale}
                                    if request.guidance_scale is not None else {}))
            flags = result.nsfw_content_detected or [False] * len(batch)
            for seed, image, flagged in zip(batch, result.images, flags):
                path = out / f"{seed}.png"
                if jax.process_index() == 0:
                    save_png(path, np.clip(np.round(image * 255), 0, 255).astype(np.uint8),
                             parameters={**(made_with or {}), "seed": seed, "nsfw_content_detected": bool(flagged)})
                paths.append(path)
                nsfw.append(bool(flagged))
    total = time.perf_counter() - start
    compile_seconds = seconds["lower"] + seconds["compile"]  # traces nest: left out
    return {"paths": paths, "nsfw": nsfw, "compile_seconds": compile_seconds,
            "sample_seconds": total - compile_seconds}
