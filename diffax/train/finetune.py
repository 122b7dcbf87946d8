"""Fine-tuning from a pretrained model: full, LoRA or TuneQDM (scale-only), as the same train step with another
trainable tree and parameter view.

    python train.py --config=configs/digits.py --workdir=runs/lora \
        --config.train.init_from=runs/digits --config.train.finetune=lora --config.train.lora.rank=8
    python train.py --config=configs/digits.py --workdir=runs/q8 --config.train.init_from=runs/digits --quantize=int8

`train.init_from` is a training workdir (its newest good EMA weights) or a diffusers model / pipeline folder;
its weights are checked against the config's model block. Then, by `train.finetune`:

  full     every weight trains, starting from the pretrained ones: the plain train state.
  lora     the base is frozen; the trainable tree is a pair of low-rank factors per chosen kernel
           (`train.lora.targets`: 'attention', 'all' or a regular expression over '/'-joined kernel paths), and
           the model runs on base + alpha / rank * down @ up.
  tuneqdm  the base is quantized (`train.tuneqdm.bits`, `group_size`) and frozen; the trainable tree is one
           factor per output channel (or per tensor) and per timestep group on each quantized kernel's scale
           (`diffax.quant.tuneqdm`), and each batch draws its timesteps inside one group.
  controlnet  the U-Net is frozen; the trainable tree is a ControlNet made from it (or `train.controlnet_from`),
           and the model is the pair (diffax.train.controlnet); the result is `WORKDIR/export/controlnet`.

The TrainState's `params`, EMA and optimizer state hold the trainable tree only; the frozen base rides along in
`TrainState.frozen` (donated with the state, never saved). A checkpoint therefore holds the trainable tree,
and `WORKDIR/finetune_base.json` records what it applies to (the base's path and a checksum of its weights),
checked when the run resumes and when sample.py reads the workdir. At the end of the run the result is
exported for reuse on the shared base: `WORKDIR/export/pytorch_lora_weights.safetensors` (diffusers' LoRA
format: `unet.<module>.lora_A.weight` / `.lora_B.weight` and the LoraConfig in `lora_adapter_metadata`, which
diffusers' `load_lora_weights` and `diffax.convert.lora.read_lora` read) or
`WORKDIR/export/tuneqdm_scales.safetensors` (`diffax.quant.tuneqdm.save_scales`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax import parallel
from diffax.models import abstract_params, logical_specs
from diffax.models.registry import family_of
from diffax.quant.quantize import QuantizedParams, flatten, quantize_params, quantized_specs, selected, unflatten
from diffax.quant.tuneqdm import apply_scales, init_scales, load_scales, save_scales, timestep_group
from diffax.train.state import TrainState, init_train_state, place_train_state, train_state_shardings

MODES = ("full", "lora", "tuneqdm", "controlnet")
# Kernel-path patterns (re.search over 'down_blocks_1/attentions_0/to_q/kernel') for train.lora.targets.
LORA_PRESETS = {"attention": r"/(to_q|to_k|to_v|to_out_0)/kernel$", "all": r"/kernel$"}
BASE_FILE = "finetune_base.json"
EXPORT_DIR = "export"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name
SCALES_FILE = "tuneqdm_scales.safetensors"

Params = dict[str, Any]
# (frozen base, trainable tree, timesteps [B]) -> the parameter tree the model is applied to.
View = Callable[[Any, Any, jax.Array], Params]


class FinetuneError(ValueError):
    """A fine-tuning option, base checkpoint or workdir that does not fit; the message names the key or file."""


def fingerprint(params: Params) -> str:
    """A checksum of every weight of a parameter tree (hex), for recognising the same base later."""
    digest = hashlib.sha256()
    for path, leaf in sorted(flatten(params).items()):
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update("/".join(path).encode() + str(arr.dtype).encode() + str(arr.shape).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


def load_base(init_from: str, model_config: Any) -> Params:
    """The float weights to start from, as host numpy arrays: a training workdir's newest good EMA weights, or
    a diffusers model folder (a pipeline folder: its `unet/`); FinetuneError unless every key and shape is
    what `model_config` builds."""
    from diffax.train.checkpoint import restore_for_sampling
    path = Path(init_from)
    if (path / "checkpoints").is_dir():
        config, params, _ = restore_for_sampling(path)
        if config.train.get("finetune", "full") != "full":
            raise FinetuneError(f"train.init_from={init_from}: a {config.train.finetune} run holds no full weights; "
                                f"start from the run it was tuned from, or from a full run")
    elif path.is_dir():
        from diffax import convert
        sub = "unet" if (path / "unet").is_dir() else None
        _, params = convert.load(path, subfolder=sub)
        params = jax.device_get(params)
    else:
        raise FinetuneError(f"train.init_from={init_from}: neither a training workdir (with checkpoints/) nor a "
                            f"diffusers folder")
    want, have = flatten(abstract_params(model_config)), flatten(params)
    differ = ([f"{'/'.join(k)} missing" for k in want if k not in have]
              + [f"{'/'.join(k)} unexpected" for k in have if k not in want]
              + [f"{'/'.join(k)} {tuple(np.shape(have[k]))} vs {tuple(want[k].shape)}"
                 for k in want if k in have and tuple(np.shape(have[k])) != tuple(want[k].shape)])
    if differ:
        raise FinetuneError(f"train.init_from={init_from}: the weights do not match the config's model block "
                            f"({len(differ)} keys differ, weights vs config: {'; '.join(differ[:3])}"
                            f"{'; ...' if len(differ) > 3 else ''})")
    return jax.tree.map(np.asarray, params)


# ----------------------------------------------------------------------------- LoRA


def lora_targets(params: Params, targets: str) -> list[tuple[str, ...]]:
    """Paths of the kernels LoRA trains: `targets` a preset of LORA_PRESETS or a regular expression."""
    pattern = LORA_PRESETS.get(targets, targets)
    try:
        return selected(flatten(params), include=[pattern])
    except ValueError as e:
        raise FinetuneError(f"train.lora.targets={targets!r}: {e}") from None


def init_lora(params: Params, paths: list[tuple[str, ...]], rank: int, key: jax.Array) -> Params:
    """LoRA factors for `paths`, nested as the params with `lora_down` [..., I, r] and `lora_up` [r, O] beside
    each kernel: down uniform in +-1/sqrt(fan in) (peft's Kaiming-uniform), up zero, so step 0 is the base."""
    flat = flatten(params)
    out = {}
    for i, path in enumerate(paths):
        shape = flat[path].shape
        fan_in = math.prod(shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        out[path[:-1] + ("lora_down",)] = jax.random.uniform(jax.random.fold_in(key, i), (*shape[:-1], rank),
                                                             jnp.float32, -bound, bound)
        out[path[:-1] + ("lora_up",)] = jnp.zeros((rank, shape[-1]), jnp.float32)
    return unflatten(out)


def lora_view(base: Params, lora: Params, t: jax.Array, *, scale: float) -> Params:
    """base with kernel + scale * down @ up on every LoRA'd kernel, in fp32 cast back to the kernel's dtype."""
    del t
    flat, factors = dict(flatten(base)), flatten(lora)
    for path, down in factors.items():
        if path[-1] != "lora_down":
            continue
        kernel_path = path[:-1] + ("kernel",)
        up = factors[path[:-1] + ("lora_up",)]
        kernel = flat[kernel_path]
        flat[kernel_path] = (kernel.astype(jnp.float32) + scale * jnp.matmul(down, up)).astype(kernel.dtype)
    return unflatten(flat)


def merge_lora(base: Params, lora: Params, scale: float) -> Params:
    """The merged float weights (host numpy), what sampling a LoRA run uses."""
    return jax.device_get(jax.jit(functools.partial(lora_view, scale=scale))(base, lora, jnp.zeros((1,))))


def export_lora(file: str | Path, lora: Params, *, alpha: float, component: str = "unet") -> Path:
    """Writes LoRA factors in diffusers' format: `<component>.<torch module>.lora_A.weight` [r, I(, kh, kw)]
    and `.lora_B.weight` [O, r(, 1, 1)], with `lora_adapter_metadata` holding the peft LoraConfig (r,
    lora_alpha, target_modules)."""
    return export_lora_components(file, {component: lora}, alpha=alpha)


def export_lora_components(file: str | Path, components: dict[str, Params], *, alpha: float) -> Path:
    """`export_lora` of several components' factors into one file ({'unet': ..., 'text_encoder': ...}: the
    file diffusers' `load_lora_weights` reads into both)."""
    from diffax.convert.io import write_safetensors
    from diffax.convert.rules import path_to_key
    tensors, metadata = {}, {}
    for component, lora in components.items():
        flat = flatten(jax.device_get(lora))
        modules, rank = [], None
        for path, down in sorted(flat.items()):
            if path[-1] != "lora_down":
                continue
            up = np.asarray(flat[path[:-1] + ("lora_up",)], np.float32)
            down = np.asarray(down, np.float32)
            rank = down.shape[-1]
            module = path_to_key(path[:-1])
            # peft matches target_modules by name suffix: without `text_model.` a text encoder's names fit
            # transformers 4's CLIP (layers under text_model) and 5's (no text_model) alike
            modules.append(module.removeprefix("text_model.") if component.startswith("text_encoder") else module)
            if down.ndim == 4:  # [kh, kw, I, r] -> torch conv [r, I, kh, kw]; up [r, O] -> [O, r, 1, 1]
                a, b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
            else:  # [I, r] -> [r, I]; [r, O] -> [O, r]
                a, b = down.T, up.T
            tensors[f"{component}.{module}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{component}.{module}.lora_B.weight"] = np.ascontiguousarray(b)
        metadata.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                         f"{component}.target_modules": sorted(modules)})
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(file, tensors, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    return file


# ----------------------------------------------------------------------------- TuneQDM


def nest_scales(scales: dict[str, jax.Array]) -> Params:
    """tuneqdm's {'a/b/kernel': factors} as a nested tree (what a checkpoint stores)."""
    return unflatten({tuple(name.split("/")): v for name, v in scales.items()})


def flat_scales(tree: Params) -> dict[str, jax.Array]:
    """Inverse of `nest_scales`."""
    return {"/".join(path): v for path, v in flatten(tree).items()}


def tuneqdm_view(base: QuantizedParams, scales: Params, t: jax.Array, *, num_train_timesteps: int,
                 groups: int) -> Params:
    """The quantized base with the scale set of t's group (one group per call: the group of t[0])."""
    return apply_scales(base, flat_scales(scales), timestep_group(t[0], num_train_timesteps, groups))


def quantize_base(params: Params, tc: ml_collections.ConfigDict) -> QuantizedParams:
    """The shared quantized base of a TuneQDM run: `quantize_params` with train.tuneqdm's bits and group_size."""
    q = tc.tuneqdm
    return quantize_params(params, q.bits, q.group_size or None)


def _patterns(value: str) -> list[str] | None:
    return [p for p in value.split(",") if p] or None


# ----------------------------------------------------------------------------- the run's setup


@dataclasses.dataclass(eq=False)  # holds arrays: hashed by identity where a jit cache needs it
class Finetune:
    """What a fine-tuning run trains and how the model sees it."""
    mode: str
    frozen: Any                     # the frozen base: float params (lora), QuantizedParams (tuneqdm), None (full)
    trainable: Any                  # the trainable tree at step 0
    view: View | None               # (frozen, trainable, t) -> params; None: the trainable tree is the params
    frozen_specs: Any               # logical PartitionSpecs of `frozen` (None for full)
    timestep_groups: int            # > 1: each batch draws its timesteps inside one group
    base_record: dict[str, Any]     # what finetune_base.json holds

    def create_state(self, model: nn.Module, tx: Any, mesh: Any, rules: parallel.Rules
                     ) -> tuple[TrainState, Any]:
        """The step-0 TrainState on `mesh` and its shardings. Full fine-tuning lays the params out by the
        model's logical axes as a fresh run does; the LoRA factors and scales are small and replicated, and
        the frozen base follows the model's logical axes."""
        if self.mode == "full":
            _, shardings = train_state_shardings(model, tx, mesh, rules)
            return place_train_state(self.trainable, tx, shardings), shardings
        rep = parallel.replicated(mesh)
        frozen_shardings = parallel.logical_shardings(self.frozen_specs, mesh, rules,
                                                      shapes=_plain(self.frozen))
        if isinstance(self.frozen, QuantizedParams):
            frozen_shardings = self.frozen.replace(params=frozen_shardings)
        abstract = jax.eval_shape(lambda p: init_train_state(p, tx), self.trainable)
        shardings = jax.tree.map(lambda _: rep, abstract).replace(frozen=frozen_shardings)
        state = place_train_state(self.trainable, tx, shardings.replace(frozen=None))
        return state.replace(frozen=jax.device_put(self.frozen, frozen_shardings)), shardings

    def check_workdir(self, workdir: str | Path) -> None:
        """Record the base in `WORKDIR/finetune_base.json`, or check it against the one recorded there: a
        resumed run's trainable tree only means something on the base it was trained on."""
        check_base_record(workdir, self.base_record, write=True)

    def export(self, workdir: str | Path, trainable: Any, config: ml_collections.ConfigDict,
               model: nn.Module) -> Path | None:
        """Write the run's result for reuse on the shared base (None for full fine-tuning: the checkpoint is
        the result)."""
        out = Path(workdir) / EXPORT_DIR
        if self.mode == "lora":
            # diffusers' component name: what diffax.convert.lora and load_lora_weights read for a U-Net
            component = "unet" if family_of(model.config).class_name.startswith("UNet") else "transformer"
            return export_lora(out / LORA_FILE, trainable, alpha=float(config.train.lora.alpha), component=component)
        if self.mode == "tuneqdm":
            return save_scales(out / SCALES_FILE, flat_scales(jax.device_get(trainable)), self.frozen,
                               init_from=str(config.train.init_from), base=self.base_record["fingerprint"])
        return None


def _plain(frozen: Any) -> Any:
    return frozen.params if isinstance(frozen, QuantizedParams) else frozen


def check_base_record(workdir: str | Path, record: dict[str, Any], write: bool) -> None:
    """FinetuneError when `WORKDIR/finetune_base.json` records another base than `record`; with `write`, the
    record is written when the file is missing (process 0)."""
    path = Path(workdir) / BASE_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != record["fingerprint"]:
            raise FinetuneError(f"{path}: this run was tuned on the base {saved.get('init_from')} (checksum "
                                f"{saved.get('fingerprint')}), but train.init_from={record['init_from']} has "
                                f"checksum {record['fingerprint']}; point train.init_from at the original base, "
                                f"or train in a new --workdir")
    elif write and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")


def check_options(config: ml_collections.ConfigDict) -> None:
    """FinetuneError naming the first train.finetune / lora / tuneqdm key that no run can use."""
    tc = config.train
    if tc.finetune not in MODES:
        raise FinetuneError(f"config key 'train.finetune' must be one of {', '.join(MODES)}, got {tc.finetune!r}")
    if tc.finetune != "full" and not tc.init_from:
        raise FinetuneError(f"train.finetune={tc.finetune!r} tunes a pretrained model: set train.init_from to a "
                            f"training workdir or a diffusers folder")
    if tc.get("controlnet_from") and tc.finetune != "controlnet":
        raise FinetuneError(f"config key 'train.controlnet_from' is set but train.finetune is {tc.finetune!r}; "
                            f"set train.finetune='controlnet' to continue training that ControlNet")
    if tc.lora.rank < 1:
        raise FinetuneError(f"config key 'train.lora.rank' must be >= 1, got {tc.lora.rank}")
    if not tc.lora.alpha > 0:
        raise FinetuneError(f"config key 'train.lora.alpha' must be > 0, got {tc.lora.alpha}")
    q = tc.tuneqdm
    if q.bits not in (4, 8):
        raise FinetuneError(f"config key 'train.tuneqdm.bits' must be 8 or 4, got {q.bits}")
    if q.groups < 1 or q.groups > config.diffusion.num_train_timesteps:
        raise FinetuneError(f"config key 'train.tuneqdm.groups' must be in [1, diffusion.num_train_timesteps], "
                            f"got {q.groups}")
    if q.group_size and q.group_size < 2:
        raise FinetuneError(f"config key 'train.tuneqdm.group_size' must be 0 (per channel) or >= 2, got "
                            f"{q.group_size}")


def timestep_groups(config: ml_collections.ConfigDict) -> int:
    """The timestep groups a batch's draw is confined to: train.tuneqdm.groups for TuneQDM, else 1 (none)."""
    return config.train.tuneqdm.groups if config.train.get("finetune", "full") == "tuneqdm" else 1


def prepare(config: ml_collections.ConfigDict, model: nn.Module) -> Finetune | None:
    """The run's Finetune, or None for a plain run (train.finetune 'full' with no train.init_from), which then
    trains exactly as before."""
    check_options(config)
    tc = config.train
    if tc.finetune == "full" and not tc.init_from:
        return None
    base = load_base(tc.init_from, model.config)
    record = {"init_from": str(Path(tc.init_from).absolute()), "fingerprint": fingerprint(base), "mode": tc.finetune}
    if tc.finetune == "full":
        return Finetune("full", None, base, None, None, 1, record)
    if tc.finetune == "controlnet":
        from diffax.train import controlnet
        return controlnet.prepare(config, model, base, record)
    specs = logical_specs(model.config)
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    if tc.finetune == "lora":
        paths = lora_targets(base, tc.lora.targets)
        view = functools.partial(lora_view, scale=tc.lora.alpha / tc.lora.rank)
        return Finetune("lora", base, init_lora(base, paths, tc.lora.rank, key), view, specs, 1, record)
    q = tc.tuneqdm
    qp = quantize_base(base, tc)
    record.update(bits=q.bits, group_size=q.group_size)
    try:
        scales = init_scales(qp, q.groups, per_channel=q.per_channel, include=_patterns(q.include),
                             exclude=_patterns(q.exclude))
    except ValueError as e:
        raise FinetuneError(f"train.tuneqdm: {e}") from None
    view = functools.partial(tuneqdm_view, num_train_timesteps=config.diffusion.num_train_timesteps,
                             groups=q.groups)
    return Finetune("tuneqdm", qp, nest_scales(scales), view, quantized_specs(specs, qp), q.groups, record)


def sampling_params(config: ml_collections.ConfigDict, trainable: Any, model: nn.Module, workdir: str | Path
                    ) -> tuple[Any, Callable[[Any, jax.Array], Params] | None]:
    """(params, view) to sample a fine-tuning workdir with: for LoRA the merged float weights and no view;
    for TuneQDM (quantized base, scales) and the view that picks the scale set of each call's timestep
    (`GenerationPipeline.param_view`). The base is loaded from train.init_from and checked against the
    workdir's record."""
    tc = config.train
    if tc.finetune == "controlnet":
        from diffax.train import controlnet
        raise controlnet.sampling_error(workdir)
    if tc.get("text_encoder", "frozen") != "frozen":
        raise FinetuneError(f"{workdir}: the run trained its text encoder too (train.text_encoder="
                            f"{tc.text_encoder!r}); sample its export {Path(workdir) / EXPORT_DIR} on "
                            f"train.init_from with diffusers' or diffax.pipelines' load_lora_weights")
    base = load_base(tc.init_from, model.config)
    check_base_record(workdir, {"init_from": str(tc.init_from), "fingerprint": fingerprint(base)}, write=False)
    if tc.finetune == "lora":
        return merge_lora(base, trainable, tc.lora.alpha / tc.lora.rank), None
    qp = quantize_base(base, tc)
    view = functools.partial(tuneqdm_view, num_train_timesteps=config.diffusion.num_train_timesteps,
                             groups=tc.tuneqdm.groups)
    return (qp, trainable), lambda p, t: view(p[0], p[1], t)


def load_task_scales(path: str | Path, qp: QuantizedParams) -> Params:
    """A TuneQDM scale file (`export/tuneqdm_scales.safetensors`) checked against the quantized base and nested
    as a run's trainable tree."""
    return nest_scales(load_scales(path, qp).scales)
