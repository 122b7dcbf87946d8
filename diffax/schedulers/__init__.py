"""diffax samplers, and config interop with diffusers' `scheduler_config.json`.

    sched = from_diffusers_config("stable-diffusion/scheduler")            # folder, .json path or dict
    sched = from_diffusers_config(cfg, scheduler_class=DDIMScheduler)      # swap, as X.from_config(cfg)
    cfg = to_diffusers_config(sched)                                       # diffusers' from_config reads it

Every concrete sampler is a frozen dataclass whose fields are its diffusers config keys, so interop is a
field-by-field copy, built generically over every `Scheduler` subclass that names a `diffusers_class`.
Bookkeeping keys are dropped as diffusers drops them: `_class_name`, `_diffusers_version` and every other
key starting with "_", keys listed in `_use_default_values` (their class defaults are used, as diffusers
does), and config keys of other diffusers schedulers (a config saved after `X.from_config(other.config)`
carries them; diffusers ignores them for the class). Any other key is an error naming it, the class and
the file. diffax-only fields (`diffax_extras`, e.g. DDIM's eta) travel under the "_diffax" key, which
diffusers keeps in its config without reading it, so both directions round-trip. At the top level an extra
is read only if it is no diffusers scheduler's key (DDIM's `eta`); one that is (rescale_betas_zero_snr
for a sampler whose diffusers class lacks it) is dropped there, as diffusers drops it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from diffax.schedulers.base import (DiscreteScheduler, Scheduler, SchedulerState, StepOutput,
                                    add_noise_alpha_bar, predict_x0_eps, threshold_sample)
from diffax.schedulers.ddim import DDIMScheduler, DDIMState
from diffax.schedulers.ddpm import DDPMScheduler, DDPMState
from diffax.schedulers.deis import DEISMultistepScheduler
from diffax.schedulers.dpm_solver_multistep import DPMSolverMultistepScheduler
from diffax.schedulers.dpm_solver_singlestep import DPMSolverSinglestepScheduler
from diffax.schedulers.edm import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from diffax.schedulers.euler import EulerDiscreteScheduler
from diffax.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from diffax.schedulers.flow_match import FlowMatchEulerDiscreteScheduler
from diffax.schedulers.heun import HeunDiscreteScheduler
from diffax.schedulers.k_diffusion import DPMPP2MSDEScheduler, DPMPP2SAncestralScheduler, DPMPP3MSDEScheduler
from diffax.schedulers.k_dpm2 import KDPM2DiscreteScheduler
from diffax.schedulers.k_dpm2_ancestral import KDPM2AncestralDiscreteScheduler
from diffax.schedulers.lcm import LCMScheduler
from diffax.schedulers.lms import LMSDiscreteScheduler
from diffax.schedulers.pndm import PNDMScheduler
from diffax.schedulers.score_sde import (ScoreSdeVeScheduler, ScoreSdeVpPredictorCorrectorScheduler,
                                         ScoreSdeVpProbabilityFlowScheduler, ScoreSdeVpScheduler)
from diffax.schedulers.unipc import UniPCMultistepScheduler

CONFIG_NAME = "scheduler_config.json"
EXTRAS_KEY = "_diffax"

# Config keys of diffusers' schedulers (0.42: DDPM, DDIM, DDIMInverse, DDPM/DDIMParallel, PNDM, LMS, Euler,
# EulerAncestral, Heun, KDPM2, KDPM2Ancestral, DPMSolverMultistep / Singlestep / SDE, CosineDPMSolver, DEIS,
# UniPC, LCM, TCD, EDMEuler, EDMDPMSolver, FlowMatchEuler / Heun, ScoreSdeVe / Vp, SASolver). A key of this set
# that a class does not take is one diffusers ignores for it. tests/test_scheduler_config.py checks the set
# against the installed diffusers.
DIFFUSERS_SCHEDULER_KEYS = frozenset({
    "algorithm_type", "base_image_seq_len", "base_shift", "beta_end", "beta_max", "beta_min", "beta_schedule",
    "beta_start",
    "clip_sample", "clip_sample_range", "correct_steps", "corrector_order", "disable_corrector",
    "dynamic_thresholding_ratio", "euler_at_final", "final_sigmas_type", "flow_shift", "interpolation_type",
    "invert_sigmas", "lambda_min_clipped", "lower_order_final", "max_image_seq_len", "max_shift",
    "num_train_timesteps", "original_inference_steps", "predict_x0", "prediction_type", "predictor_order",
    "rescale_betas_zero_snr", "rho", "sample_max_value", "sampling_eps", "set_alpha_to_one", "shift",
    "shift_terminal", "sigma_data", "sigma_max", "sigma_min", "sigma_schedule", "skip_prk_steps", "snr",
    "solver_order", "solver_p", "solver_type", "steps_offset", "stochastic_sampling", "thresholding",
    "time_shift_type", "timestep_scaling", "timestep_spacing", "timestep_type", "trained_betas",
    "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas",
    "use_karras_sigmas", "use_lu_lambdas", "variance_type",
})


def _concrete_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        if sub.__dict__.get("diffusers_class"):
            out.append(sub)
        out.extend(_concrete_subclasses(sub))
    return out


def scheduler_classes() -> dict[str, type[Scheduler]]:
    """diffusers class name -> diffax class, for every imported Scheduler subclass that names one."""
    registry: dict[str, type[Scheduler]] = {}
    for cls in _concrete_subclasses(Scheduler):
        name = cls.diffusers_class
        if name in registry and registry[name] is not cls:
            raise TypeError(f"two diffax schedulers claim diffusers class {name!r}: "
                            f"{registry[name].__module__}.{registry[name].__qualname__} and "
                            f"{cls.__module__}.{cls.__qualname__}")
        registry[name] = cls
    return registry


def _extras(cls: type) -> tuple[str, ...]:
    return tuple(getattr(cls, "diffax_extras", ()))


def _load(config: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """(config dict, source path or None) from a dict, a JSON file or a folder holding scheduler_config.json."""
    if isinstance(config, Mapping):
        return dict(config), None
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no scheduler config at {path}")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg, path


def _to_python(value: Any) -> Any:
    """JSON lists -> tuples, so the scheduler stays hashable (a static jit argument)."""
    if isinstance(value, (list, tuple)):
        return tuple(_to_python(v) for v in value)
    return value


def from_diffusers_config(config: Mapping[str, Any] | str | os.PathLike,
                          scheduler_class: type[Scheduler] | str | None = None) -> Scheduler:
    """The diffax scheduler for a diffusers scheduler config.

    config: a config dict (e.g. `pipe.scheduler.config`), a scheduler_config.json path, or the folder
      holding it. Its `_class_name` picks the class unless `scheduler_class` is given.
    scheduler_class: a diffax Scheduler subclass or a diffusers class name, to load the config into another
      sampler (like diffusers' `OtherScheduler.from_config(cfg)`).
    Raises ValueError naming the class / key / file for an unknown class or an unknown or unsupported key.
    """
    cfg, path = _load(config)
    where = f" in {path}" if path else ""
    registry = scheduler_classes()
    if scheduler_class is None:
        name = cfg.get("_class_name")
        if name is None:
            raise ValueError(f"scheduler config{where} has no '_class_name'; pass scheduler_class")
    elif isinstance(scheduler_class, str):
        name = scheduler_class
    else:
        name = scheduler_class.diffusers_class
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown scheduler class {name!r}{where}; diffax has {sorted(registry)}")
    cls = registry[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    extras = _extras(cls)
    defaulted = set(cfg.get("_use_default_values", ()))

    kwargs = {}
    for key, value in cfg.items():
        if key in extras and key in DIFFUSERS_SCHEDULER_KEYS:
            continue  # another scheduler's diffusers key, ignored by diffusers here; diffax reads it from "_diffax"
        if key in fields:
            if key not in defaulted:
                kwargs[key] = _to_python(value)
        elif key.startswith("_") or key in DIFFUSERS_SCHEDULER_KEYS:
            continue
        else:
            raise ValueError(f"{name}: config key {key!r}{where} is not an option of diffax's {name} "
                             f"(nor of any diffusers scheduler); expected keys: {sorted(fields)}")
    stored_extras = cfg.get(EXTRAS_KEY) or {}
    if not isinstance(stored_extras, Mapping):
        raise ValueError(f"{name}: config key {EXTRAS_KEY!r}{where} must be an object, got {stored_extras!r}")
    for key, value in stored_extras.items():
        if key not in extras:
            raise ValueError(f"{name}: config key {EXTRAS_KEY}.{key}{where} is not a diffax option of {name} "
                             f"(expected one of {list(extras)})")
        kwargs.setdefault(key, _to_python(value))  # a top-level key wins
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{e}{where}") from e


def to_diffusers_config(scheduler: Scheduler) -> dict[str, Any]:
    """The scheduler as a diffusers config dict (JSON-ready; `_class_name` set) that diffusers'
    `from_config` loads into the same sampler. diffax-only fields go under "_diffax"."""
    cls = type(scheduler)
    if not cls.__dict__.get("diffusers_class"):
        raise ValueError(f"{cls.__qualname__} has no diffusers counterpart (diffusers_class is empty)")
    extras = _extras(cls)
    cfg: dict[str, Any] = {"_class_name": cls.diffusers_class}
    stored_extras = {}
    for f in dataclasses.fields(scheduler):
        value = getattr(scheduler, f.name)
        value = list(value) if isinstance(value, tuple) else value
        if f.name in extras:
            stored_extras[f.name] = value
        else:
            cfg[f.name] = value
    if stored_extras:
        cfg[EXTRAS_KEY] = stored_extras
    return cfg


__all__ = [
    "CONFIG_NAME", "DDIMScheduler", "DDIMState", "DDPMScheduler", "DDPMState", "DEISMultistepScheduler",
    "DIFFUSERS_SCHEDULER_KEYS", "DPMPP2MSDEScheduler", "DPMPP2SAncestralScheduler", "DPMPP3MSDEScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DiscreteScheduler",
    "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler", "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "LCMScheduler", "LMSDiscreteScheduler",
    "PNDMScheduler", "Scheduler", "SchedulerState", "ScoreSdeVeScheduler", "ScoreSdeVpPredictorCorrectorScheduler",
    "ScoreSdeVpProbabilityFlowScheduler", "ScoreSdeVpScheduler", "StepOutput", "UniPCMultistepScheduler",
    "add_noise_alpha_bar", "from_diffusers_config", "predict_x0_eps", "scheduler_classes", "threshold_sample",
    "to_diffusers_config",
]
