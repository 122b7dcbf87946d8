"""`diffax.pipelines.load`: a diffusers pipeline folder, a hub id or a single-file checkpoint -> a pipeline.

    pipe = load("stable-diffusion-v1-5")                       # model_index.json picks the class
    pipe = load("v1-5-pruned-emaonly.safetensors", tokenizer="sd-tokenizer")   # single file
    pipe = load("runwayml/stable-diffusion-v1-5")              # hub id (needs diffax[hub] and a network)

The folder's `_class_name` picks the class through the registry that pipeline modules fill at import
(`register_pipeline`); each model component is converted once and cached on disk (`diffax.pipelines.cache`),
tokenizers are read with transformers, the scheduler with `from_diffusers_config`.

XLA's persistent compilation cache is turned on (unless the user set one, or `compilation_cache=False`, or
DIFFAX_XLA_CACHE=0) under the conversion cache's parent, ~/.cache/diffax/xla, so a second process reuses
the compiled programs.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
from jax.sharding import Mesh

from diffax import compilation
from diffax.convert.io import CheckpointError
from diffax.models.config_base import read_config_json
from diffax.models.registry import get_family, make_module
from diffax.pipelines import cache
from diffax.pipelines.base import PIPELINES, Pipeline
from diffax.pipelines.executables import ExecutableCache
from diffax.schedulers import from_diffusers_config

PIPELINE_INDEX = "model_index.json"
# Modules that register pipeline classes; imported on first load (those not present are skipped).
PIPELINE_MODULES = ("diffax.pipelines.stable_diffusion", "diffax.pipelines.class_conditional",
                    "diffax.pipelines.stable_diffusion_xl", "diffax.pipelines.controlnet", "diffax.pipelines.safety")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
IGNORED_CLASSES = ("CLIPImageProcessor", "CLIPFeatureExtractor")  # the safety checker's input processor
# Single-file model type -> pipeline class and default scheduler (the released models' scheduler configs).
_SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon"}
_SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                   "timestep_spacing": "leading", "prediction_type": "epsilon"}
SINGLE_FILE_PIPELINES = {
    "sd1": ("StableDiffusionPipeline", _SD_SCHEDULER),
    "sd1_inpaint": ("StableDiffusionInpaintPipeline", _SD_SCHEDULER),
    "sd2": ("StableDiffusionPipeline", {**_SD_SCHEDULER, "prediction_type": "v_prediction"}),
    "sd2_base": ("StableDiffusionPipeline", _SD_SCHEDULER),
    "sd2_inpaint": ("StableDiffusionInpaintPipeline", _SD_SCHEDULER),
    "sdxl": ("StableDiffusionXLPipeline", _SDXL_SCHEDULER),
    "sdxl_inpaint": ("StableDiffusionXLInpaintPipeline", _SDXL_SCHEDULER),
    "sdxl_refiner": ("StableDiffusionXLImg2ImgPipeline", _SDXL_SCHEDULER),
}
COMPONENT_LOADERS: dict[str, Any] = {}
COMPONENT_ATTACHERS: dict[str, Any] = {}


def register_component_loader(class_name: str, loader: Any, attach: Any = None) -> None:
    """Loads components of diffusers class `class_name` (e.g. the safety checker) with
    `loader(folder, dtype=..., cache_dir=...) -> (module, params)` instead of `diffax.convert.load`. With
    `attach(pipe, component)`, the loaded component is handed to it once the pipeline is built (a safety
    checker becomes `pipe.safety_checker`); without, it is one of `pipe.components`."""
    COMPONENT_LOADERS[class_name] = loader
    if attach is not None:
        COMPONENT_ATTACHERS[class_name] = attach


def _attacher(class_name: str) -> Any:
    """The attach function of `class_name`: registered, or the `attach` of the loader's module."""
    if class_name in COMPONENT_ATTACHERS:
        return COMPONENT_ATTACHERS[class_name]
    module = sys.modules.get(getattr(COMPONENT_LOADERS.get(class_name), "__module__", ""))
    return getattr(module, "attach", None)


def pipeline_classes() -> dict[str, type[Pipeline]]:
    """diffusers class name -> diffax pipeline class, after importing every pipeline module."""
    for name in PIPELINE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return dict(PIPELINES)


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """A CLIP tokenizer folder: vocab.json + merges.txt (`diffax.models.clip.load_tokenizer`), or the single
    tokenizer.json that transformers 5 saves."""
    from diffax.models import clip
    folder = Path(folder)
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        return clip.load_tokenizer(folder)
    from transformers import CLIPTokenizer
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{folder / 'tokenizer.json'}: not a readable CLIP tokenizer ({type(e).__name__}: {e})"
                         ) from None


def load(path: str | os.PathLike, *, dtype: Any = None, attention_backend: str = "auto",
         safety_checker: bool = True, cache_dir: str | os.PathLike | None | bool = None, mesh: Mesh | None = None,
         tokenizer: str | os.PathLike | None = None, tokenizer_2: str | os.PathLike | None = None,
         model_type: str | None = None, scheduler: Any = None, single_file_configs: Mapping[str, Any] | None = None,
         compilation_cache: bool = True, executable_cache: bool = False) -> Pipeline:
    """The pipeline at `path`: a diffusers pipeline folder (model_index.json), a hub id, or a single-file
    Stable Diffusion checkpoint (.safetensors / .ckpt).

    Args:
        dtype: compute and parameter dtype of every model (e.g. jnp.bfloat16); None keeps float32.
        attention_backend: the models' attention kernel ('auto', 'xla', 'cudnn', 'chunked', ...).
        safety_checker: False skips the folder's safety checker (images are then not checked).
        cache_dir: where converted parameters are cached (default $DIFFAX_CACHE_DIR or
            ~/.cache/diffax/pipelines); False converts every time.
        mesh: the device mesh (default every local device on 'data').
        tokenizer, tokenizer_2: tokenizer folders for a single-file checkpoint (which holds none).
        model_type: a single file's model type ('sd1', 'sd1_inpaint', 'sd2', ...; default inferred).
        scheduler: a scheduler, config or sampler name replacing the loaded / default one.
        single_file_configs: component -> diffax config for a single file of non-standard sizes.
        compilation_cache: turn on XLA's persistent compilation cache (see the module doc).
        executable_cache: keep the compiled programs themselves on disk, keyed by what decides them, so a new
            process skips tracing, lowering and compiling (`diffax.pipelines.executables`).
    Raises:
        CheckpointError / ValueError naming the file and key: no such path, an unknown pipeline class, a
        missing component, a model config diffax does not support.
    """
    if compilation_cache:
        compilation.enable_persistent_cache(cache.cache_root(cache_dir if cache_dir is not False else None).parent
                                            / "xla")
    local = Path(path).expanduser()
    if not local.exists():
        local = _download(str(path))
    if local.is_file():
        pipe = _load_single_file(local, dtype=dtype, attention_backend=attention_backend, cache_dir=cache_dir,
                                 mesh=mesh, tokenizer=tokenizer, tokenizer_2=tokenizer_2, model_type=model_type,
                                 scheduler=scheduler, configs=single_file_configs)
    elif not (local / PIPELINE_INDEX).is_file():
        raise CheckpointError(f"{local / PIPELINE_INDEX}: missing; a diffusers pipeline folder holds it (for one "
                              f"model use diffax.convert.load)")
    else:
        pipe = _load_folder(local, dtype=dtype, attention_backend=attention_backend, safety_checker=safety_checker,
                            cache_dir=cache_dir, mesh=mesh, scheduler=scheduler)
    if executable_cache:
        pipe.executable_cache = ExecutableCache(
            cache.cache_root(cache_dir if cache_dir not in (None, False) else None).parent / "executables")
    return pipe


def _download(repo_id: str) -> Path:
    """The local snapshot of hub pipeline `repo_id` (configs, tokenizers, safetensors weights)."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise CheckpointError(f"{repo_id}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: no such file or folder here; downloading it as a hub id needs "
                              f"huggingface_hub: pip install 'diffax[hub]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, gated...: the hub library's many error types
        raise CheckpointError(f"{repo_id}: not a local file or folder, and downloading it from the hub failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _load_folder(folder: Path, *, dtype: Any, attention_backend: str, safety_checker: bool,
                 cache_dir: Any, mesh: Mesh | None, scheduler: Any) -> Pipeline:
    index, where = read_config_json(folder / PIPELINE_INDEX)
    class_name = index.get("_class_name")
    classes = pipeline_classes()
    if class_name not in classes:
        raise CheckpointError(f"{where}: _class_name {class_name!r} is not a pipeline diffax has (it has "
                              f"{', '.join(sorted(classes))})")
    backend = None if attention_backend == "auto" else attention_backend
    components, tokenizers, config, loaded_scheduler = {}, {}, {}, None
    attached = []  # (class name, component) handed to its attach function once the pipeline exists
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not (isinstance(spec, list) and len(spec) == 2):
            config[name] = spec  # e.g. requires_safety_checker, force_zeros_for_empty_prompt, id2label
            continue
        library, cls = spec
        if cls is None:
            continue  # a component saved as None (e.g. safety_checker=None)
        sub = folder / name
        if cls in TOKENIZER_CLASSES:
            tokenizers[name] = load_tokenizer(sub)
        elif cls in IGNORED_CLASSES:
            continue
        elif name == "scheduler" or cls.endswith("Scheduler"):
            loaded_scheduler = from_diffusers_config(sub)
        elif name == "safety_checker" and not safety_checker:
            continue
        elif cls in COMPONENT_LOADERS:
            component = COMPONENT_LOADERS[cls](sub, dtype=dtype, cache_dir=cache_dir)
            if _attacher(cls) is not None:
                attached.append((cls, component))
            else:
                components[name] = component
        elif name == "safety_checker":
            warnings.warn(f"{sub}: {cls} is not supported; images are not safety-checked", stacklevel=3)
        else:
            components[name] = cache.load_component(sub, dtype=dtype, param_dtype=dtype,
                                                    attention_backend=backend, cache_dir=cache_dir)
    if loaded_scheduler is None and scheduler is None:
        raise CheckpointError(f"{where}: no scheduler component")
    pipe = classes[class_name](components, loaded_scheduler if loaded_scheduler is not None else scheduler,
                               tokenizers=tokenizers, mesh=mesh, dtype=dtype, config=config, source=str(folder))
    if scheduler is not None and loaded_scheduler is not None:
        pipe.scheduler = scheduler
    for cls, component in attached:
        _attacher(cls)(pipe, component)
    return pipe


def _load_single_file(path: Path, *, dtype: Any, attention_backend: str, cache_dir: Any, mesh: Mesh | None,
                      tokenizer: Any, tokenizer_2: Any, model_type: str | None, scheduler: Any,
                      configs: Mapping[str, Any] | None) -> Pipeline:
    from diffax.convert.single_file import infer_model_type, load_single_file

    model_type = model_type or infer_model_type(path)
    if model_type not in SINGLE_FILE_PIPELINES:
        raise CheckpointError(f"{path}: model type {model_type!r} has no pipeline (known: "
                              f"{', '.join(SINGLE_FILE_PIPELINES)})")
    class_name, default_scheduler = SINGLE_FILE_PIPELINES[model_type]
    classes = pipeline_classes()
    if class_name not in classes:
        raise CheckpointError(f"{path}: a {model_type} checkpoint needs {class_name}, which diffax does not have yet")
    cls = classes[class_name]
    tokenizers = {}
    for name, folder in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        if name in cls.required_tokenizers:
            if folder is None:
                raise ValueError(f"{path}: a single-file checkpoint holds no tokenizer; pass {name}='folder' (a "
                                 f"CLIP tokenizer folder with vocab.json and merges.txt, e.g. a diffusers "
                                 f"pipeline's {name}/)")
            tokenizers[name] = load_tokenizer(folder)
    options = {"dtype": str(dtype), "model_type": model_type, "configs": repr(sorted((configs or {}).items()))}
    runtime = {} if dtype is None else {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(dtype)}
    # One cache entry for the whole file: its components are stored together.
    module_params = cache.cached_components(
        path, options, cache_dir,
        lambda: load_single_file(path, model_type=model_type, dtype=dtype, param_dtype=dtype, configs=configs),
        lambda class_name, cfg: get_family(class_name).config_cls.from_diffusers(cfg, **runtime))
    if attention_backend != "auto":
        module_params = {n: (make_module(dataclasses.replace(m.config, attention_backend=attention_backend)), p)
                         for n, (m, p) in module_params.items()}
    return cls(module_params, scheduler if scheduler is not None else default_scheduler, tokenizers=tokenizers,
               mesh=mesh, dtype=dtype, source=str(path))
