"""Fine-tuning comparison on digits transfer tasks: full fine-tuning, LoRA and TuneQDM, same steps each.

    JAX_PLATFORMS=cpu python -m diffax.studies.finetune_digits                        # classes, pixel U-Net
    JAX_PLATFORMS=cpu python -m diffax.studies.finetune_digits --task=style           # restyled digits
    JAX_PLATFORMS=cpu python -m diffax.studies.finetune_digits --family=ldm [--task=style]
    JAX_PLATFORMS=cpu python -m diffax.studies.finetune_digits --quick --workdir=/tmp/ft --nowrite_docs

Two tasks (`--task`):

  classes   pretrain on digits 0-4 (`data.classes`), adapt to 5-9: concepts the model has never drawn.
  style     pretrain on all ten digits as they are, adapt to all ten restyled (`restyle`: strokes thickened by
            a 3x3 max filter): concepts the model has, in a new style. "Style adopted" is the samples' FID to
            the restyled real digits against their FID to the original ones.

Two model families (`--family`):

  unet      the pixel-space digits U-Net of configs/digits.py, class-conditional.
  ldm       the latent-diffusion recipe of configs/ldm_digits.py: a text-conditioned U-Net on the latents of
            `make demo-ldm`'s VAE, prompted "a handwritten seven" through its frozen text encoder, trained
            from its latent cache (split by caption class). The study reads runs/ldm_digits/ (the VAE, text
            encoder and cache; run `make demo-ldm` first) and never writes there; for the style task it encodes
            the restyled digits into its own cache with the same VAE and text encoder, and starts from the
            demo's U-Net (trained on all ten digits) when there is one.

Each mode of `train.finetune` (diffax.train.finetune) adapts the pretrained model: full fine-tuning, LoRA
(rank 8 on every Dense / Conv) and TuneQDM (int8 per-channel base, K = 4 timestep groups). "No tuning" is the
pretrained model as it is (fp32, and quantized to int8 as TuneQDM's base). Each training runs `train.py` in its
own process, so its peak resident memory is its own. Per mode:

  trainable     parameters the optimizer updates (Adam keeps two moments of each)
  step MiB      the train step's XLA buffer assignment: arguments + outputs + temporaries - aliased (donated)
  RSS MiB       the training process's peak resident memory (getrusage), which includes the runtime itself
  saved         bytes of what a task keeps: full: the weights (safetensors, fp32); LoRA: the exported
                pytorch_lora_weights.safetensors; TuneQDM: the scale file (the int8 base is shared)
  wall s        the training process, start to exit (start-up and compilation included)
  accuracy      class accuracy of `samples` images of the task's classes (diffax.evaluation.digits_classifier)
  FID           Frechet distance of their digits features to the task's real digits (diffax.evaluation.fid);
                style: also to the original (unrestyled) digits

Workdirs are kept under --workdir; a mode whose results file is there is not retrained.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from diffax import parallel
from diffax.cli import run_reporting_errors
from diffax.data.digits import NUMBER_WORDS, load_digits_arrays
from diffax.evaluation.digits_classifier import class_accuracy
from diffax.evaluation.digits_features import digits_features
from diffax.evaluation.fid import feature_stats, frechet_distance
from diffax.models import build_model
from diffax.pipelines.generation import GenerationPipeline, to_uint8
from diffax.quant import quantize_params
from diffax.schedulers.names import scheduler_for
from diffax.train import finetune
from diffax.train.checkpoint import restore_for_sampling
from diffax.train.loop import jit_train_step, make_objective
from diffax.train.state import make_optimizer

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("classes", "style")
FAMILIES = ("unet", "ldm")
ALL = tuple(range(10))
# (pretraining classes, adaptation classes) per task.
SPLITS = {"classes": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)), "style": (ALL, ALL)}
STYLE_FILTER = 3  # side of the max filter that thickens the strokes, in pixels at the 16x16 training size
IMAGE_SIZE = 16   # both recipes' image size (the LDM's VAE maps 16x16x3 to 8x8x4 latents)
CONFIG_FILES = {"unet": "configs/digits.py", "ldm": "configs/ldm_digits.py"}
LDM_ROOT = ROOT / "runs" / "ldm_digits"  # make demo-ldm's stages: vae/export, text/, cache/, unet/
# (pretrain steps, adapt steps) per family when the flags leave them unset; the LDM's style task starts from
# the demo's U-Net where there is one, so it pretrains nothing.
DEFAULT_STEPS = {"unet": (500, 200), "ldm": (300, 100)}
QUICK_MODELS = {  # the tiny U-Nets of the tests
    "unet": {"model.block_out_channels": (8, 16), "model.down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
             "model.up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "model.attention_head_dim": 8,
             "model.norm_num_groups": 4},
    "ldm": {"model.block_out_channels": (8, 16), "model.attention_head_dim": 4, "model.norm_num_groups": 4},
}
MODES = ("full", "lora", "tuneqdm")
# Per mode: train block overrides. Adapters and scales take a larger learning rate than the whole network.
MODE_OPTIONS = {
    "full": {"learning_rate": 1e-3},
    "lora": {"learning_rate": 3e-3, "lora.rank": 8, "lora.alpha": 8.0, "lora.targets": "all"},
    "tuneqdm": {"learning_rate": 3e-3, "tuneqdm.bits": 8, "tuneqdm.groups": 4},
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when run as a program: the studies import side by side."""
    flags.DEFINE_enum("task", "classes", TASKS, "classes: pretrain on 0-4, adapt to 5-9; style: pretrain on "
                      "the digits, adapt to the restyled digits (thicker strokes).")
    flags.DEFINE_enum("family", "unet", FAMILIES, "unet: the pixel-space digits U-Net; ldm: the latent-diffusion "
                      "digits recipe (run `make demo-ldm` first).")
    flags.DEFINE_string("workdir", "", "Workdirs of the pretraining and of each mode; default runs/<study name>.")
    flags.DEFINE_bool("quick", False, "A tiny U-Net and a few steps: checks the whole study in minutes.")
    flags.DEFINE_integer("pretrain_steps", 0, "Pretraining steps; 0: the family's default (unet 500, ldm 300).")
    flags.DEFINE_integer("adapt_steps", 0, "Steps of each mode; 0: the family's default (unet 200, ldm 100).")
    flags.DEFINE_integer("batch_size", 32, "Batch size of every run.")
    flags.DEFINE_integer("samples", 200, "Samples of the task's classes per mode for accuracy and FID.")
    flags.DEFINE_bool("write_docs", True, "Write the table into docs/efficiency.md, the plot to docs/images/ "
                      "and the rows to docs/results/.")


class StudyError(ValueError):
    """A study input that cannot work: an unknown task or family, or a missing stage of `make demo-ldm`."""


def task_split(task: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(pretraining classes, adaptation classes) of a task."""
    if task not in SPLITS:
        raise StudyError(f"--task must be one of {TASKS}, got {task!r}")
    return SPLITS[task]


def restyle(images: np.ndarray) -> np.ndarray:
    """The style task's digits: uint8 [N, S, S, C] with the strokes thickened by a STYLE_FILTER-pixel max
    filter (grey dilation) over each image's plane. At 16x16 the digits classifier still reads 88% of the
    restyled real digits right (99% of the originals), and their FID to the originals is ~200, against ~6
    between two halves of either set: far enough apart to tell which style a model draws."""
    from scipy import ndimage
    images = np.asarray(images)
    if images.ndim != 4:
        raise StudyError(f"restyle: images must be [N, S, S, C], got shape {images.shape}")
    return ndimage.grey_dilation(images, size=(1, STYLE_FILTER, STYLE_FILTER, 1))


def write_restyled_folder(folder: Path, captions: str | None = None) -> Path:
    """The restyled digits as an image folder `folder/<label>/<index>.png` (16x16 grey), which
    `data.source='folder'` reads with labels 0-9; with a caption template, a metadata.jsonl of each image's
    caption ("a handwritten seven") for the latent cache."""
    if (folder / "done").exists():
        return folder
    from PIL import Image
    images, labels = load_digits_arrays(IMAGE_SIZE, 1)
    thick = restyle(images)
    lines = []
    for i, (image, label) in enumerate(zip(thick, labels)):
        name = f"{label}/{i:04d}.png"
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / name)
        if captions:
            lines.append(json.dumps({"file_name": name, "text": captions.format(NUMBER_WORDS[label])}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "done").touch()
    return folder


def check_ldm_stages() -> None:
    """The parts of `make demo-ldm` the LDM study reuses, or a StudyError naming the missing one."""
    for part in ("vae/export", "text/text_encoder", "text/tokenizer", "cache/manifest.json"):
        if not (LDM_ROOT / part).exists():
            raise StudyError(f"{LDM_ROOT / part}: missing; --family=ldm reuses the VAE, text encoder and latent "
                             f"cache of `make demo-ldm`: run it first")


@dataclasses.dataclass(frozen=True)
class Study:
    """One study: a task on a model family, and where it works."""
    task: str
    family: str
    workdir: Path
    quick: bool = False
    batch_size: int = 32

    def __post_init__(self):
        task_split(self.task)
        if self.family not in FAMILIES:
            raise StudyError(f"--family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def name(self) -> str:
        """finetune_digits[_ldm][_style]: the name of the docs' table, plot and results file."""
        return "finetune_digits" + ("_ldm" if self.family == "ldm" else "") + (
            "_style" if self.task == "style" else "")

    @property
    def style_data(self) -> dict[str, Any]:
        """The data block overrides that train on the restyled digits."""
        if self.family == "unet":
            return {"data.source": "folder", "data.path": str(write_restyled_folder(self.workdir / "digits_thick"))}
        return {"data.path": str(self.style_cache())}

    def style_cache(self) -> Path:
        """The restyled digits through the demo's VAE and text encoder: a latent cache in the workdir."""
        out = (self.workdir / "cache_thick").absolute()
        if (out / "manifest.json").exists():
            return out
        from configs.ldm_digits import get_config
        from diffax.data.cache import build_cache
        c = get_config("cache")
        folder = write_restyled_folder(self.workdir / "digits_thick_captioned", c.data.caption_template)
        c.data.source, c.data.path, c.cache.out = "folder", str(folder.absolute()), str(out)
        for key in ("vae", "text_encoder", "tokenizer"):
            c.cache[key] = str(ROOT / c.cache[key])
        build_cache(c)
        return out


def settings(study: Study, mode: str | None, base: Path | None, steps: int) -> dict[str, Any]:
    """{dotted config key: value} over the family's recipe of the pretraining (mode None) or of one mode."""
    out = {"train.batch_size": study.batch_size, "train.log_every": 50, "train.sample_every": 0,
           "train.keep_checkpoints": 1, "train.steps": steps, "train.checkpoint_every": steps}
    if study.family == "ldm":  # the demo's latent cache, wherever the study runs from
        out["data.path"] = str(LDM_ROOT / "cache")
    if study.quick:
        out.update(QUICK_MODELS[study.family])
    pretrain, adapt = task_split(study.task)
    if mode is None:
        return {**out, **({"data.classes": pretrain} if pretrain != ALL else {})}
    if adapt != ALL:
        out["data.classes"] = adapt
    if study.task == "style":
        out.update(study.style_data)
    out.update({"train.init_from": str(base), "train.finetune": mode, "train.warmup_steps": max(1, steps // 10)})
    return {**out, **{f"train.{k}": v for k, v in MODE_OPTIONS[mode].items()}}


def overrides(values: dict[str, Any]) -> list[str]:
    """`settings` as train.py flags (tuples as Python literals, as config_flags parses them)."""
    return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in values.items()]


def make_config(family: str, values: dict[str, Any]) -> ml_collections.ConfigDict:
    """The family's recipe with `settings` applied: the config train.py runs with those flags."""
    if family == "ldm":
        from configs.ldm_digits import get_config  # the recipes live beside train.py
    else:
        from configs.digits import get_config
    c = get_config()
    for key, value in values.items():
        *blocks, last = key.split(".")
        node = c
        for b in blocks:
            node = node[b]
        node[last] = value
    return c


def run_train(family: str, workdir: Path, overrides: list[str]) -> dict[str, float]:
    """train.py in a child process: {'wall_s', 'rss_mib'} (its own peak resident memory)."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / CONFIG_FILES[family]}",
           f"--workdir={workdir}", *overrides]
    start = time.perf_counter()
    with open(workdir.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {child.returncode}); see {workdir.with_suffix('.log')}")
    return {"wall_s": time.perf_counter() - start, "rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB


def step_memory(config: ml_collections.ConfigDict) -> tuple[int, float]:
    """(trainable parameters, the train step's XLA buffer assignment in MiB) of a fine-tuning config."""
    mesh, rules = parallel.mesh_from_config(config.mesh)
    model = build_model(config.model)
    tuning = finetune.prepare(config, model)
    tx = make_optimizer(config.train)
    state, shardings = tuning.create_state(model, tx, mesh, rules)
    b, shape = config.train.batch_size, model.config.sample_shape
    if config.data.source == "latent_cache":  # text-conditioned: the cache's embeddings and empty prompt
        from diffax.data.latent_cache import LatentCacheSource
        null = LatentCacheSource(config.data.path).null_cond
        cond = {"encoder_hidden_states": jnp.zeros((b, *null["encoder_hidden_states"].shape))}
    else:
        null, cond = None, {"class_labels": jnp.zeros((b,), jnp.int32)}
    step_fn = jit_train_step(model, tx, make_objective(config, model, null), mesh, rules, shardings, config.train,
                             view=tuning.view)
    batch = {"image": jnp.zeros((b, *shape)), "cond": cond}
    memory = step_fn.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
             - memory.alias_size_in_bytes)
    trainable = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
    return trainable, total / 2**20


def saved_bytes(mode: str, workdir: Path, params: Any) -> int:
    """Bytes of what one task keeps (see the module docstring)."""
    if mode == "full":
        from diffax.convert.io import write_safetensors
        from diffax.quant.quantize import flatten
        path = workdir / finetune.EXPORT_DIR / "weights.safetensors"
        path.parent.mkdir(exist_ok=True)
        write_safetensors(path, {"/".join(k): np.asarray(v) for k, v in flatten(params).items()})
        return path.stat().st_size
    name = finetune.LORA_FILE if mode == "lora" else finetune.SCALES_FILE
    return (workdir / finetune.EXPORT_DIR / name).stat().st_size


@functools.lru_cache(maxsize=2)
def caption_embeddings(cache: str) -> tuple[np.ndarray, np.ndarray]:
    """(each digit's caption embedding [10, L, D], the empty prompt's [L, D]) from a latent cache: the
    encoder is frozen, so every record of a digit holds the same embedding."""
    from diffax.data.latent_cache import LatentCacheSource
    source = LatentCacheSource(cache)
    by_label: dict[int, np.ndarray] = {}
    for i in range(len(source.stored)):
        record = source.stored[i]
        by_label.setdefault(int(record["label"]), np.asarray(record["encoder_hidden_states"], np.float32))
        if len(by_label) == len(ALL):
            break
    return np.stack([by_label[d] for d in ALL]), source.null_cond["encoder_hidden_states"]


def ldm_images(config: ml_collections.ConfigDict, params: Any, view: Any, labels: np.ndarray, steps: int
               ) -> np.ndarray:
    """uint8 [N, 16, 16, 3] samples of the latent model, prompted with each label's caption: DDIM with
    classifier-free guidance against the empty prompt, then the VAE's decoder. `view` (params, t) -> the
    weights at timestep t (a TuneQDM scale set), as the text-to-image pipeline cannot take one."""
    from diffax.data.encoders import load_vae
    from diffax.sampling import sample
    from diffax.train.latent_diffusion import SD_SCHEDULER_FIXES
    unet = build_model(config.model)
    vae, vae_params = load_vae(str(ROOT / config.cache.vae))
    embeddings, empty = caption_embeddings(str(LDM_ROOT / "cache"))
    cond = {"encoder_hidden_states": jnp.asarray(embeddings[labels])}                     # [N, L, D]
    uncond = {"encoder_hidden_states": jnp.broadcast_to(empty, cond["encoder_hidden_states"].shape)}
    # The exported pipeline's schedule: x0 of latents is not clipped to [-1, 1] (see SD_SCHEDULER_FIXES).
    scheduler = scheduler_for("ddim", config.diffusion)
    fields = {f.name for f in dataclasses.fields(scheduler)}
    scheduler = dataclasses.replace(scheduler, **{k: v for k, v in SD_SCHEDULER_FIXES.items() if k in fields})

    @jax.jit
    def generate(params, vae_params, cond, uncond, key):
        noise = jax.random.normal(key, (len(labels), *unet.config.sample_shape))  # [N, 8, 8, 4]

        def denoise(x, t, **model_cond):
            t = jnp.full((x.shape[0],), t)
            weights = params if view is None else view(params, t)
            return unet.apply({"params": weights}, x, t, **model_cond)

        z = sample(scheduler, denoise, noise, num_inference_steps=steps, cond=cond, uncond=uncond,
                   guidance_scale=config.sample.guidance_scale)
        return to_uint8(vae.apply({"params": vae_params}, vae.config.unscale_latents(z), method="decode"))

    return np.asarray(generate(params, vae_params, cond, uncond, jax.random.key(1)))


@functools.lru_cache(maxsize=4)
def real_stats(classes: tuple[int, ...], restyled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of the real digits of `classes` (restyled or as they are)."""
    real, labels = load_digits_arrays(IMAGE_SIZE, 1)
    real = real[np.isin(labels, classes)]
    return feature_stats(digits_features(restyle(real) if restyled else real))


def evaluate(study: Study, workdir: Path, count: int, untuned: str | None = None) -> dict[str, float]:
    """Class accuracy and FID of `count` samples of the task's classes from a workdir: its own weights, or
    with `untuned` ('float' / 'int8') the pretrained model as it is. FID is to the task's real digits
    (restyled for the style task, which also has `fid_source`: to the original digits)."""
    config, params, _ = restore_for_sampling(workdir)
    model = build_model(config.model)
    view = None
    if untuned == "int8":
        params = quantize_params(params, 8).params
    elif untuned is None and config.train.finetune != "full":
        params, view = finetune.sampling_params(config, params, model, workdir)
    _, adapt = task_split(study.task)
    labels = np.resize(np.asarray(adapt), count)
    steps = 2 if study.quick else 25
    if study.family == "ldm":
        images = ldm_images(config, params, view, labels, steps)
    else:
        pipe = GenerationPipeline(model, scheduler_for("ddim", config.diffusion), parallel.make_mesh({"data": -1}),
                                  param_view=view)
        images = pipe(params, jax.random.key(1), labels=labels, num_inference_steps=steps,
                      guidance_scale=config.sample.guidance_scale)
    stats = feature_stats(digits_features(images))
    style = study.task == "style"
    out = {"accuracy": class_accuracy(images, labels), "fid": frechet_distance(stats, real_stats(adapt, style))}
    if style:
        out["fid_source"] = frechet_distance(stats, real_stats(adapt, False))
    return out


def table(rows: list[dict[str, Any]], task: str) -> str:
    """The Markdown table of the study's rows."""
    style = task == "style"
    target = "FID (restyled) | FID (original)" if style else "FID (5-9)"
    head = (f"| mode | trainable params | train step MiB (XLA) | peak RSS MiB | saved per task | wall s | "
            f"class accuracy | {target} |\n|---|---:|---:|---:|---:|---:|---:|---:|{'---:|' if style else ''}\n")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"| {r['mode']} | {fmt(r.get('trainable'), ',')} | {fmt(r.get('step_mib'), '.1f')} | "
             f"{fmt(r.get('rss_mib'), '.0f')} | {_size(r.get('saved_bytes'))} | {fmt(r.get('wall_s'), '.0f')} | "
             f"{r['accuracy']:.1%} | {r['fid']:.2f} |" + (f" {r['fid_source']:.2f} |" if style else "")
             for r in rows]
    return head + "\n".join(lines) + "\n"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy, FID (style: to both styles), saved bytes and step memory per mode, one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["mode"] for r in rows]
    style = "fid_source" in rows[0]
    panels = [("class accuracy", [r["accuracy"] for r in rows], False),
              ("FID to the restyled digits" if style else "FID to real 5-9 (lower is better)",
               [r["fid"] for r in rows], False)]
    if style:
        panels.append(("FID to the original digits", [r["fid_source"] for r in rows], False))
    panels += [("saved per task (bytes, log)", [r.get("saved_bytes") or 0 for r in rows], True),
               ("train step MiB (XLA)", [r.get("step_mib") or 0 for r in rows], False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#937860"][:len(rows)]
    for ax, (name, values, log) in zip(axes, panels):
        ax.bar(names, values, color=colors)
        ax.set_title(name, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markers(name: str) -> tuple[str, str]:
    """The docs markers between which a study writes its table."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_doc(doc: Path, name: str, text: str) -> None:
    """Replace the text between the study's markers in `doc`."""
    begin, end = markers(name)
    content = doc.read_text()
    if begin not in content or end not in content:
        raise StudyError(f"{doc}: no {begin} ... {end} markers to write the table at")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    doc.write_text(pattern.sub(lambda _: f"{begin}\n{text}{end}", content))


def pretrain(study: Study, steps: int) -> tuple[Path, str]:
    """The pretrained model's workdir, trained here unless it is there; and how it was made (for the docs).
    The LDM's style task copies the demo's U-Net (all ten digits, 1000 steps of 64) where there is one."""
    base = (study.workdir / "pretrain").absolute()
    pre, _ = task_split(study.task)
    digits = "all ten digits" if pre == ALL else f"digits {pre[0]}-{pre[-1]}"
    demo = LDM_ROOT / "unet"
    if study.family == "ldm" and study.task == "style" and not study.quick and (demo / "checkpoints").is_dir():
        if not (base / "checkpoints").is_dir():
            shutil.copytree(demo, base)  # the demo's run stays as it is
        saved, _, step = restore_for_sampling(base)
        return base, f"the U-Net of `make demo-ldm` ({step} steps of {saved.train.batch_size} on {digits})"
    if not (base / "checkpoints").is_dir():
        print(f"pretraining on {digits} for {steps} steps", flush=True)
        info = run_train(study.family, base, overrides(settings(study, None, None, steps)))
        print(f"  {info['wall_s']:.0f} s", flush=True)
    return base, f"{steps} steps of {study.batch_size} on {digits}"


def run_study(study: Study, pretrain_steps: int, adapt_steps: int, samples: int) -> tuple[list[dict], str]:
    """Pretrain, adapt with each mode, measure: one row per mode (no tuning first), and how the base was
    made."""
    if study.family == "ldm":
        check_ldm_stages()
    study.workdir.mkdir(parents=True, exist_ok=True)
    base, made = pretrain(study, pretrain_steps)
    rows = []
    for untuned, name in (("float", "pretrained, no tuning (fp32)"), ("int8", "no tuning (int8 base)")):
        results = study.workdir / f"untuned_{untuned}.json"
        if not results.exists():
            results.write_text(json.dumps({"mode": name, **evaluate(study, base, samples, untuned)}, indent=1))
        rows.append(json.loads(results.read_text()))
    _, adapt = task_split(study.task)
    for mode in MODES:
        run = study.workdir / mode
        results = study.workdir / f"{mode}.json"
        if results.exists():
            rows.append(json.loads(results.read_text()))
            continue
        print(f"{mode}: adapting ({study.task} task, {study.family}) for {adapt_steps} steps", flush=True)
        values = settings(study, mode, base, adapt_steps)
        info = run_train(study.family, run, overrides(values))
        trainable, step_mib = step_memory(make_config(study.family, values))
        _, ema, _ = restore_for_sampling(run)
        row = {"mode": mode, "trainable": trainable, "step_mib": step_mib, **info,
               "saved_bytes": saved_bytes(mode, run, ema), **evaluate(study, run, samples)}
        results.write_text(json.dumps(row, indent=1))
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows, made


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    family, task = FLAGS.family, FLAGS.task
    name = Study(task=task, family=family, workdir=Path()).name
    study = Study(task=task, family=family, workdir=Path(FLAGS.workdir or f"runs/{name}"), quick=FLAGS.quick,
                  batch_size=FLAGS.batch_size)
    default_pre, default_adapt = DEFAULT_STEPS[family]
    pre, adapt = FLAGS.pretrain_steps or default_pre, FLAGS.adapt_steps or default_adapt
    samples = FLAGS.samples
    if study.quick:
        pre, adapt, samples = 4, 3, 20
    rows, made = run_study(study, pre, adapt, samples)
    text = table(rows, task)
    what = {"classes": "pretrained on digits 0-4, adapted to 5-9",
            "style": "pretrained on the digits, adapted to thick-stroke digits"}[task]
    title = f"digits {'latent diffusion' if family == 'ldm' else 'U-Net'}: {what} (same steps per mode)"
    (study.workdir / "table.md").write_text(text)
    plot(rows, study.workdir / f"{study.name}.png", title)
    print(text, flush=True)
    if FLAGS.write_docs:
        plot(rows, ROOT / "docs" / "images" / f"{study.name}.png", title)
        sampler = "DDIM, 25 steps, guidance 3" + (", VAE-decoded" if family == "ldm" else "")
        header = (f"Base: {made}; then {adapt} steps of {study.batch_size} per mode; {samples} samples "
                  f"({sampler}) per row.\n\n")
        results = {"task": task, "family": family, "base": made, "adapt_steps": adapt,
                   "batch_size": study.batch_size, "samples": samples, "rows": rows}
        (ROOT / "docs" / "results").mkdir(exist_ok=True)
        (ROOT / "docs" / "results" / f"{study.name}.json").write_text(json.dumps(results, indent=1) + "\n")
        write_doc(ROOT / "docs" / "efficiency.md", study.name, header + text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # configs/ beside train.py
    define_flags()
    app.run(run_reporting_errors(main))
