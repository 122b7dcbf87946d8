"""Short sampler names for command lines and configs (`--sampler=dpm++2m_karras`), as the web UIs name them.

    scheduler_for("euler_a", config.diffusion)   # EulerAncestralDiscreteScheduler on the run's schedule

Each name is a diffax scheduler class (named like its diffusers counterpart where it has one) plus options; the
run's noise schedule (the `diffusion` config block: num_train_timesteps, beta_*, prediction_type,
rescale_betas_zero_snr) fills the rest.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Mapping

from diffax.schedulers.base import Scheduler

# name -> (diffax class, options). The docs table (docs/samplers.md) lists the same names.
SAMPLER_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": False}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m_sde_karras": ("DPMSolverMultistepScheduler",
                           {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    # k-diffusion's 3M SDE: diffusers' order-3 sde-dpmsolver++ update differs from it (see docs/samplers.md).
    "dpm++3m_sde_karras": ("DPMPP3MSDEScheduler", {"sigma_schedule": "karras"}),
    "dpm++2s_a_karras": ("DPMPP2SAncestralScheduler", {"sigma_schedule": "karras"}),
    "dpm_single": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "k_dpm++2m_sde_karras": ("DPMPP2MSDEScheduler", {"sigma_schedule": "karras"}),
    "edm_euler": ("EDMEulerScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}

SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                 "rescale_betas_zero_snr")


def scheduler_for(name: str, schedule: Mapping[str, Any] | Any, **options: Any) -> Scheduler:
    """The sampler called `name` (a short name above or a diffax class name) on the noise schedule in
    `schedule` (a mapping or config block with the SCHEDULE_KEYS), with extra `options` on top."""
    if name in SAMPLER_NAMES:
        class_name, preset = SAMPLER_NAMES[name]
    else:
        class_name, preset = name, {}
    import diffax.schedulers as schedulers  # the package imports every sampler module

    cls = getattr(schedulers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)) or class_name.startswith("_"):
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLER_NAMES)} "
                         f"or a class from diffax.schedulers.__all__")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: schedule[k] for k in SCHEDULE_KEYS if k in schedule and k in fields}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"{class_name} has no option(s) {sorted(unknown)}")
    return cls(**{**kwargs, **preset, **options})


def parse_options(items: list[str]) -> dict[str, Any]:
    """Command-line sampler options, e.g. ['lambda_min_clipped=-5.1', 'timestep_spacing=leading'], as a dict.

    Values are Python literals (numbers, True/False, None, quoted strings); anything else is a bare string.
    """
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"sampler option {item!r} is not key=value")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        options[key.strip()] = value
    return options
