"""Model size against sampling cost on the digits, after Mei et al. 2024 ("Bigger is not always better:
scaling properties of latent diffusion models").

    JAX_PLATFORMS=cpu python -m diffax.studies.scaling --config=configs/scaling_digits.py
    JAX_PLATFORMS=cpu python -m diffax.studies.scaling --config=configs/scaling_digits.py --quick

Every width in `config.widths` trains the same recipe on the same number of images
(`diffax.train.loop.train_and_evaluate`, one workdir per width, resumed or skipped when done), then samples
`num_samples` digits with each sampler at each step count (`GenerationPipeline`, one XLA program per step
count). A point records the sample quality (FID in the digits feature space, `diffax.evaluation.fid`, and
class accuracy, `diffax.evaluation.digits_classifier`) and the sampling cost per image:

    cost_flops = flops_per_eval * evals
    flops_per_eval = XLA's cost analysis of one jitted denoiser call on one image
    evals = loop steps * (2 under classifier-free guidance: the [uncond; cond] rows are two evaluations)

Each width's points are kept in WORKDIR/w<width>/scaling_points.json keyed by their settings, so a rerun
measures only what is missing. The study writes every point to `config.results` (a JSON list), plots
quality against cost to `config.plot` (with the points of `config.extra_results` when that file exists)
and prints, for each budget, the model with the best quality reachable within it (`winners_by_budget`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax import parallel
from diffax.cli import run_config_study
from diffax.evaluation.digits_classifier import class_accuracy
from diffax.evaluation.fid import digits_fid
from diffax.models import build_model
from diffax.pipelines.generation import GenerationPipeline
from diffax.schedulers.base import Scheduler
from diffax.schedulers.names import scheduler_for
from diffax.train import checkpoint, resume
from diffax.train.loop import train_and_evaluate
from diffax.train.metrics import compiled_flops

Point = dict[str, Any]
POINTS_FILE = "scaling_points.json"
# Whether a larger value of the metric is better.
HIGHER_IS_BETTER = {"fid": False, "accuracy": True}


def model_name(width: int) -> str:
    """The name a width's model carries in the results and its workdir: 'w<width>'."""
    return f"w{width}"


def width_config(config: ml_collections.ConfigDict, width: int) -> ml_collections.ConfigDict:
    """The train.py config of one width: `config.recipe` with blocks of width * channel_mults channels,
    trained for config.images / recipe.train.batch_size steps."""
    batch = config.recipe.train.batch_size
    if config.images % batch:
        raise ValueError(f"study config: key 'images' ({config.images}) must be a multiple of "
                         f"recipe.train.batch_size ({batch}), so every width sees the same images")
    c = ml_collections.ConfigDict(config.recipe.to_dict())
    c.model.block_out_channels = tuple(int(width * m) for m in config.channel_mults)
    c.train.steps = config.images // batch
    try:
        build_model(c.model)
    except ValueError as e:
        raise ValueError(f"study config: key 'widths': width {width} gives no valid model: {e}") from None
    return c


def count_params(params: Any) -> int:
    """Number of parameters (array elements) in a parameter tree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def flops_per_eval(model: Any, params: Any) -> float:
    """FLOPs of one denoiser evaluation on one image at the model's sample shape, from XLA's cost
    analysis of the jitted `model.apply` (what one sampler step costs per image without guidance)."""
    x = jnp.zeros((1, *model.config.sample_shape), jnp.float32)  # [1, H, W, C]
    cond = model.config.example_inputs(1)[2]
    denoise = jax.jit(lambda p, x, t, cond: model.apply({"params": p}, x, t, **cond))
    flops = compiled_flops(denoise, params, x, jnp.zeros((1,)), cond)
    if flops is None:
        raise ValueError(f"the {jax.default_backend()} backend reports no FLOPs in its cost analysis")
    return flops


def model_evals(scheduler: Scheduler, steps: int, sample_shape: Sequence[int], guided: bool) -> int:
    """Model evaluations per image of a whole sampling run: one per loop index of the scheduler's
    timestep table (which is `steps` long for single-evaluation samplers), twice that under guidance."""
    state = scheduler.init(steps, jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32))
    return len(state.timesteps) * (2 if guided else 1)


def train_width(config: ml_collections.ConfigDict, width: int) -> Path:
    """Train one width in WORKDIR/w<width> (resuming a stopped run); a finished run is left as it is, after
    checking that it was trained with this config. Returns the workdir."""
    workdir = Path(config.workdir) / model_name(width)
    wc = width_config(config, width)
    if (workdir / checkpoint.CHECKPOINT_DIR).is_dir():
        manager = checkpoint.make_manager(workdir, read_only=True)
        done = manager.latest_step()
        if done is not None:
            # The model and data keys must match the saved run's (ConfigChangeError names those that differ).
            resume.check_config(checkpoint.read_config(manager, done), wc, checkpoint.step_dir(manager, done))
            if done > wc.train.steps:
                raise ValueError(f"{workdir}: trained for {done} steps, more than the {wc.train.steps} that key "
                                 f"'images' gives; use another --config.workdir")
            if done == wc.train.steps:
                print(f"{model_name(width)}: trained ({done} steps), skipping", flush=True)
                return workdir
    print(f"{model_name(width)}: training {wc.train.steps} steps of {wc.train.batch_size} images, blocks "
          f"{wc.model.block_out_channels}", flush=True)
    train_and_evaluate(wc, workdir)
    return workdir


def _wanted(config: ml_collections.ConfigDict, width: int) -> list[tuple[str, dict[str, Any], int, str]]:
    """(sampler, options, steps, cache key) of every point the study measures for `width`. The key holds
    everything the point depends on (the width's whole train config included), so a changed setting
    measures it again."""
    trained = hashlib.sha256(width_config(config, width).to_json(sort_keys=True).encode()).hexdigest()[:16]
    wanted = []
    for sampler, spec in config.samplers.items():
        options = spec.options.to_dict() if hasattr(spec.options, "to_dict") else dict(spec.options)
        for steps in spec.steps:
            key = json.dumps([sampler, steps, options, config.num_samples, config.guidance_scale, config.seed,
                              trained], sort_keys=True)
            wanted.append((sampler, options, steps, key))
    return wanted


def _read_cache(config: ml_collections.ConfigDict, width: int) -> dict[str, Point]:
    path = Path(config.workdir) / model_name(width) / POINTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def is_measured(config: ml_collections.ConfigDict, width: int) -> bool:
    """Whether every point of `width` is in its cache (then it needs neither training nor its weights)."""
    cache = _read_cache(config, width)
    return all(key in cache for *_, key in _wanted(config, width))


def evaluate_width(config: ml_collections.ConfigDict, width: int) -> list[Point]:
    """Every (sampler, steps) point of one trained width, measured or read from its cache."""
    workdir = Path(config.workdir) / model_name(width)
    cache, wanted = _read_cache(config, width), _wanted(config, width)
    if all(key in cache for *_, key in wanted):
        return [cache[key] for *_, key in wanted]
    recipe, params, step = checkpoint.restore_for_sampling(workdir)
    model = build_model(recipe.model)
    mesh, rules = parallel.mesh_from_config(recipe.mesh)
    guided = config.guidance_scale != 1.0
    labels = np.arange(config.num_samples) % 10  # [N]: every class in turn
    n_params, flops = count_params(params), flops_per_eval(model, params)
    for sampler, options, steps, key in wanted:
        if key in cache:
            continue
        scheduler = scheduler_for(sampler, recipe.diffusion, **options)
        # Each step count is a program of its own (GenerationPipeline compiles one per count).
        pipe = GenerationPipeline(model, scheduler, mesh, rules)
        images = pipe(params, jax.random.key(config.seed), labels=labels, num_inference_steps=steps,
                      guidance_scale=config.guidance_scale if guided else None)  # [N, S, S, C] uint8
        evals = model_evals(scheduler, steps, model.config.sample_shape, guided)
        p = cache[key] = dict(
            model=model_name(width), width=width, params=n_params, train_images=config.images, train_steps=step,
            flops_per_eval=flops, sampler=sampler, sampler_options=options, steps=steps,
            guidance_scale=config.guidance_scale if guided else None, evals=evals, cost_flops=flops * evals,
            num_samples=config.num_samples, fid=digits_fid(images), accuracy=class_accuracy(images, labels))
        (workdir / POINTS_FILE).write_text(json.dumps(cache, indent=1))
        print(f"{p['model']} {sampler} {steps} steps: {evals} evals, {p['cost_flops'] / 1e9:.3f} GFLOP/image, "
              f"FID {p['fid']:.2f}, accuracy {p['accuracy']:.1%}", flush=True)
    return [cache[key] for *_, key in wanted]


def winners_by_budget(points: Sequence[Point], metric: str = "fid") -> list[dict[str, Any]]:
    """For each budget (every distinct cost among `points`, ascending), the model whose best point at a
    cost within the budget has the best `metric` ('fid': lowest, 'accuracy': highest).

    Returns one row per budget: {'budget', 'model', 'params', metric, 'sampler', 'steps'}, the point that
    achieves it, and 'competing': how many models have a point within the budget (a model with none does
    not compete; a winner with no competitor wins by default).
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"metric must be one of {sorted(HIGHER_IS_BETTER)}, got {metric!r}")
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    rows = []
    for budget in sorted({p["cost_flops"] for p in points}):
        within = [p for p in points if p["cost_flops"] <= budget and p[metric] is not None]
        best = min(within, key=lambda p: (sign * p[metric], p["params"]))
        rows.append(dict(budget=budget, model=best["model"], params=best["params"], sampler=best["sampler"],
                         steps=best["steps"], competing=len({p["model"] for p in within}), **{metric: best[metric]}))
    return rows


def budget_ranges(rows: Sequence[dict[str, Any]]) -> list[tuple[float, float, str, int, int]]:
    """`winners_by_budget` rows merged into runs of the same winner: (first budget, last budget, model,
    models competing at the first budget, at the last)."""
    ranges: list[tuple[float, float, str, int, int]] = []
    for row in rows:
        if ranges and ranges[-1][2] == row["model"]:
            ranges[-1] = (ranges[-1][0], row["budget"], row["model"], ranges[-1][3], row["competing"])
        else:
            ranges.append((row["budget"], row["budget"], row["model"], row["competing"], row["competing"]))
    return ranges


def read_points(path: str | Path) -> list[Point]:
    """Points from a results JSON list; each needs model, sampler, steps, cost_flops, fid and accuracy."""
    points = json.loads(Path(path).read_text())
    if not isinstance(points, list):
        raise ValueError(f"{path}: expected a JSON list of points, got {type(points).__name__}")
    for i, p in enumerate(points):
        missing = [k for k in ("model", "sampler", "steps", "cost_flops", "fid", "accuracy") if k not in p]
        if missing:
            raise ValueError(f"{path}: point {i} has no key(s) {missing}")
    return points


def plot(points: Sequence[Point], path: str | Path, extra: Sequence[Point] = ()) -> None:
    """FID and class accuracy against sampling GFLOPs per image (log scale): one colour per model
    (by size), one marker per sampler, a line through each (model, sampler) over its step counts; the
    `extra` points (e.g. distilled models) black-edged in grey shades per model, stars where distilled
    (a point's `distilled` key, default true) and crosses where not."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models = sorted({p["model"]: p["params"] for p in points}.items(), key=lambda kv: kv[1])
    colours = {m: plt.cm.viridis(i / max(len(models) - 1, 1)) for i, (m, _) in enumerate(models)}
    samplers = list(dict.fromkeys(p["sampler"] for p in points))
    markers = dict(zip(samplers, "os^Dvp"))
    # Other studies' models (e.g. distilled students and their teacher): grey shades, stars where distilled.
    extra_models = list(dict.fromkeys(p["model"] for p in extra))
    extra_colours = {m: colours.get(m, str(0.95 - 0.9 * i / max(len(extra_models) - 1, 1)))
                     for i, m in enumerate(extra_models)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for ax, metric, label in ((axes[0], "fid", "FID (digit features), lower is better"),
                              (axes[1], "accuracy", "class accuracy, higher is better")):
        for model, _ in models:
            for sampler in samplers:
                run = sorted((p for p in points if p["model"] == model and p["sampler"] == sampler),
                             key=lambda p: p["cost_flops"])
                if run:
                    ax.plot([p["cost_flops"] / 1e9 for p in run], [p[metric] for p in run], marker=markers[sampler],
                            color=colours[model], linewidth=1, alpha=0.85, markersize=5)
        for model in extra_models:
            run = sorted((p for p in extra if p["model"] == model), key=lambda p: p["cost_flops"])
            ax.plot([p["cost_flops"] / 1e9 for p in run], [p[metric] for p in run], color="black", linewidth=0.6,
                    linestyle=":")
            for p in run:
                ax.plot(p["cost_flops"] / 1e9, p[metric], marker="*" if p.get("distilled", True) else "X",
                        markersize=12, linestyle="none", color=extra_colours[model], markeredgecolor="black")
        ax.set_xscale("log")
        ax.set_xlabel("sampling cost per image, GFLOPs (XLA cost analysis x model evaluations)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    handles = [Line2D([], [], color=colours[m], linewidth=3, label=f"{m} ({n / 1e6:.2f}M params)") for m, n in models]
    handles += [Line2D([], [], color="gray", marker=markers[s], linestyle="none", label=s) for s in samplers]
    for model in extra_models:
        first = next(p for p in extra if p["model"] == model)
        handles.append(Line2D([], [], color=extra_colours[model], marker="*" if first.get("distilled", True) else "X",
                              markersize=10, markeredgecolor="black", linestyle="none",
                              label=f"{model} ({first['params'] / 1e6:.2f}M)" if "params" in first else model))
    fig.legend(handles=handles, fontsize=8, loc="center right")
    images = {p.get("train_images") for p in points}
    fig.suptitle(f"Sample quality against sampling cost: {len(models)} digits U-Net widths, "
                 f"{'/'.join(str(i) for i in sorted(images, key=str))} training images each")
    fig.tight_layout(rect=(0, 0, 0.84, 1))  # the legend takes the right edge
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(points: Sequence[Point]) -> str:
    """Markdown tables: FID / class accuracy of every (sampler, steps) row for every model (columns by
    size, headed by parameters and GFLOPs per evaluation), then, per metric, which model gives the best
    value within each range of budgets."""
    models = sorted({p["model"]: p for p in points}.values(), key=lambda p: p["params"])
    rows = list(dict.fromkeys((p["sampler"], p["steps"], p["evals"]) for p in points))
    by_key = {(p["model"], p["sampler"], p["steps"]): p for p in points}
    lines = ["| sampler | steps | evals | " + " | ".join(
                 f"{m['model']} ({m['params'] / 1e3:.0f}k, {m['flops_per_eval'] / 1e6:.1f} MFLOP)" for m in models)
             + " |", "|---|---:|---:|" + "---:|" * len(models)]
    for sampler, steps, evals in rows:
        cells = []
        for m in models:
            p = by_key.get((m["model"], sampler, steps))
            cells.append("-" if p is None else f"{p['fid']:.1f} / {p['accuracy']:.1%}")
        lines.append(f"| {sampler} | {steps} | {evals} | " + " | ".join(cells) + " |")
    for metric in HIGHER_IS_BETTER:
        lines += ["", f"| budget, GFLOP per image | models with a point within | best {metric} from | "
                      f"at the top of the range |", "|---|---:|---|---|"]
        rows_m = winners_by_budget(points, metric)
        for lo, hi, model, first, last in budget_ranges(rows_m):
            top = [r for r in rows_m if r["budget"] == hi][0]
            lines.append(f"| {lo / 1e9:.3f} .. {hi / 1e9:.3f} | {first if first == last else f'{first}-{last}'} | "
                         f"{model} | {top['sampler']} {top['steps']} steps, {metric} {top[metric]:.4g} |")
    return "\n".join(lines)


def run_study(config: ml_collections.ConfigDict) -> list[Point]:
    """Train and evaluate every width, write the results JSON and the plot; returns the points."""
    for width in config.widths:
        width_config(config, width)  # every width's config is checked before the first one trains
    points = []
    for width in config.widths:
        if not is_measured(config, width):
            train_width(config, width)
        points += evaluate_width(config, width)
    points.sort(key=lambda p: (p["params"], p["sampler"], p["steps"]))
    Path(config.results).parent.mkdir(parents=True, exist_ok=True)
    Path(config.results).write_text(json.dumps(points, indent=1) + "\n")
    extra = read_points(config.extra_results) if config.extra_results and Path(config.extra_results).exists() else []
    plot(points, config.plot, extra)
    print(summary(points), flush=True)
    print(f"wrote {config.results} and {config.plot}", flush=True)
    return points


def quick_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` shrunk to a few CPU-minutes, mostly compilation (two tiny two-level U-Nets trained for two
    steps, one step count per sampler, 20 samples), writing everything under WORKDIR/quick: for tests and
    a first look."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.recipe.model.down_block_types = ("DownBlock2D", "AttnDownBlock2D")
    c.recipe.model.up_block_types = ("AttnUpBlock2D", "UpBlock2D")
    c.recipe.model.attention_head_dim = 8
    c.recipe.model.norm_num_groups = 4
    c.recipe.train.batch_size = 16
    c.recipe.train.warmup_steps = 1
    c.recipe.train.log_every = 2
    c.recipe.train.checkpoint_every = 2
    c.channel_mults = (1, 2)
    c.widths = (4, 8)
    c.images = 32
    c.num_samples = 20
    for spec in c.samplers.values():
        spec.steps = (2,)
    c.workdir = str(Path(config.workdir) / "quick")
    c.results = str(Path(c.workdir) / "scaling_digits.json")
    c.plot = str(Path(c.workdir) / "scaling.png")
    return c


if __name__ == "__main__":
    run_config_study(run_study, quick_config, "configs/scaling_digits.py",
                     "Two tiny models, a few steps, everything under WORKDIR/quick: a smoke run.")
