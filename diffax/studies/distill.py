"""Few-step distillation of the digits U-Net: progressive distillation and an LCM-LoRA, against the teacher.

    JAX_PLATFORMS=cpu python -m diffax.studies.distill --config=configs/distill_digits.py
    JAX_PLATFORMS=cpu python -m diffax.studies.distill --config=configs/distill_digits.py --quick

Every stage is a `diffax.train.loop.train_and_evaluate` run in its own workdir under `config.workdir`
(resumed when stopped, skipped when done), with the objectives of `diffax.train.distill`:

  teacher/           the digits recipe (`config.teacher`, a train.py config; v-prediction on a 1024-step
                     schedule, so every power-of-two grid of DDIM timesteps nests in the next)
  progressive/<N>/   a student sampling in N DDIM steps, initialised from the (N*2)-step model and trained
                     on two of its DDIM steps per step of its own; N halves from teacher_steps / 2 to
                     final_steps. The first round's teacher is guided (guidance_scale), so every student
                     samples with one model evaluation per step.
  lcm_lora/          LoRA factors on the teacher, trained by latent consistency distillation on the
                     original_steps grid, exported as export/pytorch_lora_weights.safetensors (diffusers'
                     format), sampled by LCMScheduler through `GenerationPipeline.with_lora`.

Then each model samples `num_samples` digits (classes in turn) and a point records its quality (FID in the
digits feature space, `diffax.evaluation.fid`, and class accuracy, `diffax.evaluation.digits_classifier`)
and its cost per image: cost_flops = flops_per_eval (XLA's cost analysis of one denoiser call on one image)
x evals (loop steps, x2 when classifier-free guidance runs the [uncond; cond] rows). The points go to
`config.results`, the list the scaling study's plot draws its distilled points from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from diffax import parallel
from diffax.cli import run_config_study
from diffax.evaluation.digits_classifier import class_accuracy
from diffax.evaluation.fid import digits_fid
from diffax.models import build_model
from diffax.pipelines.generation import GenerationPipeline
from diffax.schedulers.names import scheduler_for
from diffax.studies.scaling import count_params, flops_per_eval
from diffax.train import checkpoint, distill, finetune
from diffax.train.loop import train_and_evaluate

Point = dict[str, Any]
LORA_FILE = Path("export") / finetune.LORA_FILE


def _finished(workdir: Path, steps: int) -> bool:
    if not (workdir / checkpoint.CHECKPOINT_DIR).is_dir():
        return False
    done = checkpoint.make_manager(workdir, read_only=True).latest_step()
    return done is not None and done >= steps


def stage_config(teacher: ml_collections.ConfigDict, stage: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
    """The train.py config of a distillation stage: the teacher's, with the stage's optimisation keys."""
    c = ml_collections.ConfigDict(teacher.to_dict())
    c.train.steps = stage.train_steps
    c.train.batch_size = stage.batch_size
    c.train.learning_rate = stage.learning_rate
    c.train.warmup_steps = stage.warmup_steps
    c.train.ema_decay = stage.ema_decay
    c.train.checkpoint_every = stage.train_steps
    c.train.log_every = max(1, min(c.train.log_every, stage.train_steps))
    c.train.sample_every = 0
    c.train.keep_checkpoints = 1
    return c


def train_teacher(config: ml_collections.ConfigDict) -> Any:
    """Train (or resume, or reuse) the teacher in WORKDIR/teacher; its EMA weights as host arrays."""
    workdir = Path(config.workdir) / "teacher"
    if not _finished(workdir, config.teacher.train.steps):
        print(f"teacher: training {config.teacher.train.steps} steps in {workdir}", flush=True)
        train_and_evaluate(config.teacher, workdir)
    return checkpoint.restore_for_sampling(workdir)[1]


def student_steps(config: ml_collections.ConfigDict) -> list[int]:
    """The step counts of the progressive students: teacher_steps / 2, / 4, ..., final_steps."""
    p = config.progressive
    n, out = p.teacher_steps // 2, []
    while n >= p.final_steps:
        out.append(n)
        n //= 2
    if not out or out[-1] != p.final_steps or p.teacher_steps & (p.teacher_steps - 1):
        raise ValueError(f"study config: keys 'progressive.teacher_steps' ({p.teacher_steps}) and "
                         f"'progressive.final_steps' ({p.final_steps}) must be powers of two, the first larger")
    return out


def progressive_rounds(config: ml_collections.ConfigDict, teacher_params: Any) -> dict[int, Any]:
    """Every progressive round in turn, each student starting from and taught by the previous model;
    {N: the N-step student's EMA weights}."""
    model = build_model(config.teacher.model)
    abar = scheduler_for("ddpm", config.teacher.diffusion).alphas_cumprod()
    students, params = {}, teacher_params
    for i, n in enumerate(student_steps(config)):
        c = stage_config(config.teacher, config.progressive)
        loss = distill.progressive_loss(model, params, abar, student_steps=n,
                                        prediction_type=config.teacher.diffusion.prediction_type,
                                        guidance_scale=config.guidance_scale if i == 0 else None)
        print(f"progressive: {2 * n} -> {n} steps ({c.train.steps} train steps)", flush=True)
        state = train_and_evaluate(c, Path(config.workdir) / "progressive" / str(n), init_params=params,
                                   loss_fn=loss)
        params = students[n] = jax.device_get(state.ema_params)
    return students


def train_lcm_lora(config: ml_collections.ConfigDict, teacher_params: Any) -> Path:
    """LCM-LoRA factors on the teacher by latent consistency distillation; returns the exported file."""
    l = config.lcm
    workdir = Path(config.workdir) / "lcm_lora"
    model = build_model(config.teacher.model)
    abar = scheduler_for("ddpm", config.teacher.diffusion).alphas_cumprod()
    scale = l.alpha / l.rank
    lora = finetune.init_lora(teacher_params, finetune.lora_targets(teacher_params, l.targets), l.rank,
                              jax.random.key(config.teacher.seed))
    loss = distill.consistency_loss(
        model, teacher_params, abar, original_steps=l.original_steps,
        prediction_type=config.teacher.diffusion.prediction_type, guidance_scale=config.guidance_scale,
        to_model_params=lambda p: finetune.lora_view(teacher_params, p, None, scale=scale))
    print(f"lcm-lora: rank {l.rank}, {l.train_steps} train steps", flush=True)
    state = train_and_evaluate(stage_config(config.teacher, l), workdir, init_params=lora, loss_fn=loss)
    return finetune.export_lora(workdir / LORA_FILE, jax.device_get(state.ema_params), alpha=l.alpha)


def measure(config: ml_collections.ConfigDict, pipe: GenerationPipeline, params: Any, flops: float, *,
            model: str, sampler: str, steps: int, guided: bool) -> Point:
    """One quality / cost point: `num_samples` digits of `pipe` at `steps` steps; `flops` per evaluation."""
    labels = np.arange(config.num_samples) % 10  # [N]: every class in turn
    images = pipe(params, jax.random.key(config.seed), labels=labels, num_inference_steps=steps,
                  guidance_scale=config.guidance_scale if guided else None)  # [N, S, S, C] uint8
    evals = steps * (2 if guided else 1)  # DDIM and LCM: one evaluation per step
    n_params = count_params(params)
    point = dict(model=model, params=n_params, flops_per_eval=flops, sampler=f"{sampler}-{steps}",
                 steps=steps, guidance_scale=config.guidance_scale if guided else None, evals=evals,
                 evals_note="x2: guidance runs the [uncond; cond] rows" if guided else "one per step",
                 cost_flops=flops * evals, num_samples=config.num_samples, distilled=model != "teacher",
                 fid=digits_fid(images), accuracy=class_accuracy(images, labels))
    print(f"{model:>12} {point['sampler']:>15}: {evals:>3} evals, {point['cost_flops'] / 1e9:.3f} GFLOP/image, "
          f"FID {point['fid']:.2f}, accuracy {point['accuracy']:.1%}", flush=True)
    return point


def evaluate(config: ml_collections.ConfigDict, teacher_params: Any, students: dict[int, Any],
             lora_file: Path) -> list[Point]:
    """The teacher (DDIM, guided) at every step count of `teacher_eval_steps`, each progressive student at
    its own step count (DDIM, unguided) and the LCM-LoRA (LCMScheduler, unguided) at `lcm.eval_steps`."""
    t = config.teacher
    model = build_model(t.model)
    mesh, rules = parallel.mesh_from_config(t.mesh)
    flops = flops_per_eval(model, teacher_params)  # every model here has the teacher's architecture
    # Unclipped, like the DDIM steps the students learned from: clipping x_0 but not the noise direction
    # derived from the same v output made the guided teacher's 64-step samples collapse.
    ddim_scheduler = scheduler_for("ddim", t.diffusion, timestep_spacing="trailing", clip_sample=False)
    ddim = GenerationPipeline(model, ddim_scheduler, mesh, rules)
    points = [measure(config, ddim, teacher_params, flops, model="teacher", sampler="ddim", steps=n, guided=True)
              for n in config.teacher_eval_steps]
    points += [measure(config, ddim, params, flops, model="progressive", sampler="progressive", steps=n,
                       guided=False) for n, params in sorted(students.items(), reverse=True)]
    lcm_scheduler = scheduler_for("lcm", t.diffusion, original_inference_steps=config.lcm.original_steps)
    lcm = GenerationPipeline(model, lcm_scheduler, mesh, rules)
    lcm_params = lcm.with_lora(teacher_params, lora_file)
    points += [measure(config, lcm, lcm_params, flops, model="lcm-lora", sampler="lcm", steps=n, guided=False)
               for n in config.lcm.eval_steps]
    return points


def run_study(config: ml_collections.ConfigDict) -> list[Point]:
    """Teacher, progressive rounds, LCM-LoRA, evaluation; writes `config.results` and returns the points."""
    student_steps(config)  # checked before anything trains
    teacher = train_teacher(config)
    students = progressive_rounds(config, teacher)
    lora_file = train_lcm_lora(config, teacher)
    points = evaluate(config, teacher, students, lora_file)
    Path(config.results).parent.mkdir(parents=True, exist_ok=True)
    Path(config.results).write_text(json.dumps(points, indent=1) + "\n")
    print(f"wrote {config.results}", flush=True)
    return points


def quick_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` shrunk to run in a few minutes on a 2-core CPU (a tiny two-level U-Net, a few steps per stage),
    writing everything under WORKDIR/quick: for tests and a first look."""
    c = ml_collections.ConfigDict(config.to_dict())
    m = c.teacher.model
    m.block_out_channels, m.down_block_types, m.up_block_types = (8, 16), ("DownBlock2D", "AttnDownBlock2D"), (
        "AttnUpBlock2D", "UpBlock2D")
    m.attention_head_dim, m.norm_num_groups = 8, 4
    c.teacher.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, checkpoint_every=4)
    for stage in (c.progressive, c.lcm):
        stage.update(train_steps=2, warmup_steps=1, batch_size=8)
    c.progressive.update(teacher_steps=8, final_steps=2)
    c.lcm.update(original_steps=8, eval_steps=(2,), rank=2, alpha=2.0)
    c.teacher_eval_steps = (2,)
    c.num_samples = 20
    c.workdir = str(Path(config.workdir) / "quick")
    c.results = str(Path(c.workdir) / "distill_digits.json")
    return c


if __name__ == "__main__":
    run_config_study(run_study, quick_config, "configs/distill_digits.py",
                     "A tiny model, a few steps per stage: the whole study in a few minutes.")
