"""The pipeline base class: components, a swappable scheduler, a mesh, and one compiled program per static choice.

    pipe = diffax.pipelines.load("sd-folder")                 # a Pipeline subclass, picked by model_index.json
    pipe.set_scheduler("dpm++2m")                              # or pipe.scheduler = a diffax scheduler / config
    out = pipe("a photo of a cat", seed=[0, 1], num_inference_steps=25)
    out.images                                                 # float32 [N, H, W, 3] in [0, 1]

A pipeline holds `components` = {name: (Flax module, params)}, host tokenizers, a scheduler and a mesh. A call
turns its Python arguments into host arrays (token ids, seeds, images) on the host, then runs ONE jitted
program: text encoding, the whole denoising loop and the VAE decode. The program depends only on the static
choices (image size, step count, guided or not, output type, ...) and is cached in memory by them, so a new
prompt, seed, guidance scale or img2img strength reuses it; XLA's persistent compilation cache keeps it
across processes (see `diffax.pipelines.loading`).

Batch rows are split over the mesh's batch axes ('data' x 'fsdp'), padded to a multiple of the device count
(the padding is dropped); parameters are replicated on every device, or split by the models' logical axis
rules on a mesh with 'fsdp' / 'tensor' axes. Image k's starting noise is
`jax.random.normal(jax.random.key(seed_k), latent_shape)`, drawn inside the program from its own seed, and a
stochastic sampler's step noise comes from the same seed (`row_keys(seeds, 2)`), so an image depends on its
seed only, whatever the batch size or device count.

Pipeline modules register their classes under diffusers' class names with `register_pipeline`, so
`diffax.pipelines.load` can dispatch on a folder's `_class_name`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Hashable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffax import host_memory, parallel, quant
from diffax.models.registry import logical_specs
from diffax.pipelines.executables import ExecutableCache
from diffax.pipelines.lora import LoraMixin
from diffax.schedulers import EXTRAS_KEY, from_diffusers_config, scheduler_classes, to_diffusers_config
from diffax.schedulers.base import Scheduler
from diffax.schedulers.names import SAMPLER_NAMES, SCHEDULE_KEYS, scheduler_for

Params = Any
Component = tuple[nn.Module, Params]
OUTPUT_TYPES = ("np", "pil", "latent")
# A program: fn(params {component: params}, rows {name: [N, ...]}, scalars {name: scalar}) -> [N, ...] arrays.
Program = Callable[[dict[str, Params], dict[str, Any], dict[str, Any]], Any]

PIPELINES: dict[str, type["Pipeline"]] = {}
# What `Pipeline.quantize` quantizes by default: the denoiser (with its ControlNets) and the text encoders,
# where most weights and every step's weight reads are; the VAE runs once per image and is left float.
QUANTIZED_BY_DEFAULT = ("unet", "transformer", "controlnet", "text_encoder", "text_encoder_2")


def register_pipeline(name: str, cls: type["Pipeline"] | None = None) -> Any:
    """Registers a pipeline class under a diffusers `_class_name`; usable as a decorator
    (`@register_pipeline("StableDiffusionPipeline")`) or a call."""
    def add(c: type["Pipeline"]) -> type["Pipeline"]:
        if name in PIPELINES and PIPELINES[name] is not c:
            raise TypeError(f"pipeline class {name!r} is registered twice: {PIPELINES[name].__qualname__} and "
                            f"{c.__qualname__}")
        PIPELINES[name] = c
        return c
    return add if cls is None else add(cls)


class PipelineInputError(ValueError):
    """A call argument the pipeline cannot take; the message names it."""


@dataclasses.dataclass
class PipelineOutput:
    """diffusers' output names. images: float32 [N, H, W, 3] in [0, 1] ('np'), a list of PIL images ('pil'),
    or the final diffusion-space latents [N, h, w, C] ('latent'). nsfw_content_detected: one flag per image
    from the safety checker, None without one (or for latents)."""
    images: Any
    nsfw_content_detected: list[bool] | None = None


# ----------------------------------------------------------------------------- host-side helpers


def default_mesh() -> Mesh:
    """Every device on the 'data' axis: batch rows split over all devices, parameters replicated."""
    return parallel.make_mesh({"data": -1})


def prompt_list(prompt: str | Sequence[str] | None, what: str = "prompt") -> list[str] | None:
    """A prompt or list of prompts as a list (None stays None)."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    prompts = list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PipelineInputError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def seeds_for(seed: int | Sequence[int], n: int) -> np.ndarray:
    """uint32 [n] per-image seeds: seed, seed + 1, ... for an int, or the list itself (its length must be n)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = np.arange(int(seed), int(seed) + n, dtype=np.int64)
    elif seed is None or isinstance(seed, (str, bytes, bool)) or not hasattr(seed, "__iter__"):
        raise PipelineInputError(f"seed must be an int or one int per image, got {seed!r}")
    else:
        seeds = np.asarray(list(seed), dtype=np.int64).reshape(-1)
        if len(seeds) != n:
            raise PipelineInputError(f"seed: {len(seeds)} seeds given for {n} images (one per image, or an int)")
    if (seeds < 0).any() or (seeds >= 2 ** 32).any():
        raise PipelineInputError(f"seed: seeds must be in [0, 2**32), got {seeds.tolist()}")
    return seeds.astype(np.uint32)


def noise_from_seeds(seeds: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """[N, *shape] standard normal noise, row k from `jax.random.key(seeds[k])` (traceable)."""
    return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), tuple(shape), dtype))(seeds)


def row_keys(seeds: jax.Array, stream: int) -> jax.Array:
    """[N] keys for the `stream`-th random draw of each image other than its starting noise (stream 0), e.g.
    the VAE posterior sample of img2img."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stream))(seeds)


def to_unit_range(images: jax.Array) -> jax.Array:
    """VAE output in [-1, 1] -> float32 in [0, 1], as diffusers' `postprocess` denormalizes."""
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def postprocess(images: np.ndarray, output_type: str) -> Any:
    """float32 [N, H, W, 3] in [0, 1] -> 'np' (as is) or 'pil' (a list of PIL images, rounded like diffusers)."""
    if output_type == "np":
        return images
    if output_type == "pil":
        from PIL import Image
        return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]
    raise PipelineInputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise PipelineInputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def as_scheduler(scheduler: Scheduler | Mapping[str, Any] | str, base_config: Mapping[str, Any] | None = None,
                 **options: Any) -> Scheduler:
    """A diffax scheduler from a scheduler, a diffusers scheduler config (dict, file or folder), or a name.

    A name is a short sampler name ('dpm++2m_karras', diffax.schedulers.names) or a scheduler class name;
    it is built from `base_config` (the pipeline's current scheduler config) as diffusers'
    `OtherScheduler.from_config(pipe.scheduler.config)` does: every key the new class shares is kept.
    `options` are extra fields on top.
    """
    if isinstance(scheduler, Scheduler):
        return dataclasses.replace(scheduler, **options) if options else scheduler
    if isinstance(scheduler, str) and (scheduler in SAMPLER_NAMES or scheduler in scheduler_classes()
                                       or base_config is not None):
        class_name, preset = SAMPLER_NAMES.get(scheduler, (scheduler, {}))
        if class_name in scheduler_classes() and base_config is not None:
            # diffax-only options (DDIM's eta) belong to the old class: dropped, as diffusers' from_config does.
            shared = {k: v for k, v in base_config.items() if k != EXTRAS_KEY}
            return dataclasses.replace(from_diffusers_config(shared, scheduler_class=class_name),
                                       **{**preset, **options})
        return scheduler_for(scheduler, {k: base_config[k] for k in SCHEDULE_KEYS if k in (base_config or {})},
                             **options)
    out = from_diffusers_config(scheduler)
    return dataclasses.replace(out, **options) if options else out


def num_loop_steps(scheduler: Scheduler, num_inference_steps: int) -> int:
    """Model evaluations in a full run (len(state.timesteps)): steps x order, less one for Heun-style
    samplers whose first step has no corrector half, as diffusers' timesteps."""
    state = scheduler.init(num_inference_steps, jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32))
    return int(np.shape(state.timesteps)[0])


def _pad_rows(x: np.ndarray, pad: int) -> np.ndarray:
    """x with its last row repeated `pad` times (padding rows stay valid inputs: seeds, ids, images)."""
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x


def _holds_quantized(params: Params) -> bool:
    """Whether a component's params (a tree, or a tuple of trees for several ControlNets) hold integer kernels."""
    trees = params if isinstance(params, tuple) else (params,)
    return any(isinstance(t, Mapping) and quant.is_quantized(t) for t in trees)


# ----------------------------------------------------------------------------- the base class


def chain_hooks(*hooks: Callable[[jax.Array, jax.Array, Any], jax.Array] | None
                ) -> Callable[[jax.Array, jax.Array, Any], jax.Array] | None:
    """One `after_step` hook running the given ones in order (None ones skipped); None when there are none."""
    hooks = tuple(h for h in hooks if h is not None)
    if not hooks:
        return None

    def run(x: jax.Array, i: jax.Array, state: Any) -> jax.Array:
        for hook in hooks:
            x = hook(x, i, state)
        return x

    return run


class Pipeline(LoraMixin):
    """A diffusers-style pipeline over diffax components. Subclasses set `required_components` and
    implement `__call__` with `run_program`."""

    required_components: ClassVar[tuple[str, ...]] = ()
    required_tokenizers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, components: Mapping[str, Component], scheduler: Scheduler | Mapping[str, Any] | str, *,
                 tokenizers: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
                 rules: parallel.Rules = parallel.DEFAULT_RULES, dtype: Any = None,
                 config: Mapping[str, Any] | None = None, source: str | None = None):
        """components: {name: (module, params)} as `diffax.convert.load` returns them; scheduler: see
        `as_scheduler`; tokenizers: {name: transformers tokenizer}; mesh: default every local device on
        'data'; dtype: the compute dtype the components were loaded with (None: their own); config: the
        model_index.json's other keys (e.g. `force_zeros_for_empty_prompt`); source: where it was loaded from."""
        host_memory.release_after_compiles()  # each program's compiler memory, before the program runs
        self.source = source
        where = source or type(self).__name__
        missing = [n for n in self.required_components if n not in components]
        missing += [n for n in self.required_tokenizers if n not in (tokenizers or {})]
        if missing:
            raise ValueError(f"{where}: {type(self).__name__} needs component(s) {', '.join(missing)}")
        self.components: dict[str, Component] = dict(components)
        self.tokenizers: dict[str, Any] = dict(tokenizers or {})
        self.mesh = mesh if mesh is not None else default_mesh()
        self.rules = rules
        self.dtype = dtype
        self.config: dict[str, Any] = dict(config or {})
        self.trace_count = 0  # how many times a program was traced (tests check new inputs do not retrace)
        # progress(step, total) is called on the host after every denoising step when set (off by default).
        self.progress: Callable[[int, int], None] | None = None
        # safety_checker(images [N, H, W, 3] float [0, 1]) -> (images, flags); set by the safety-checker loader.
        self.safety_checker: Callable[[np.ndarray], tuple[np.ndarray, list[bool]]] | None = None
        self._programs: dict[Hashable, Callable] = {}
        self._placed: dict[str, Params] | None = None
        # Compiled programs kept on disk across processes (diffax.pipelines.executables); None: jit only.
        self.executable_cache: ExecutableCache | None = None
        if isinstance(scheduler, Scheduler):
            self._scheduler = scheduler
            self.scheduler_config = to_diffusers_config(scheduler)
        else:
            self._scheduler = as_scheduler(scheduler)
            self.scheduler_config = to_diffusers_config(self._scheduler)

    @classmethod
    def from_pipe(cls, pipe: "Pipeline") -> "Pipeline":
        """This class over another pipeline's components, tokenizers, scheduler, mesh, config and safety
        checker (diffusers' `from_pipe`), e.g. `StableDiffusionImg2ImgPipeline.from_pipe(txt2img)`. Parameters
        are shared, on the host and on the devices (one copy in device memory for both); compiled programs are
        not (each class builds its own)."""
        out = cls(pipe.components, pipe.scheduler, tokenizers=pipe.tokenizers, mesh=pipe.mesh, rules=pipe.rules,
                  dtype=pipe.dtype, config=pipe.config, source=pipe.source)
        out._placed = pipe.device_params()
        out.scheduler_config = dict(pipe.scheduler_config)
        out.safety_checker = pipe.safety_checker
        out.progress = pipe.progress
        out.executable_cache = pipe.executable_cache
        return out

    # -- components

    def module(self, name: str) -> nn.Module:
        return self.components[name][0]

    def params(self, name: str) -> Params:
        return self.components[name][1]

    def has(self, name: str) -> bool:
        return name in self.components

    def set_component(self, name: str, module: nn.Module | None = None, params: Params | None = None) -> None:
        """Replaces a component's module and/or params (e.g. LoRA fused into the weights). New params keep the
        compiled programs (they are program inputs); a new module drops them."""
        old_module, old_params = self.components.get(name, (None, None))
        self.components[name] = (module if module is not None else old_module,
                                 params if params is not None else old_params)
        self._placed = None
        if module is not None and module is not old_module:
            self.clear_programs()

    def param_shardings(self, module: nn.Module, params: Params) -> Any:
        """Where a component's params live: replicated on a data-parallel mesh; on a mesh with 'fsdp' or
        'tensor' axes, split by the model's logical axis names through `self.rules` (for models that do not
        fit one device). A tree the model's specs do not describe (e.g. with LoRA factors added) is
        replicated."""
        rep = parallel.replicated(self.mesh)
        if self.mesh.shape["fsdp"] == 1 and self.mesh.shape["tensor"] == 1:
            return rep
        try:
            specs = logical_specs(module.config)
        except (AttributeError, KeyError, TypeError, ValueError):  # not a registered diffax model
            return rep
        if isinstance(params, Mapping) and quant.is_quantized(params):
            specs = quant.quantized_specs(specs, params)  # integer kernels keep the float kernel's output axis
        if jax.tree.structure(specs) != jax.tree.structure(params):
            return rep
        return parallel.logical_shardings(specs, self.mesh, self.rules, shapes=params)

    def quantized_components(self) -> list[str]:
        """The components whose params hold quantized (integer) kernels."""
        return [name for name, (_, params) in self.components.items() if _holds_quantized(params)]

    def quantize(self, mode: str = "int8", components: Sequence[str] | None = None, *,
                 group_size: int | None = None) -> dict[str, Any]:
        """Weight-only quantization of components' Dense / Conv kernels in place (`diffax.quant`): int8 or
        int4 integers with fp32 scales, dequantised inside each layer, so the same programs run them.

        mode: 'int8' or 'int4'. components: names to quantize; default those of `QUANTIZED_BY_DEFAULT` the
        pipeline has (the denoiser, ControlNets, text encoders; add 'vae' to quantize it too).
        group_size: None for one scale per output channel, else the most input rows one scale covers.
        Returns {component: QuantizedParams} (a tuple of them for several ControlNets), e.g. for
        `diffax.quant.save_safetensors`. Adapters must be fused and unloaded first (LoRA merges into float
        weights); a component quantized already is an error, as is a name the pipeline does not have.
        """
        bits = quant.mode_bits(mode, "Pipeline.quantize")
        names = ([n for n in QUANTIZED_BY_DEFAULT if n in self.components] if components is None
                 else [components] if isinstance(components, str) else list(components))
        where = self.source or type(self).__name__
        for name in names:
            if name not in self.components:
                raise ValueError(f"{where}: quantize: no component {name!r} (have {', '.join(self.components)})")
            if _holds_quantized(self.components[name][1]):
                raise ValueError(f"{where}: quantize: {name} is quantized already")
        lora = self.__dict__.get("_lora_state")
        if lora is not None and lora.adapters:
            raise ValueError(f"{where}: quantize: LoRA adapters {', '.join(lora.adapters)} are loaded; fold them into "
                             f"the weights first with fuse_lora() and unload_lora_weights()")
        out = {}
        for name in names:
            params = self.components[name][1]
            if isinstance(params, tuple):  # several ControlNets: one tree each
                out[name] = tuple(quant.quantize_params(p, bits, group_size) for p in params)
                self.set_component(name, params=tuple(q.params for q in out[name]))
            else:
                out[name] = quant.quantize_params(params, bits, group_size)
                self.set_component(name, params=out[name].params)
        return out

    def device_params(self) -> dict[str, Params]:
        """{component: params} on the mesh (placed once, kept until params change); see `param_shardings`.

        With one process the components then hold the placed arrays instead of their host trees: keeping both
        would double the weights' memory (host RAM beside an accelerator; the process itself on a CPU). One
        component at a time, so loading peaks at the host trees plus the largest component."""
        if self._placed is None:
            placed = {}
            for name, (module, params) in list(self.components.items()):
                placed[name] = jax.device_put(params, self.param_shardings(module, params))
                if jax.process_count() == 1:  # with several, a process cannot read every placed array back
                    self.components[name] = (module, placed[name])
            self._placed = placed
        return self._placed

    # -- scheduler

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Scheduler | Mapping[str, Any] | str) -> None:
        self._scheduler = as_scheduler(scheduler, self.scheduler_config)
        self.clear_programs()

    def set_scheduler(self, name: str | Scheduler | Mapping[str, Any], **options: Any) -> Scheduler:
        """Swaps the sampler: a short name ('dpm++2m', 'euler_a', ...), a scheduler class name (diffax or
        diffusers), a diffusers config, or a scheduler; `options` set its fields. Names keep the pipeline's
        noise schedule and shared config keys, like diffusers' `X.from_config(pipe.scheduler.config)`."""
        self._scheduler = as_scheduler(name, self.scheduler_config, **options)
        self.clear_programs()
        return self._scheduler

    def clear_programs(self) -> None:
        """Drops the compiled programs (after a scheduler or module change)."""
        self._programs.clear()

    # -- running

    def program(self, key: Hashable, build: Callable[[], Program]) -> Callable:
        """The jitted program for static choices `key`, built (by `build`) and cached on first use.

        The program takes (params, rows, scalars): rows are split over the mesh's batch axes, scalars
        replicated; its outputs are batch-sharded [N, ...] arrays. It is traced under the mesh and its
        logical-axis rules.
        """
        if key not in self._programs:
            fn = build()

            def counted(params, rows, scalars):
                self.trace_count += 1
                return fn(params, rows, scalars)

            batch, rep = parallel.batch_sharding(self.mesh), parallel.replicated(self.mesh)
            program = parallel.jit_with_rules(counted, self.mesh, self.rules, in_shardings=(None, batch, rep),
                                              out_shardings=batch)
            if self.executable_cache is not None:
                program = self.executable_cache.wrap(program, self.program_identity(key))
            self._programs[key] = program
        return self._programs[key]

    def program_identity(self, key: Hashable) -> dict[str, Any]:
        """What decides program `key` besides its inputs: the executable cache's key (its module doc)."""
        return {"pipeline": type(self).__name__, "key": repr(key),
                "scheduler": [type(self._scheduler).__name__, to_diffusers_config(self._scheduler)],
                "components": {name: repr(module) for name, (module, _) in sorted(self.components.items())},
                "config": self.config, "dtype": str(self.dtype), "rules": repr(self.rules),
                "mesh": [list(self.mesh.axis_names), list(self.mesh.devices.shape),
                         sorted({d.device_kind for d in self.mesh.devices.flat})]}

    def run_program(self, key: Hashable, build: Callable[[], Program], rows: Mapping[str, Any],
                    scalars: Mapping[str, Any]) -> Any:
        """Runs program `key` on host inputs and returns its outputs as host numpy arrays.

        rows: {name: [N, ...] host array}, all with the same N; padded here to a multiple of the batch
        shards and the padding dropped from the outputs. scalars: {name: host scalar}, replicated.
        """
        rows = {k: np.asarray(v) for k, v in rows.items()}
        sizes = {k: v.shape[0] for k, v in rows.items()}
        n = next(iter(sizes.values()))
        if any(s != n for s in sizes.values()):
            raise PipelineInputError(f"inputs disagree on the number of images: {sizes}")
        pad = -n % parallel.batch_divisor(self.mesh)
        rows = {k: _pad_rows(v, pad) for k, v in rows.items()}
        fn = self.program(key, build)
        out = fn(self.device_params(),
                 parallel.global_array(rows, parallel.batch_sharding(self.mesh)),
                 parallel.global_array({k: np.asarray(v) for k, v in scalars.items()},
                                       parallel.replicated(self.mesh)))
        if jax.process_count() > 1:  # rows live on several hosts: gather them everywhere
            out = multihost_utils.process_allgather(out, tiled=True)
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x))[:n], out)

    def progress_hook(self, total: int) -> Callable[[jax.Array, jax.Array, Any], jax.Array] | None:
        """An `after_step` hook that reports each step to `self.progress` through a host callback (None when
        no progress callback is set; part of the program key through `self.progress is not None`)."""
        if self.progress is None:
            return None

        def report(i: np.ndarray) -> None:
            if self.progress is not None:  # read at run time: a new callback needs no new program
                self.progress(int(i) + 1, total)

        def hook(x: jax.Array, i: jax.Array, state: Any) -> jax.Array:
            jax.debug.callback(report, i)
            return x

        return hook

    # -- hooks for pipelines that steer the denoiser (ControlNet); the defaults leave it as it is

    pass_step_index: ClassVar[bool] = False  # call the denoiser with step_index=i (diffax.sampling.sample)

    def extra_conditioning(self, rows: dict[str, Any], static: Any, cond: dict[str, Any],
                           uncond: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """More keyword inputs of the denoiser, beside the text conditioning (inside the program)."""
        return cond, uncond

    def wrap_denoiser(self, denoise: Callable[..., jax.Array], params: dict[str, Params], scalars: dict[str, Any],
                      static: Any) -> Callable[..., jax.Array]:
        """The denoiser the sampler calls, given the U-Net's (inside the program)."""
        return denoise

    def run_safety_checker(self, images: np.ndarray) -> tuple[np.ndarray, list[bool] | None]:
        """(images, nsfw flags): flagged images blacked out by the checker; (images, None) without one."""
        if self.safety_checker is None:
            return images, None
        return self.safety_checker(images)

    def finish(self, images: np.ndarray, output_type: str) -> PipelineOutput:
        """The call's output: latents as they are, decoded images through the safety checker and
        `postprocess`."""
        if output_type == "latent":
            return PipelineOutput(images, None)
        images, flags = self.run_safety_checker(images)
        return PipelineOutput(postprocess(images, output_type), flags)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={type(m).__name__}" for n, (m, _) in self.components.items())
        return f"{type(self).__name__}({parts}, scheduler={type(self.scheduler).__name__})"
