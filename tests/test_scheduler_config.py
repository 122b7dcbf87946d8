"""Config interop: diffax.schedulers.from_diffusers_config / to_diffusers_config against diffusers' own
ConfigMixin (from_config, save_config, extract_init_dict), for every registered diffax scheduler."""
from __future__ import annotations

import dataclasses
import gc
import inspect
import json

import diffusers
import pytest

from diffax import schedulers
from diffax.schedulers import (DDIMScheduler, DDPMScheduler, from_diffusers_config, scheduler_classes,
                               to_diffusers_config)

# The diffusers classes DIFFUSERS_SCHEDULER_KEYS is documented to cover.
COVERED = ["DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDIMParallelScheduler",
           "DDPMParallelScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
           "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
           "DPMSolverSDEScheduler", "CosineDPMSolverMultistepScheduler", "DEISMultistepScheduler",
           "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler", "EDMEulerScheduler",
           "EDMDPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
           "ScoreSdeVeScheduler", "ScoreSdeVpScheduler", "SASolverScheduler"]

# Shaped like the scheduler configs shipped with Stable Diffusion 1.5 and SDXL base: saved after
# `X.from_config(other.config)`, so they carry other schedulers' keys.
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
              "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}

NON_DEFAULT = [
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", clip_sample=False,
                  prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1,
                  rescale_betas_zero_snr=True, thresholding=True, sample_max_value=2.0),
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                  steps_offset=1, clip_sample=False, eta=0.3, use_clipped_model_output=True,
                  trained_betas=(0.001, 0.002, 0.003), num_train_timesteps=3),
]


def diffusers_class(name: str) -> type:
    """A diffusers scheduler class by name (deprecated ones live only in diffusers.schedulers)."""
    return getattr(diffusers, name, None) or getattr(diffusers.schedulers, name)


def diffusers_init_params(name: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(diffusers_class(name).__init__).parameters
    return {k: p for k, p in params.items() if k not in ("self", "args", "kwargs")}


def as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def fields_of(sched) -> dict:
    return {f.name: getattr(sched, f.name) for f in dataclasses.fields(sched)}


def test_registry_has_ddpm_and_ddim():
    registry = scheduler_classes()
    assert registry["DDPMScheduler"] is DDPMScheduler and registry["DDIMScheduler"] is DDIMScheduler


@pytest.mark.parametrize("name", sorted(scheduler_classes()))
def test_fields_are_diffusers_keys_with_diffusers_defaults(name):
    """Every registered class: its fields are diffusers' config keys (plus its declared diffax_extras), with
    diffusers' defaults. Registry interop relies on this. rescale_betas_zero_snr, inherited from the shared
    DiscreteScheduler by classes whose diffusers counterpart lacks it, must either reject True or be
    declared in diffax_extras (so to_diffusers_config stores it under "_diffax")."""
    cls = scheduler_classes()[name]
    ours = {f.name: f.default for f in dataclasses.fields(cls)}
    extras = set(getattr(cls, "diffax_extras", ()))
    theirs = diffusers_init_params(name)
    # The one shared DiscreteScheduler field some diffusers classes (PNDM, DEIS, DPM-Solver singlestep) lack.
    inherited = {"rescale_betas_zero_snr"} & set(ours) - set(theirs)
    missing = sorted(set(theirs) - set(ours))
    unknown = sorted(set(ours) - extras - set(theirs) - inherited)
    assert not missing and not unknown, f"missing in diffax: {missing}; not in diffusers: {unknown}"
    for key, param in theirs.items():
        assert as_tuple(ours[key]) == as_tuple(param.default), (key, ours[key], param.default)
    if inherited - extras:  # not a declared diffax extra: diffusers would silently drop a True
        assert ours["rescale_betas_zero_snr"] is False
        with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
            cls(rescale_betas_zero_snr=True)


def test_known_keys_cover_what_diffusers_ignores():
    """DIFFUSERS_SCHEDULER_KEYS is the union of the covered classes' config keys, and holds every key
    diffusers silently drops for a registered class (the config keys of its compatible classes)."""
    union = set()
    for name in COVERED:
        union |= set(diffusers_init_params(name)) - {"tau_func"}  # SASolver's callable is never serialized
    assert schedulers.DIFFUSERS_SCHEDULER_KEYS == union
    for name in scheduler_classes():
        cls = diffusers_class(name)
        compatible = set()
        for other in cls._get_compatibles():
            compatible |= set(inspect.signature(other.__init__).parameters)
        dropped = compatible - set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
        assert dropped <= schedulers.DIFFUSERS_SCHEDULER_KEYS, sorted(dropped - schedulers.DIFFUSERS_SCHEDULER_KEYS)


@pytest.mark.parametrize("sched", NON_DEFAULT, ids=lambda s: type(s).__name__)
def test_round_trip_through_diffusers(sched, tmp_path):
    cfg = to_diffusers_config(sched)
    json.dumps(cfg)  # JSON-ready
    cls = diffusers_class(cfg["_class_name"])
    # diffusers reads every key: nothing is reported unused (it would log "... will be ignored").
    init, unused, _ = cls.extract_init_dict(dict(cfg))
    assert unused == {}
    theirs = cls.from_config(cfg)
    for key, value in init.items():
        want = list(value) if isinstance(value, tuple) else value
        got = theirs.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == want, key
    # diffusers keeps "_diffax" in its config and writes it out, so the extras survive both ways.
    theirs.save_config(tmp_path)
    assert from_diffusers_config(tmp_path) == sched
    assert from_diffusers_config(tmp_path / "scheduler_config.json") == sched
    assert from_diffusers_config(theirs.config) == sched
    hash(from_diffusers_config(theirs.config))  # hashable: a static jit argument


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_diffusers_saved_config_loads(name, tmp_path):
    theirs = getattr(diffusers, name)(beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                                      prediction_type="v_prediction", timestep_spacing="trailing")
    theirs.save_config(tmp_path)
    ours = from_diffusers_config(tmp_path)
    assert type(ours).__name__ == name
    for key, value in fields_of(ours).items():
        if key not in getattr(type(ours), "diffax_extras", ()):
            assert value == theirs.config[key], key


@pytest.mark.parametrize("cfg", [SD15_PNDM, SDXL_EULER], ids=["sd15_pndm", "sdxl_euler"])
@pytest.mark.parametrize("target", [DDIMScheduler, DDPMScheduler])
def test_swap_class_like_diffusers_from_config(cfg, target):
    """from_diffusers_config(cfg, scheduler_class=X) == diffusers' X.from_config(cfg): foreign keys
    (skip_prk_steps, interpolation_type, ...) are dropped, shared ones carried over."""
    ours = from_diffusers_config(cfg, scheduler_class=target)
    theirs = getattr(diffusers, target.diffusers_class).from_config(cfg)
    assert type(ours) is target
    for key, value in fields_of(ours).items():
        if key in theirs.config:
            assert value == theirs.config[key], key
    assert ours.steps_offset == 1 and ours.beta_schedule == "scaled_linear"
    assert from_diffusers_config(cfg, scheduler_class=target.diffusers_class) == ours


def test_top_level_diffax_extra():
    """A diffax-only option may also be written at the top level; "_diffax" does not override it."""
    cfg = {"_class_name": "DDIMScheduler", "eta": 0.4, "_diffax": {"eta": 0.9, "use_clipped_model_output": True}}
    ours = from_diffusers_config(cfg)
    assert ours.eta == 0.4 and ours.use_clipped_model_output is True


def test_use_default_values_like_diffusers():
    """Keys listed in `_use_default_values` take the class default, as in diffusers."""
    cfg = {"_class_name": "DDIMScheduler", "clip_sample": False, "steps_offset": 1,
           "_use_default_values": ["clip_sample"]}
    ours = from_diffusers_config(cfg)
    theirs = diffusers.DDIMScheduler.from_config(cfg)
    assert ours.clip_sample is True and theirs.config.clip_sample is True and ours.steps_offset == 1


def write(tmp_path, cfg) -> str:
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(cfg) if isinstance(cfg, dict) else cfg)
    return str(path)


def test_errors_name_class_key_and_file(tmp_path):
    path = write(tmp_path, {"_class_name": "DDIMScheduler", "beta_schedul": "linear"})
    with pytest.raises(ValueError, match=r"DDIMScheduler.*'beta_schedul'.*scheduler_config\.json"):
        from_diffusers_config(path)
    path = write(tmp_path, {"_class_name": "NotAScheduler"})
    with pytest.raises(ValueError, match=r"unknown scheduler class 'NotAScheduler'.*scheduler_config\.json"):
        from_diffusers_config(path)
    with pytest.raises(ValueError, match="unknown scheduler class 'Nope'"):
        from_diffusers_config({"_class_name": "DDIMScheduler"}, scheduler_class="Nope")
    path = write(tmp_path, {"beta_start": 0.001})
    with pytest.raises(ValueError, match=r"scheduler_config\.json has no '_class_name'"):
        from_diffusers_config(path)
    path = write(tmp_path, "{not json")
    with pytest.raises(ValueError, match=r"scheduler_config\.json: not valid JSON"):
        from_diffusers_config(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        from_diffusers_config(tmp_path / "missing")
    path = write(tmp_path, {"_class_name": "DDPMScheduler", "variance_type": "learned_log"})
    with pytest.raises(ValueError, match=r"variance_type.*learned_log.*scheduler_config\.json"):
        from_diffusers_config(path)
    with pytest.raises(ValueError, match=r"_diffax\.gamma"):
        from_diffusers_config({"_class_name": "DDIMScheduler", "_diffax": {"gamma": 1.0}})
    with pytest.raises(ValueError, match="diffusers_class"):
        to_diffusers_config(schedulers.DiscreteScheduler())


def test_duplicate_diffusers_class_is_an_error():
    @dataclasses.dataclass(frozen=True)
    class Impostor(DDIMScheduler):
        diffusers_class = "DDIMScheduler"

    try:
        with pytest.raises(TypeError, match="two diffax schedulers claim diffusers class 'DDIMScheduler'"):
            scheduler_classes()
    finally:
        del Impostor
        gc.collect()
    assert scheduler_classes()["DDIMScheduler"] is DDIMScheduler
