"""Train a diffusion model from a config file.

    python train.py --config=configs/digits.py --workdir=runs/digits [--config.train.steps=500 ...]

Re-running the same command resumes from the latest checkpoint in the workdir (--step=N: from step N).
"""
from absl import app, flags, logging
from ml_collections import config_flags

from diffax import parallel
from diffax.cli import parse_flags, run_reporting_errors
from diffax.train.loop import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/digits.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, samples and logs go here.")
flags.DEFINE_integer("step", None, "Resume from this checkpoint step; default the newest one that reads back "
                     "intact. Later steps are moved to checkpoints/superseded/.")
flags.DEFINE_string("quantize", None, "Not supported: train.py trains float weights (see the error for the "
                    "scale-only tuning of a quantized model).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if FLAGS.quantize is not None:
        # The train step, checkpoints and EMA update one float parameter tree; TuneQDM trains a separate
        # scale tree over a frozen quantized base, with one timestep group per batch.
        raise ValueError(f"--quantize={FLAGS.quantize}: train.py trains float weights only; fine-tuning a quantized "
                         f"model (TuneQDM, scales only) is diffax.quant.tuneqdm from Python (docs/efficiency.md), "
                         f"and sample.py --quantize quantizes a trained model")
    parallel.initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    train_and_evaluate(FLAGS.config, FLAGS.workdir, step=FLAGS.step)


if __name__ == "__main__":
    app.run(run_reporting_errors(main), flags_parser=parse_flags)
