"""Sample a trained class-conditional model into a PNG grid or an .npz file.

    python sample.py --workdir=runs/digits --num_samples=100 --guidance_scale=3 --out=runs/digits/samples.png
    python sample.py --workdir=runs/digits --labels=3,3,7 --sampler=dpm++2m --steps=20 --out=three.npz

Restores the EMA weights of the latest checkpoint (or --step). With no --labels, labels cycle through the
classes. `.png` writes a grid with one row per class (for cycling labels); `.npz` writes `images`
[N, H, W, C] uint8 and `labels` [N] int64.
"""
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from diffax import parallel
from diffax.image_io import save_grid, save_npz
from diffax.models import build_model
from diffax.pipelines.class_conditional import ClassConditionalPipeline
from diffax.schedulers.names import scheduler_for
from diffax.train.checkpoint import restore_for_sampling

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.DEFINE_integer("num_samples", 100, "How many images.")
flags.DEFINE_list("labels", None, "Class labels, e.g. 0,1,2; default cycles 0..num_classes-1.")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale; default the config's sample block.")
flags.DEFINE_string("sampler", None, "Sampler name (docs/samplers.md); default the config's.")
flags.DEFINE_integer("steps", None, "Inference steps; default the config's.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_string("out", None, "Output file: .png (grid) or .npz (arrays).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    parallel.initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    out = Path(FLAGS.out)
    if out.suffix not in (".png", ".npz"):
        raise app.UsageError(f"--out must end in .png or .npz, got {out}")
    config, params, step = restore_for_sampling(FLAGS.workdir, FLAGS.step)
    spec = build_model(config.model)
    sampler = FLAGS.sampler or config.sample.sampler
    scheduler = scheduler_for(sampler, config.diffusion)
    n_cls = spec.num_classes
    if FLAGS.labels:
        labels = np.array([int(s) for s in FLAGS.labels])
        if len(labels) != FLAGS.num_samples:  # a short list repeats to fill num_samples
            labels = np.resize(labels, FLAGS.num_samples)
    else:
        labels = np.arange(FLAGS.num_samples) % max(n_cls, 1)
    pipe = ClassConditionalPipeline(spec, scheduler, parallel.make_mesh({"data": -1}))
    guidance = FLAGS.guidance_scale if FLAGS.guidance_scale is not None else config.sample.guidance_scale
    images = pipe(params, labels, jax.random.key(FLAGS.seed),
                  num_inference_steps=FLAGS.steps or config.sample.steps, guidance_scale=guidance)
    if jax.process_index() == 0:
        if out.suffix == ".png":
            save_grid(out, images, ncols=min(n_cls, 10) if not FLAGS.labels else 10,
                      upscale=max(1, 64 // images.shape[1]))
        else:
            save_npz(out, images, labels)
        print(f"wrote {len(images)} samples from step {step} ({sampler}, {FLAGS.steps or config.sample.steps} "
              f"steps, guidance {guidance}) to {out}")


def run(argv):
    """Bad input ends with one line naming the problem, not a traceback."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(run)
